"""SQA's own invariants (arXiv 2510.01817; spec: shared/papers/efficient.md §9).

The conformance suite (generated from the registry) covers the function (softmax on the heads
it is given); here: the presets, the layer layout and parameter counts, FLOPs ∝ H_q / H from
`attnzoo.accounting`, H_q = H_kv = H is MHA, and bad input.
"""

from fractions import Fraction

import jax
import numpy as np
import pytest
from flax import nnx

from attnzoo import nn
from attnzoo.accounting import AttentionSpec
from attnzoo.accounting.decode import attention_flops
from attnzoo.attention.heads import sqa

D, N, HD = 32, 8, 4  # model width, head split, head dim


def layer(family="sqa", seed=0, **knobs):
  return nn.Attention(
    D,
    num_heads=N,
    num_kv_heads=N,
    head_dim=HD,
    family=family,
    knobs={"implementation": "xla", **knobs},
    is_causal=True,
    rngs=nnx.Rngs(seed),
  )


def layout(att) -> tuple[int, int]:
  """(H_q, H_kv) read from the built layer's kernels."""
  return att.query.kernel.get_value().shape[1], att.key.kernel.get_value().shape[1]


@pytest.mark.parametrize(
  "variant, want", [("sqa", (8, 4)), ("ssqa", (8, 8)), ("xsqa", (4, 4)), ("xsmqa", (4, 1))]
)
def test_presets_for_a_16_head_split(variant, want):
  assert sqa.resolve_heads(16, variant=variant) == want


def test_explicit_counts_override_the_preset():
  assert sqa.resolve_heads(16, variant="xsmqa", num_query_heads=8) == (8, 1)
  assert sqa.resolve_heads(16, num_query_heads=16, num_kv_heads=16) == (16, 16)


@pytest.mark.parametrize("variant", sorted(sqa.VARIANTS))
def test_layer_layout_params_and_flops(variant):
  att = nnx.eval_shape(lambda: layer(variant=variant))
  hq, hkv = layout(att)
  assert (hq, hkv) == sqa.resolve_heads(N, variant=variant)
  assert att.out.kernel.get_value().shape == (hq, HD, D)
  assert att.value.kernel.get_value().shape == (D, hkv, HD)
  counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(att, nnx.Param)))
  assert counted == 2 * D * hq * HD + 2 * D * hkv * HD
  # Attention FLOPs from the accounting, at the built layer's head counts: exactly H_q / H.
  spec = AttentionSpec(variant, 1, hq, hkv, HD, HD)
  mha = AttentionSpec("mha", 1, N, N, HD, HD)
  ratio = Fraction(int(attention_flops(spec, 64)), int(attention_flops(mha, 64)))
  assert ratio == Fraction(hq, N)


def test_full_query_heads_are_mha_exactly():
  full = layer(num_query_heads=N, num_kv_heads=N)
  mha = layer("softmax")
  assert layout(full) == (N, N)
  want = nnx.state(mha, nnx.Param)
  got = nnx.state(full, nnx.Param)
  for (path, a), (_, b) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
  x = jax.random.normal(jax.random.key(1), (2, 9, D))
  np.testing.assert_array_equal(np.asarray(full(x)), np.asarray(mha(x)))


def test_reduced_layer_runs_and_is_causal():
  att = layer(variant="xsmqa")
  x = jax.random.normal(jax.random.key(2), (1, 7, D))
  y = att(x)
  assert y.shape == x.shape
  x2 = x.at[:, 5:].set(0.0)
  np.testing.assert_array_equal(np.asarray(att(x2)[:, :5]), np.asarray(y[:, :5]))


@pytest.mark.parametrize(
  "heads, knobs, match",
  [
    (6, dict(variant="sqa"), "H=6 heads; choose H divisible by 4"),
    (6, dict(variant="xsmqa"), "H=6 heads; choose H divisible by 4"),
    (8, dict(variant="mqa"), "variant='mqa'"),
    (8, dict(num_query_heads=16), "num_query_heads=16"),
    (8, dict(variant="ssqa", num_kv_heads=3), "num_kv_heads=3 must divide H_q=4"),
  ],
)
def test_bad_layouts_raise(heads, knobs, match):
  with pytest.raises(ValueError, match=match):
    sqa.resolve_heads(heads, **knobs)
  with pytest.raises(ValueError, match=match):
    nn.Attention(
      heads * HD,
      num_heads=heads,
      num_kv_heads=heads,
      head_dim=HD,
      family="sqa",
      knobs=knobs,
      rngs=nnx.Rngs(0),
    )
