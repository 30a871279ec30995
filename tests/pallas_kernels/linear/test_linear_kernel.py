"""pallas_kernels.linear: interpret-mode runs against the references, and compile-only checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear
from pallas_kernels import lowering_check as lc
from tests import tolerances

BACKENDS = ("gpu", "tpu")


def _inputs(seed, b=2, t=40, n=4, kh=2, h=16, vd=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)  # numpy: eager jax.random compiles once per shape
  q = jnp.asarray(rng.normal(size=(b, t, n, h)) * 0.3, dtype)
  k = jnp.asarray(rng.normal(size=(b, t, kh, h)) * 0.3, dtype)
  v = jnp.asarray(rng.normal(size=(b, t, kh, vd)) * 0.3, dtype)
  log_decay = jnp.log(jnp.asarray([0.999, 0.9, 0.5, 0.01], jnp.float32))[:n]
  state0 = jnp.asarray(rng.normal(size=(b, n, h, vd)) * 0.1, jnp.float32)
  return q, k, v, log_decay, state0


def _kernel(backend, block=16):
  def fn(q, k, v, log_decay, state0):
    return linear.linear_attention(
      q,
      k,
      v,
      log_decay=log_decay,
      initial_state=state0,
      block_sizes=linear.BlockSizes(block),
      interpret=True,
      backend=backend,
    )

  return fn


def _grads(fn, args):
  out, state = jax.eval_shape(fn, *args)
  rng = np.random.default_rng(11)
  w_out = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  w_state = jnp.asarray(rng.normal(size=state.shape), jnp.float32)

  def loss(*a):
    o, s = fn(*a)
    return jnp.sum(o.astype(jnp.float32) * w_out) + jnp.sum(s * w_state)

  return jax.grad(loss, argnums=tuple(range(5)))(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_references(backend):
  args = _inputs(0)  # T=40: two full blocks of 16 and a ragged one; GQA 4 query / 2 kv heads
  out, state = _kernel(backend)(*args)
  for oracle in (linear.linear_attention_reference, linear.linear_attention_recurrent):
    out_ref, state_ref = oracle(*args)
    tolerances.assert_close(out, out_ref, err_msg=oracle.__name__)
    tolerances.assert_close(state, state_ref, err_msg=oracle.__name__)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_kernel_matches_reference_gradients(backend):
  args = _inputs(1)
  grads = _grads(_kernel(backend), args)
  grads_ref = _grads(linear.linear_attention_reference, args)
  for name, g, g_ref in zip(
    ("dq", "dk", "dv", "dlog_decay", "dstate0"), grads, grads_ref, strict=True
  ):
    # dlog_decay, a (t+1)-weighted sum over all tokens, is measured against its own magnitude.
    tolerances.assert_close(g, g_ref, grad=True, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs(backend):
  args = _inputs(2, t=32, dtype=jnp.bfloat16)
  out, state = _kernel(backend)(*args)
  assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
  out_ref, state_ref = linear.linear_attention_reference(*args)
  tolerances.assert_close(out, out_ref, jnp.bfloat16)
  tolerances.assert_close(state, state_ref, jnp.bfloat16)


def test_single_block_and_no_decay_no_state():
  q, k, v, _, _ = _inputs(3, b=1, t=16, n=2, kh=2)
  out, state = linear.linear_attention(q, k, v, block_sizes=linear.BlockSizes(16), interpret=True)
  out_ref, state_ref = linear.linear_attention_reference(q, k, v)
  tolerances.assert_close(out, out_ref)
  tolerances.assert_close(state, state_ref)


def test_rejects_bad_arguments():
  q, k, v, log_decay, _ = _inputs(4, t=16)
  with pytest.raises(ValueError, match="backend="):
    linear.linear_attention(q, k, v, backend="cuda")
  with pytest.raises(ValueError, match="log_decay"):
    linear.linear_attention(q, k, v, log_decay=log_decay[:3])
  with pytest.raises(ValueError, match="multiple of 8"):
    linear.BlockSizes(12)
  with pytest.raises(ValueError, match="not divisible"):
    linear.linear_attention(q[:, :, :3], k, v)
  with pytest.raises(ValueError, match="S == T"):
    linear.linear_attention(q, k[:, :8], v[:, :8])
  with pytest.raises(ValueError, match="4-D"):
    linear.linear_attention(q[0], k, v)


def test_interpret_defaults_on_cpu(caplog):
  """The same policy as block_sparse_attention: None interprets off GPU/TPU (logged), False
  without a backend raises naming the fix."""
  q, k, v, _, _ = _inputs(6, b=1, t=16, n=2, kh=2)
  with caplog.at_level("WARNING", logger="pallas_kernels"):
    out, _ = linear.linear_attention(q, k, v, block_sizes=linear.BlockSizes(16))
  assert "linear_attention" in caplog.text and "interpreter" in caplog.text
  tolerances.assert_close(out, linear.linear_attention_reference(q, k, v)[0])
  with pytest.raises(ValueError, match="interpret=None"):
    linear.linear_attention(q, k, v, interpret=False)


# ------------------------------------------------------------------------------------------------
# Compile-only checks for real hardware (no accelerator needed).
# ------------------------------------------------------------------------------------------------

_SHAPES = dict(b=1, t=200, n=4, kh=2, h=64, vd=64)


def _fwd_bwd(backend):
  def fn(q, k, v, log_decay, state0):
    def loss(*a):
      # interpret=False: compile for `backend` (lowering only: this host has no GPU/TPU).
      o, s = linear.linear_attention(
        *a[:3], log_decay=a[3], initial_state=a[4], interpret=False, backend=backend
      )
      return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    return jax.grad(loss, argnums=tuple(range(5)))(q, k, v, log_decay, state0)

  return fn


def _abstract(dtype, **overrides):
  s = _SHAPES | overrides
  sd = jax.ShapeDtypeStruct
  return (
    sd((s["b"], s["t"], s["n"], s["h"]), dtype),
    sd((s["b"], s["t"], s["kh"], s["h"]), dtype),
    sd((s["b"], s["t"], s["kh"], s["vd"]), dtype),
    sd((s["n"],), jnp.float32),
    sd((s["b"], s["n"], s["h"], s["vd"]), jnp.float32),
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_mosaic_lowering(dtype):
  assert lc.tpu_export(_fwd_bwd("tpu"), *_abstract(dtype)) == 3  # forward + dQ + dK/dV kernels


@pytest.mark.parametrize(
  "dtype, head_dim", [(jnp.float32, 64), (jnp.bfloat16, 64), (jnp.bfloat16, 128)]
)  # 128: forward splits V
def test_gpu_triton_lowering(dtype, head_dim):
  modules = lc.triton_ttir(_fwd_bwd("gpu"), *_abstract(dtype, h=head_dim, vd=head_dim))
  assert [m.split("@")[1].split()[0] for m in modules] == [
    "linear_attention_fwd",
    "linear_attention_bwd",
  ]
  assert all("tt.dot" in m for m in modules)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_triton_compiles_to_ptx(dtype):
  pytest.importorskip(
    "triton",
    reason="the `triton` extra is not installed: TTIR -> PTX (sm_90) check skipped; "
    "`pip install .[triton]` enables it",
  )
  for module in lc.triton_ttir(_fwd_bwd("gpu"), *_abstract(dtype)):
    result = lc.triton_compile(module, num_warps=4, num_stages=1)
    assert result["ptx_chars"] > 0 and result["shared_bytes"] <= 227 * 1024


def test_gpu_forward_with_value_column_split():
  args = _inputs(5, b=1, t=24, vd=16)
  out, state = linear.linear_attention(
    *args[:3],
    log_decay=args[3],
    initial_state=args[4],
    block_sizes=linear.BlockSizes(8, block_v=8),
    interpret=True,
    backend="gpu",
  )
  out_ref, state_ref = linear.linear_attention_reference(*args)
  tolerances.assert_close(out, out_ref)
  tolerances.assert_close(state, state_ref)
  with pytest.raises(ValueError, match="block_v"):
    linear.linear_attention(
      *args[:3], block_sizes=linear.BlockSizes(8, block_v=24), interpret=True, backend="gpu"
    )
