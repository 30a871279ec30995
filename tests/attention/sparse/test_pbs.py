"""PBS-Attn (arXiv 2510.21270): the permutation stays inside segments, τ = 1 is dense causal
attention, causality holds on original positions, the sink tile is kept, and at equal τ the
permuted layout needs fewer tiles than the unpermuted one on planted heavy-hitter keys."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.attention import dot_product_attention
from attnzoo.attention.sparse import pbs
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

B, T, N, K, H = 2, 70, 4, 2, 8  # ragged: 70 = 4 segments of 16 + 6
KNOBS = dict(block_size=8, segment_size=16)


def _grads(fn, q, k, v):
  return jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)[0])), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_threshold_one_is_dense_causal_attention(implementation):
  q, k, v = random_qkv(0, B, T, T, N, K, H, scale=2.0)
  run = jax.jit(
    functools.partial(
      pbs.attention, is_causal=True, threshold=1.0, implementation=implementation, **KNOBS
    )
  )
  dense = lambda q, k, v: (dot_product_attention(q, k, v, is_causal=True, implementation="xla"),)
  out, aux = run(q, k, v)
  assert_close(out, dense(q, k, v)[0])
  assert float(aux.metrics["pbs_density"]) == 1.0
  for g, w in zip(_grads(run, q, k, v), _grads(dense, q, k, v), strict=True):
    assert_close(g, w, grad=True)


def test_permutation_is_a_bijection_inside_each_complete_segment():
  q, k, _ = random_qkv(1, B, T, T, N, K, H)
  imp = pbs.key_importance(q, k, block_size=8, scale=H**-0.5)
  perm = np.asarray(pbs.segment_permutation(imp, segment_size=16))  # [B, N, T]
  assert perm.shape == (B, N, T)
  for row in perm.reshape(-1, T):
    for s in range(0, 64, 16):
      assert sorted(row[s : s + 16]) == list(range(s, s + 16))  # stays in its segment
    assert row[64:].tolist() == list(range(64, 70))  # incomplete last segment untouched
  # Sorted by importance, descending, inside each segment.
  imp = np.asarray(imp)
  for b in range(B):
    for h in range(N):
      got = imp[b, h, perm[b, h, :16]]
      assert np.all(np.diff(got) <= 0)
  assert not np.array_equal(perm[0, 0, :64], np.arange(64))  # it does permute


def test_causal_mask_reads_original_positions():
  q, k, v = random_qkv(2, 1, T, T, N, K, H, scale=2.0)
  t = 37
  fn = lambda k, v: pbs.attention(
    q, k, v, is_causal=True, threshold=0.5, implementation="chunked", **KNOBS
  )[0][:, t]
  gk, gv = jax.grad(lambda k, v: jnp.sum(fn(k, v) ** 2), argnums=(0, 1))(k, v)
  assert np.all(np.asarray(gk)[:, t + 1 :] == 0) and np.all(np.asarray(gv)[:, t + 1 :] == 0)
  assert np.any(np.asarray(gv)[:, : t + 1] != 0)


def test_sink_tile_is_always_selected():
  q, k, v = random_qkv(3, B, T, T, N, K, H, scale=3.0)
  imp = pbs.key_importance(q, k, block_size=8, scale=H**-0.5)
  perm = pbs.segment_permutation(imp, segment_size=16)
  k_p = jnp.take_along_axis(jnp.repeat(k, N // K, axis=2), jnp.swapaxes(perm, 1, 2)[..., None], 1)
  bmap = pbs.select_tiles(q, k_p, perm, threshold=0.05, is_causal=True, scale=H**-0.5, **KNOBS)
  chosen = np.asarray(bmap.to_block_mask()) != 0  # [B, N, Qb, Kb]
  sink = np.asarray(jnp.argmin(perm, axis=-1) // 8)  # [B, N]
  for b in range(B):
    for n in range(N):
      assert chosen[b, n, 2:, sink[b, n]].all()  # every later q tile sees it


def test_permutation_needs_fewer_tiles_at_equal_mass():
  """Planted heavy-hitter keys (3 per segment at random positions, aligned with every query):
  sorting inside segments gathers them into one tile, so τ = 0.9 is reached with fewer
  tiles than in the original order (the paper's claim, §3)."""
  rng = np.random.default_rng(0)
  L, seg, blk, h = 512, 128, 16, 16
  u = rng.normal(size=h)
  u /= np.linalg.norm(u)
  q = rng.normal(size=(1, L, 2, h)) * 0.5 + 2.0 * u
  k = rng.normal(size=(1, L, 2, h)) * 0.5
  heavy = np.concatenate([s * seg + rng.choice(seg, 3, replace=False) for s in range(L // seg)])
  k[:, heavy] += 24.0 * u
  v = rng.normal(size=(1, L, 2, h))
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  run = functools.partial(
    pbs.attention, q, k, v, is_causal=True, block_size=blk, segment_size=seg, threshold=0.9
  )
  permuted = float(run(permute=True)[1].metrics["pbs_density"])
  plain = float(run(permute=False)[1].metrics["pbs_density"])
  assert permuted < plain - 0.03, (permuted, plain)


def test_bad_knobs_raise():
  q, k, v = random_qkv(4, 1, 32, 32, 2, 2, H)
  with pytest.raises(ValueError, match="segment_size=12"):
    pbs.attention(q, k, v, block_size=8, segment_size=12)
  with pytest.raises(ValueError, match="threshold=0"):
    pbs.attention(q, k, v, threshold=0.0)
  with pytest.raises(ValueError, match="block_size=0"):
    pbs.attention(q, k, v, block_size=0)
