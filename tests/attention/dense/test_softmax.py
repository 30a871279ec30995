"""Softmax attention: conformance of every implementation, mask kinds, options, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import attention, masks
from attnzoo.attention import dot_product_attention as dpa
from pallas_kernels.block_sparse import BlockSizes
from tests.attention import conformance
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close


# The per-implementation conformance classes are generated from the registry
# (tests/attention/test_conformance.py); this one adds the default tile sizes.
class TestSoftmaxChunkedDefaultTiles(conformance.suite("softmax", "chunked")):
  options = {}
  shape = (1, 600, 530, 4, 1, 8, 8)  # several 512-tiles, ragged at both ends


# ------------------------------------------------------------------ every mask kind


def _mask_cases():
  return {
    "causal": masks.Causal(),
    "causal_offset": masks.Causal(offset=5),
    "window": masks.SlidingWindow(left=9, right=3),
    "chunked": masks.Chunked(16),
    "neighborhood_2d": masks.Neighborhood((6, 8), window=(3, 5)),
    "neighborhood_causal": masks.Neighborhood((48,), window=7, causal=True),
    "blocked": masks.Blocked(12, 12),
    "global": masks.GlobalTokens(3) | masks.SlidingWindow(4, 4),
    "segments": masks.Segments(np.repeat(np.arange(4), 12)),
    "random": masks.RandomBlocks(0.4, 8, 8, seed=1, seq_q=48, seq_k=48),
    "dense": masks.DenseMask(np.random.default_rng(0).random((48, 48)) < 0.3),
    "and_or": (masks.SlidingWindow(20, 0) & masks.Causal()) | masks.AttentionSinks(2),
  }


@pytest.mark.parametrize("name", sorted(_mask_cases()))
def test_mask_kinds_chunked_equals_xla_equals_dense(name):
  mask = _mask_cases()[name]
  q, k, v = random_qkv(0, 1, 48, 48, 4, 2, 8)
  dense = jnp.asarray(mask.dense(48, 48))
  want = dpa(q, k, v, mask=dense, implementation="xla")
  assert_close(dpa(q, k, v, mask=mask, implementation="xla"), want)

  def loss(impl, q, k, v):
    return jnp.sum(
      jnp.sin(
        dpa(
          q,
          k,
          v,
          mask=mask,
          implementation=impl,
          block_sizes=BlockSizes(8, 16) if impl == "chunked" else None,
        )
      )
    )

  assert_close(
    dpa(q, k, v, mask=mask, implementation="chunked", block_sizes=BlockSizes(8, 16)), want
  )
  got = jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, ref, strict=True):
    assert_close(g, r, grad=True)


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_agrees_with_jax_nn_dot_product_attention(impl):
  q, k, v = random_qkv(1, 2, 40, 40, 4, 2, 16)
  bias = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 40, 40))
  keep = jax.random.uniform(jax.random.PRNGKey(3), (2, 1, 40, 40)) < 0.8
  keep = keep.at[..., 0].set(True)  # jax averages fully masked rows; attnzoo returns zeros
  for kw in [dict(), dict(is_causal=True), dict(bias=bias), dict(mask=keep), dict(scale=0.3)]:
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)
    got = dpa(q, k, v, implementation=impl, block_sizes=BlockSizes(16, 16), **kw)
    assert_close(got, want, err_msg=str(list(kw)))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_segment_ids_equal_separate_sequences(impl):
  q, k, v = random_qkv(2, 1, 30, 30, 2, 2, 8)
  ids = jnp.asarray([[0] * 12 + [1] * 18])
  packed = dpa(
    q, k, v, segment_ids=ids, is_causal=True, implementation=impl, block_sizes=BlockSizes(8, 8)
  )
  first = dpa(q[:, :12], k[:, :12], v[:, :12], is_causal=True, implementation="xla")
  second = dpa(q[:, 12:], k[:, 12:], v[:, 12:], is_causal=True, implementation="xla")
  assert_close(packed, jnp.concatenate([first, second], axis=1))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_cross_attention_segment_pair(impl):
  q, k, v = random_qkv(3, 1, 10, 14, 2, 1, 8)
  q_ids = jnp.asarray([[0] * 4 + [1] * 6])
  kv_ids = jnp.asarray([[0] * 9 + [1] * 5])
  got = dpa(q, k, v, segment_ids=(q_ids, kv_ids), implementation=impl)
  keep = q_ids[:, None, :, None] == kv_ids[:, None, None, :]
  assert_close(got, dpa(q, k, v, mask=keep, implementation="xla"))


def test_soft_cap_matches_formula():
  q, k, v = random_qkv(4, 1, 16, 16, 2, 2, 8, scale=3.0)
  cap = 2.0
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8)
  want = jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(cap * jnp.tanh(logits / cap), -1), v)
  for impl in ("xla", "chunked"):
    assert_close(dpa(q, k, v, logits_soft_cap=cap, implementation=impl), want)


def test_chunked_bias_gradient_matches_xla():
  q, k, v = random_qkv(5, 2, 20, 24, 4, 2, 8)
  bias = jax.random.normal(jax.random.PRNGKey(6), (2, 1, 20, 24))

  def loss(impl, bias):
    out = dpa(q, k, v, bias=bias, is_causal=True, implementation=impl, block_sizes=BlockSizes(8, 8))
    return jnp.sum(out**2)

  assert_close(
    jax.grad(lambda b: loss("chunked", b))(bias),
    jax.grad(lambda b: loss("xla", b))(bias),
    grad=True,
  )


def test_chunked_skips_empty_tiles():
  """A window mask visits O(T) tiles: the block map the path uses says so."""
  mask = masks.SlidingWindow(left=64, right=0)
  bmap = mask.block_map(4096, 4096, 64, 64)
  assert int(np.max(bmap.kv_counts)) == 2
  assert bmap.density() < 0.05


def test_registry_lists_softmax_and_rejects_unknown_names():
  assert "softmax" in attention.FAMILIES
  assert attention.get("softmax").attention is dpa
  with pytest.raises(KeyError, match="valid names"):
    attention.get("sofmax")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
  "shapes, kwargs, error, match",
  [
    (((2, 8, 4), (2, 8, 4, 8), (2, 8, 4, 8)), {}, ValueError, "q must have rank 4"),
    (((2, 8, 4, 8), (2, 8, 3, 8), (2, 8, 3, 8)), {}, ValueError, "multiple of kv heads"),
    (((2, 8, 4, 8), (2, 8, 2, 6), (2, 8, 2, 8)), {}, ValueError, "head dim"),
    (((2, 8, 4, 8), (2, 9, 2, 8), (2, 8, 2, 8)), {}, ValueError, "S=9"),
    (((2, 8, 4, 8), (3, 8, 2, 8), (3, 8, 2, 8)), {}, ValueError, "batch sizes differ"),
    (((1, 8, 2, 8),) * 3, {"mask": np.ones((7, 8), bool)}, ValueError, "does not broadcast"),
    (((1, 8, 2, 8),) * 3, {"mask": np.ones((8, 8), np.int32)}, TypeError, "boolean"),
    (((1, 8, 2, 8),) * 3, {"implementation": "flash"}, ValueError, "not one of"),
    (
      ((1, 8, 2, 8),) * 3,
      {"implementation": "chunked", "block_sizes": (8, 8)},
      TypeError,
      "BlockSizes",
    ),
    (((1, 8, 2, 8),) * 3, {"logits_soft_cap": -1.0}, ValueError, "logits_soft_cap"),
    (((1, 8, 2, 8),) * 3, {"segment_ids": np.zeros((1, 7), np.int32)}, ValueError, "segment_ids"),
  ],
)
def test_bad_input_raises_clear_errors(shapes, kwargs, error, match):
  q, k, v = (jnp.zeros(s) for s in shapes)
  with pytest.raises(error, match=match):
    dpa(q, k, v, **kwargs)


def test_block_sizes_must_be_positive():
  with pytest.raises(ValueError, match="block_q=0"):
    BlockSizes(0, 8)


# ------------------------------------------------------------------ "pallas" (interpret mode)


class _CountingWindow(masks.Mask):
  """|q - k| <= width; records the shape of every traced (non-numpy) evaluation."""

  traces: list = []

  def __init__(self, width):
    self.width = width

  def predicate(self, q_pos, k_pos, xp=jnp):
    if not isinstance(q_pos, np.ndarray):
      _CountingWindow.traces.append(np.shape(q_pos))
    return xp.abs(q_pos - k_pos) <= self.width

  def __eq__(self, other):
    return type(other) is type(self) and other.width == self.width

  def __hash__(self):
    return hash((type(self), self.width))


class _UndeclaredArrayMask(masks.Mask):
  """Reads an array it does not list in `tables()`: the kernel cannot take it."""

  keep = np.tri(48, 48, 2, dtype=bool)

  def predicate(self, q_pos, k_pos, xp=jnp):
    return xp.asarray(self.keep)[xp.clip(q_pos, 0, 47), xp.clip(k_pos, 0, 47)]


def _mixed_mask_cases():
  """And/Or of masks that read tables with position masks."""
  return {
    "documents_and_window": masks.Segments.from_lengths([20, 28]) & masks.SlidingWindow(9, 0),
    "dense_or_causal": masks.DenseMask(np.random.default_rng(1).random((48, 48)) < 0.2)
    | masks.Causal(offset=-8),
    "random_or_sinks": masks.RandomBlocks(0.3, 8, 4, seed=2, seq_q=48, seq_k=48)
    | masks.AttentionSinks(3),
  }


def _pallas(q, k, v, **kw):
  return dpa(q, k, v, implementation="pallas", interpret=True, block_sizes=BlockSizes(16, 16), **kw)


def _check_pallas_equals_xla(mask, **kw):
  q, k, v = random_qkv(0, 1, 48, 48, 4, 2, 8)
  cot = jax.random.normal(jax.random.PRNGKey(1), q.shape)

  def out_and_grads(attend):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask=mask, **kw), q, k, v)
    return out, vjp(cot)

  got, got_grads = out_and_grads(_pallas)
  want, want_grads = out_and_grads(lambda *a, **kw: dpa(*a, implementation="xla", **kw))
  assert_close(got, want)
  for n, g, w in zip("qkv", got_grads, want_grads, strict=True):
    assert_close(g, w, grad=True, err_msg=f"d{n}")


# ~60 s of CPU in interpret mode: slow. The fast loop keeps the wiring tests below and
# tests/pallas_kernels/block_sparse/test_*_tables.py.
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted({**_mask_cases(), **_mixed_mask_cases()}))
def test_pallas_every_mask_kind_matches_xla(name):
  """Every attnzoo mask, including those that read tables, runs through the kernel."""
  _check_pallas_equals_xla({**_mask_cases(), **_mixed_mask_cases()}[name])


@pytest.mark.parametrize("case", ["dense_and_causal", "documents", "documents_and_segment_ids"])
def test_pallas_runs_masks_that_read_tables(case):
  documents = masks.Segments.from_lengths([20, 28]) & masks.Causal()  # native segment ids
  dense = masks.DenseMask(np.random.default_rng(2).random((48, 48)) < 0.5)  # a kernel table
  if case == "documents_and_segment_ids":  # both: the Segments mask stays a kernel table
    ids = jnp.asarray([[0] * 30 + [1] * 18])
    _check_pallas_equals_xla(documents, segment_ids=ids)
  else:
    _check_pallas_equals_xla(dense & masks.Causal() if case == "dense_and_causal" else documents)


def test_pallas_repeated_eager_calls_reuse_the_kernels():
  q, k, v = random_qkv(10, 1, 48, 48, 2, 1, 8)
  first = _pallas(q, k, v, mask=_CountingWindow(5), is_causal=True)
  assert [s for s in _CountingWindow.traces if s], "the kernel never evaluated the predicate"
  _CountingWindow.traces.clear()
  again = _pallas(q, k, v, mask=_CountingWindow(5), is_causal=True)  # an equal, new mask
  assert [s for s in _CountingWindow.traces if s] == []
  assert_close(again, first)


def test_pallas_falls_back_to_chunked_with_a_warning(caplog):
  q, k, v = random_qkv(11, 1, 48, 48, 2, 1, 8)
  mask = _UndeclaredArrayMask()
  with caplog.at_level("WARNING"):
    got = _pallas(q, k, v, mask=mask)
  assert any("using 'chunked'" in r.getMessage() for r in caplog.records), caplog.text
  assert_close(got, dpa(q, k, v, mask=mask, implementation="xla"))


def test_pallas_passes_documents_as_native_segment_ids(monkeypatch):
  import pallas_kernels.block_sparse as block_sparse  # noqa: PLC0415 (patched below)

  calls, kernel = [], block_sparse.block_sparse_attention
  monkeypatch.setattr(
    block_sparse, "block_sparse_attention", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw)
  )
  q, k, v = random_qkv(12, 2, 48, 48, 2, 1, 8)
  mask = masks.Segments.from_lengths([20, 28]) & masks.Causal()
  got = _pallas(q, k, v, mask=mask)
  assert calls[0]["mask_tables"] == () and calls[0]["mask_fn"].mask == masks.Causal()
  np.testing.assert_array_equal(np.asarray(calls[0]["segment_ids"][1]), [[0] * 20 + [1] * 28] * 2)
  assert_close(got, dpa(q, k, v, mask=mask, implementation="xla"))


def test_pallas_interpret_policy_is_automatic_on_cpu_and_false_raises():
  """One interpret policy for both kernel packages: None = the interpreter where the platform
  has no Pallas backend; an explicit interpret=False on CPU raises, naming the fix."""
  q, k, v = random_qkv(0, 1, 16, 16, 2, 1, 8)
  want = dpa(q, k, v, is_causal=True, implementation="xla")
  got = dpa(q, k, v, is_causal=True, implementation="pallas", block_sizes=BlockSizes(16, 16))
  assert_close(got, want)
  with pytest.raises(ValueError, match="interpret"):
    dpa(q, k, v, implementation="pallas", interpret=False, block_sizes=BlockSizes(16, 16))
