"""Ring attention on 8 virtual CPU devices, compared with dense softmax attention.

Run by tests/attention/test_ring.py in a subprocess (the pytest process keeps one device):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m tests.attention.dense.ring_multidevice

Prints one line per case with the max forward / gradient errors and exits non-zero if any case
misses tests/tolerances.py (or a bad input fails to raise).
"""

from __future__ import annotations

import sys
import time
from typing import NamedTuple

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attnzoo.attention.dense.ring import ring_attention  # noqa: E402
from attnzoo.attention.dense.softmax import dot_product_attention  # noqa: E402
from pallas_kernels import compat  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402


class Case(NamedTuple):
  mesh_axes: dict[str, int]
  B: int
  T: int
  N: int
  K: int
  is_causal: bool
  segments: bool = False
  logits_soft_cap: float | None = None
  explicit_axes: bool = False  # jax.make_mesh's default axis type (inputs must be resharded)
  H: int = 8


CASES = {
  "seq8_mha": Case({"sequence": 8}, B=1, T=32, N=2, K=2, is_causal=False),
  "seq8_causal_gqa": Case({"sequence": 8}, B=1, T=32, N=4, K=2, is_causal=True),
  "seq8_causal_mqa_segments_softcap": Case(
    {"sequence": 8}, B=2, T=32, N=4, K=1, is_causal=True, segments=True, logits_soft_cap=3.0
  ),
  "data2_seq4_causal_gqa_segments": Case(
    {"data": 2, "sequence": 4}, B=2, T=32, N=4, K=2, is_causal=True, segments=True
  ),
  "data2_seq4_explicit_axes": Case(
    {"data": 2, "sequence": 4}, B=2, T=16, N=2, K=2, is_causal=True, explicit_axes=True
  ),
  "fsdp2_seq2_tensor2_causal_gqa": Case(
    {"fsdp": 2, "sequence": 2, "tensor": 2}, B=2, T=16, N=4, K=2, is_causal=True
  ),
}


def make_inputs(B, T, N, K, H, segments, seed=0):
  # numpy, not jax.random: every new shape would compile a fresh threefry kernel.
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((B, T, n, H), np.float32) for n in (N, K, K))
  if not segments:
    return q, k, v, None
  # Packed documents crossing shard boundaries; query 0 of row 0 gets an id no key has, so its
  # row is fully masked (zeros, finite gradients).
  kv_ids = np.sort(rng.integers(0, 3, (B, T), np.int32), axis=1)
  q_ids = kv_ids.copy()
  q_ids[0, 0] = 7
  return q, k, v, (q_ids, kv_ids)


def run_case(name: str, case: Case) -> list[str]:
  axes, B, T, N, K, is_causal, segments, cap, explicit, H = case
  if explicit:
    mesh = jax.make_mesh(tuple(axes.values()), tuple(axes))
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,) * len(axes), mesh.axis_types
  else:
    mesh = compat.make_mesh(tuple(axes.values()), tuple(axes))
  q, k, v, ids = make_inputs(B, T, N, K, H, segments)
  # A fixed random cotangent, so every output element matters to the gradients.
  w = np.random.default_rng(1).standard_normal((B, T, N, H), np.float32)
  opts = dict(is_causal=is_causal, segment_ids=ids, logits_soft_cap=cap)

  def ring(q, k, v):
    return ring_attention(q, k, v, mesh=mesh, **opts)

  def dense(q, k, v):
    return dot_product_attention(q, k, v, implementation="xla", **opts)

  def grads(fn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))

  # Inputs arrive sharded on batch and sequence, as the model would pass them.
  batch = tuple(a for a in ("data", "fsdp") if a in axes) or None
  q_s, k_s, v_s = jax.device_put((q, k, v), NamedSharding(mesh, P(batch, "sequence")))
  start = time.perf_counter()
  out = jax.jit(ring)(q_s, k_s, v_s)
  d_ring = grads(ring)(q_s, k_s, v_s)
  seconds = time.perf_counter() - start
  out_ref = jax.jit(dense)(q, k, v)
  d_dense = grads(dense)(q, k, v)

  failures = []

  def check(assertion, *args, **kwargs):
    try:
      assertion(*args, **kwargs)
    except AssertionError as e:
      failures.append(str(e))

  out_sharding = out.sharding
  out, out_ref, d_ring, d_dense = jax.tree.map(np.asarray, (out, out_ref, d_ring, d_dense))
  errors = [float(np.max(np.abs(out - out_ref)))]
  check(assert_close, out, out_ref, err_msg=f"{name}: out")
  for label, actual, expected in zip(("dq", "dk", "dv"), d_ring, d_dense, strict=True):
    errors.append(float(np.max(np.abs(actual - expected))))
    check(assert_close, actual, expected, grad=True, err_msg=f"{name}: {label}")
    check(np.testing.assert_array_equal, np.isfinite(actual), True, err_msg=f"{name}: {label}")
  if segments:  # the fully masked query row
    check(np.testing.assert_array_equal, out[0, 0], 0.0, err_msg=f"{name}: masked row")
  expected_spec = P(batch, "sequence", "tensor" if "tensor" in axes else None, None)
  if not out_sharding.is_equivalent_to(NamedSharding(mesh, expected_spec), out.ndim):
    failures.append(f"{name}: output sharding {out_sharding.spec} != {expected_spec}")
  print(
    f"{name:34s} max|err| out {errors[0]:.1e} dq {errors[1]:.1e} dk {errors[2]:.1e} "
    f"dv {errors[3]:.1e}  ({seconds:.1f}s)",
    flush=True,
  )
  return failures


def check_bad_inputs() -> list[str]:
  """Each bad input must raise a ValueError whose message names the problem."""
  mesh = compat.make_mesh((2, 2, 2), ("data", "sequence", "tensor"))
  ok = dict(B=2, T=8, N=4, K=2)
  bad = {
    "T=7 is not divisible": dict(ok, T=7),
    "B=1 is not divisible": dict(ok, B=1),
    "K=1 are not divisible": dict(ok, N=2, K=1),
  }
  failures = []
  for message, shape in bad.items():
    q, k, v, _ = make_inputs(shape["B"], shape["T"], shape["N"], shape["K"], 4, False)
    try:
      ring_attention(q, k, v, mesh=mesh)
      failures.append(f"no error for {shape} (expected {message!r})")
    except ValueError as e:
      if message not in str(e):
        failures.append(f"error for {shape} does not say {message!r}: {e}")
  print(f"{'bad inputs':34s} {len(bad) - len(failures)}/{len(bad)} raise the expected ValueError")
  return failures


def main() -> int:
  if jax.device_count() < 8:
    print(
      f"needs 8 devices, got {jax.device_count()}; set "
      "XLA_FLAGS=--xla_force_host_platform_device_count=8",
      file=sys.stderr,
    )
    return 2
  failures = check_bad_inputs()
  for name, case in CASES.items():
    failures += run_case(name, case)
  for f in failures:
    print("FAIL", f)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
