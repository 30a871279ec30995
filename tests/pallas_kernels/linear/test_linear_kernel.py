"""pallas_kernels.linear: interpret-mode runs against the references, and compile-only checks."""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear
from tests import tolerances

PLATFORMS = ("gpu", "tpu")


def _inputs(seed, b=2, t=40, n=4, kh=2, h=16, vd=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)  # numpy: eager jax.random compiles once per shape
  q = jnp.asarray(rng.normal(size=(b, t, n, h)) * 0.3, dtype)
  k = jnp.asarray(rng.normal(size=(b, t, kh, h)) * 0.3, dtype)
  v = jnp.asarray(rng.normal(size=(b, t, kh, vd)) * 0.3, dtype)
  log_decay = jnp.log(jnp.asarray([0.999, 0.9, 0.5, 0.01], jnp.float32))[:n]
  state0 = jnp.asarray(rng.normal(size=(b, n, h, vd)) * 0.1, jnp.float32)
  return q, k, v, log_decay, state0


def _kernel(platform, block=16):
  def fn(q, k, v, log_decay, state0):
    return linear.linear_attention(
      q,
      k,
      v,
      log_decay=log_decay,
      initial_state=state0,
      block_sizes=linear.BlockSizes(block),
      interpret=True,
      platform=platform,
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


@pytest.mark.parametrize("platform", PLATFORMS)
def test_forward_matches_references(platform):
  args = _inputs(0)  # T=40: two full blocks of 16 and a ragged one; GQA 4 query / 2 kv heads
  out, state = _kernel(platform)(*args)
  for oracle in (linear.linear_attention_reference, linear.linear_attention_recurrent):
    out_ref, state_ref = oracle(*args)
    tolerances.assert_close(out, out_ref, err_msg=oracle.__name__)
    tolerances.assert_close(state, state_ref, err_msg=oracle.__name__)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_backward_kernel_matches_reference_gradients(platform):
  args = _inputs(1)
  grads = _grads(_kernel(platform), args)
  grads_ref = _grads(linear.linear_attention_reference, args)
  for name, g, g_ref in zip(
    ("dq", "dk", "dv", "dlog_decay", "dstate0"), grads, grads_ref, strict=True
  ):
    # dlog_decay is a (t+1)-weighted sum over all tokens; compare relative to its magnitude.
    scale = float(np.max(np.abs(g_ref))) if name == "dlog_decay" else 1.0
    tolerances.assert_close(g / scale, g_ref / scale, grad=True, err_msg=name)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bfloat16_inputs(platform):
  args = _inputs(2, t=32, dtype=jnp.bfloat16)
  out, state = _kernel(platform)(*args)
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
  with pytest.raises(ValueError, match="platform"):
    linear.linear_attention(q, k, v, platform="cuda")
  with pytest.raises(ValueError, match="log_decay"):
    linear.linear_attention(q, k, v, log_decay=log_decay[:3])
  with pytest.raises(ValueError, match="multiple of 8"):
    linear.BlockSizes(12)
  with pytest.raises(ValueError, match="not divisible"):
    linear.linear_attention(q[:, :, :3], k, v)


# ------------------------------------------------------------------------------------------------
# Compile-only checks for real hardware (no accelerator needed).
# ------------------------------------------------------------------------------------------------

_SHAPES = dict(b=1, t=200, n=4, kh=2, h=64, vd=64)


def _fwd_bwd(platform):
  def fn(q, k, v, log_decay, state0):
    def loss(*a):
      o, s = linear.linear_attention(*a[:3], log_decay=a[3], initial_state=a[4], platform=platform)
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
  exported = jax.export.export(jax.jit(_fwd_bwd("tpu")), platforms=["tpu"])(*_abstract(dtype))
  # forward + dQ + dK/dV kernels
  assert exported.mlir_module().count("tpu_custom_call") == 3


def _capture_ttir(fn, args):
  """Lowers `fn` for CUDA through the Pallas Triton backend and returns the TTIR modules."""
  from jax._src.pallas.triton import lowering as triton_lowering  # noqa: PLC0415 (private hook)

  captured = []
  original = triton_lowering.lower_jaxpr_to_triton_module

  def capture(*a, **kw):
    result = original(*a, **kw)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  triton_lowering.lower_jaxpr_to_triton_module = capture
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = original
  return captured


@pytest.mark.parametrize(
  "dtype, head_dim", [(jnp.float32, 64), (jnp.bfloat16, 64), (jnp.bfloat16, 128)]
)  # 128: forward splits V
def test_gpu_triton_lowering(dtype, head_dim):
  modules = _capture_ttir(_fwd_bwd("gpu"), _abstract(dtype, h=head_dim, vd=head_dim))
  assert [m.split("@")[1].split()[0] for m in modules] == [
    "linear_attention_fwd",
    "linear_attention_bwd",
  ]
  assert all("tt.dot" in m for m in modules)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_triton_compiles_to_ptx(dtype):
  triton = pytest.importorskip(
    "triton",
    reason="the `triton` extra is not installed: TTIR -> PTX (sm_90) check skipped; "
    "`pip install .[triton]` enables it",
  )
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415 (optional dependency)

  os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "triton_cache"))
  with tempfile.TemporaryDirectory() as tmp:
    for i, module in enumerate(_capture_ttir(_fwd_bwd("gpu"), _abstract(dtype))):
      path = os.path.join(tmp, f"linear_{i}.ttir")
      with open(path, "w") as f:
        f.write(module)
      compiled = triton.compile(
        path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1)
      )
      assert ".entry" in compiled.asm["ptx"]
      assert compiled.metadata.shared <= 227 * 1024


def test_gpu_forward_with_value_column_split():
  args = _inputs(5, b=1, t=24, vd=16)
  out, state = linear.linear_attention(
    *args[:3],
    log_decay=args[3],
    initial_state=args[4],
    block_sizes=linear.BlockSizes(8, block_v=8),
    interpret=True,
    platform="gpu",
  )
  out_ref, state_ref = linear.linear_attention_reference(*args)
  tolerances.assert_close(out, out_ref)
  tolerances.assert_close(state, state_ref)
  with pytest.raises(ValueError, match="block_v"):
    linear.linear_attention(
      *args[:3], block_sizes=linear.BlockSizes(8, block_v=24), interpret=True, platform="gpu"
    )
