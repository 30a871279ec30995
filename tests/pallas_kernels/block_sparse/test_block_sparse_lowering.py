"""Compile-only checks of both lowerings for real hardware (no accelerator needed).

TPU: Mosaic lowering via `jax.export(..., platforms=["tpu"])`, forward and backward.
GPU: Pallas Triton lowering to TTIR (always), then TTIR -> PTX/cubin for sm_90 with the
`triton` package when the `triton` extra is installed (skipped otherwise).
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import pytest

from attnzoo import masks
from pallas_kernels import lowering_check as lc
from pallas_kernels.block_sparse import block_sparse_attention

# Real-hardware tile sizes: (8, 128)-aligned for Mosaic, powers of two for Triton.
B, T, S, N, K, H = 1, 500, 380, 4, 2, 128
MASK = masks.SlidingWindow(200) & masks.Causal(offset=S - T)
BLOCK_MAP = MASK.block_map(T, S, 128, 128)


def _fns(backend, with_segments):
  def forward(q, k, v, q_ids, kv_ids):
    return block_sparse_attention(
      q,
      k,
      v,
      BLOCK_MAP,
      mask_fn=MASK.predicate,
      logits_soft_cap=30.0,
      interpret=False,  # compile for `backend` (lowering only: this host has no GPU/TPU)
      backend=backend,
      segment_ids=(q_ids, kv_ids) if with_segments else None,
    )

  def loss(q, k, v, q_ids, kv_ids):
    return jnp.sum(forward(q, k, v, q_ids, kv_ids).astype(jnp.float32))

  return forward, jax.grad(loss, argnums=(0, 1, 2))


def _args(dtype=jnp.bfloat16):
  sds = jax.ShapeDtypeStruct
  return (
    sds((B, T, N, H), dtype),
    sds((B, S, K, H), dtype),
    sds((B, S, K, H), dtype),
    sds((B, T), jnp.int32),
    sds((B, S), jnp.int32),
  )


@pytest.mark.parametrize("with_segments", [False, True])
def test_tpu_mosaic_export_forward_and_backward(with_segments):
  forward, grad = _fns("tpu", with_segments)
  assert lc.tpu_export(forward, *_args()) == 1
  assert lc.tpu_export(grad, *_args()) == 3  # forward (residuals), dQ, dK/dV


@functools.cache
def _ttirs(with_segments):
  forward, grad = _fns("gpu", with_segments)
  return lc.triton_ttir(forward, *_args()), lc.triton_ttir(grad, *_args())


@pytest.mark.parametrize("with_segments", [False, True])
def test_gpu_triton_lowering_to_ttir(with_segments):
  fwd_ttir, grad_ttir = _ttirs(with_segments)
  assert len(fwd_ttir) == 1 and len(grad_ttir) == 3
  for module in fwd_ttir + grad_ttir:
    assert "tt.func" in module and "tt.dot" in module


@pytest.mark.skipif(
  importlib.util.find_spec("triton") is None,
  reason="the `triton` package is not installed (pip install .[triton]); "
  "TTIR -> PTX for sm_90 needs it",
)
def test_gpu_ttir_compiles_to_ptx_sm90():
  for module in _ttirs(True)[1]:
    result = lc.triton_compile(module)
    assert result["ptx_chars"] > 0 and result["cubin_bytes"] > 0
    assert result["shared_bytes"] <= 227 * 1024  # H100/H200 shared memory per block
