"""Ring attention (attnzoo.attention.ring) against dense softmax attention.

The pytest process keeps its default single CPU device, so in-process tests run the ring on a
mesh whose axes have size 1 (the shard_map, custom_vjp and masking code paths, without real
rotation). `test_eight_devices` (marker `multidevice`) runs the ring_multidevice module
in a subprocess with 8 virtual devices (sequence 8; data 2 x sequence 4, also with Explicit axis
types; fsdp 2 x sequence 2 x tensor 2) and asserts on its exit status; its output (shown with
`pytest -s` or on failure) lists the max errors per case.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.attention.dense.ring import ring_attention
from attnzoo.attention.dense.softmax import dot_product_attention
from pallas_kernels import compat
from tests.attention.dense.ring_multidevice import make_inputs
from tests.tolerances import assert_close

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def mesh():
  return compat.make_mesh((1, 1, 1), ("data", "sequence", "tensor"), devices=jax.devices()[:1])


def _grads(fn, q, k, v):
  w = np.random.default_rng(1).standard_normal(q.shape[:-1] + (v.shape[-1],), np.float32)
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize(
  "is_causal, N, K, segments, cap",
  [
    (False, 2, 2, False, None),
    (True, 4, 2, False, None),
    (True, 4, 1, True, 2.0),
    (False, 4, 2, True, None),
  ],
  ids=["mha", "causal_gqa", "causal_mqa_segments_softcap", "gqa_segments"],
)
def test_matches_dense_forward_and_gradients(mesh, is_causal, N, K, segments, cap):
  q, k, v, ids = make_inputs(2, 12, N, K, 8, segments)
  opts = dict(is_causal=is_causal, segment_ids=ids, logits_soft_cap=cap)
  ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, **opts)
  dense = lambda q, k, v: dot_product_attention(q, k, v, implementation="xla", **opts)
  assert_close(jax.jit(ring)(q, k, v), jax.jit(dense)(q, k, v))
  for label, a, b in zip("qkv", _grads(ring, q, k, v), _grads(dense, q, k, v), strict=True):
    assert_close(a, b, grad=True, err_msg=f"d{label}")


def test_fully_masked_rows_give_zeros_and_finite_gradients(mesh):
  q, k, v, _ = make_inputs(1, 8, 2, 2, 4, False)
  q_ids = np.array([[5, 0, 0, 5, 1, 1, 1, 5]], np.int32)  # id 5: no key has it
  kv_ids = np.array([[0, 0, 0, 1, 1, 1, 1, 1]], np.int32)
  ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, segment_ids=(q_ids, kv_ids))
  out = np.asarray(jax.jit(ring)(q, k, v))
  np.testing.assert_array_equal(out[0, [0, 3, 7]], 0.0)
  assert np.all(np.abs(out[0, [1, 2, 4, 5, 6]]) > 0)
  for g in _grads(ring, q, k, v):
    np.testing.assert_array_equal(np.isfinite(g), True)
  np.testing.assert_array_equal(np.asarray(_grads(ring, q, k, v)[0])[0, [0, 3, 7]], 0.0)


def test_bfloat16_matches_dense(mesh):
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in make_inputs(2, 8, 4, 2, 8, False)[:3])
  out = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, is_causal=True))(q, k, v)
  assert out.dtype == jnp.bfloat16
  f32 = (x.astype(jnp.float32) for x in (q, k, v))
  assert_close(out, dot_product_attention(*f32, is_causal=True, implementation="xla"), jnp.bfloat16)


@pytest.mark.parametrize(
  "kwargs, error, message",
  [
    (dict(axis_name="sp"), ValueError, "axis_name='sp' is not an axis"),
    (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap=0.0 must be positive"),
    (dict(segment_ids=np.zeros((2, 5), np.int32)), ValueError, "must have shape (2, 4)"),
    (dict(segment_ids=np.zeros((2, 4), np.float32)), TypeError, "must be integers"),
  ],
)
def test_bad_options_raise(mesh, kwargs, error, message):
  q, k, v, _ = make_inputs(2, 4, 2, 2, 4, False)
  with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
    ring_attention(q, k, v, mesh=mesh, **kwargs)


def test_bad_shapes_raise(mesh):
  q, k, v, _ = make_inputs(2, 4, 3, 2, 4, False)
  with pytest.raises(ValueError, match="N=3 must be a multiple of kv heads K=2"):
    ring_attention(q, k, v, mesh=mesh)


@pytest.mark.multidevice
def test_eight_devices():
  python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=python_path,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  result = subprocess.run(
    [sys.executable, "-m", "tests.attention.dense.ring_multidevice"],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  print(result.stdout)
  assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
