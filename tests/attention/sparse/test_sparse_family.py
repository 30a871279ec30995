"""The `sparse` family's knobs: `density` sizes the top-k selection per call."""

import numpy as np
import pytest

from attnzoo.attention.sparse import sparse
from tests.attention.conformance import random_qkv


@pytest.mark.parametrize("seq, density, want", [(64, 0.25, 1), (128, 0.25, 3), (64, 1.0, 7)])
def test_density_sets_top_k_from_the_length(seq, density, want):
  assert sparse.top_k_for_density(density, seq, 8) == want
  q, k, _ = random_qkv(0, 1, seq, seq, 2, 2, 8)
  bmap = sparse.select(
    q, k, selector="topk", block_q=8, block_k=8, mask=None, top_k=99, mass=0.9, density=density
  )
  assert np.asarray(bmap.kv_counts).max() <= want + 1  # + the forced diagonal tile


def test_density_needs_the_topk_selector():
  q, k, _ = random_qkv(0, 1, 32, 32, 2, 2, 8)
  with pytest.raises(ValueError, match="density=0.5 .* selector='topk'"):
    sparse.select(
      q, k, selector="mass", block_q=8, block_k=8, mask=None, top_k=1, mass=0.9, density=0.5
    )
  with pytest.raises(ValueError, match="density=0"):
    sparse.select(
      q, k, selector="topk", block_q=8, block_k=8, mask=None, top_k=1, mass=0.9, density=0.0
    )
