"""The child side of `experiments.benchmark`: measuring points in this process.

`experiments.benchmark` starts `python -m experiments.benchmark --point=<json>` per case and
dtype; that process calls `measure_series` and prints one `RESULT {json}` line per point.
"""

from __future__ import annotations

import time

from experiments.bench_cases import CASES, Unavailable
from experiments.timing import median_seconds

RESULT = "RESULT "


def measure_point(point: dict) -> dict:
  """Measures one point in this process; never raises for an expected failure."""
  case = CASES[point["case"]]
  if "torch" in case.name:
    return _measure_torch(case, point)
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  T, B, N, H, dtype = point["T"], point["B"], point["N"], point["H"], jnp.dtype(point["dtype"])
  try:
    fn = case.build(T, N, H, point["dtype"])
  except Unavailable as e:
    return dict(status="skipped", reason=str(e))
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(key, (B, T, N, H), jnp.float32).astype(dtype) for key in keys)

  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))

  out = dict(status="ok", rss_base_mib=_rss_mib())
  modes = [("fwd", jax.jit(fn))]
  if point["backward"]:
    modes.append(("fwdbwd", jax.jit(jax.grad(loss, argnums=(0, 1, 2)))))
  cap = point["rss_cap_gib"] * 2**30
  for mode, jitted in modes:
    try:
      t0 = time.perf_counter()
      compiled = jitted.lower(q, k, v).compile()
      out[f"{mode}_compile_s"] = time.perf_counter() - t0
      temp = _temp_bytes(compiled)
      out[f"{mode}_temp_mib"] = None if temp is None else temp / 2**20
      if temp is not None and temp > cap:
        return {
          **out,
          "status": "oom",
          "reason": f"{mode}: XLA plans {temp / 2**30:.1f} GiB of temporaries > cap "
          f"{point['rss_cap_gib']:.1f} GiB (not run)",
        }
      seconds = median_seconds(
        lambda compiled=compiled: jax.block_until_ready(compiled(q, k, v)), point["repeats"]
      )
      out[f"{mode}_ms"] = 1e3 * seconds
      out[f"rss_{mode}_mib"] = _rss_mib()
    except (NotImplementedError, ValueError, TypeError) as e:
      return {**out, "status": "error", "reason": f"{mode}: {type(e).__name__}: {e}"}
  if case.scenario == "full":
    # Measured beside the point: on a shared machine the load drifts between points.
    mm = measure_matmul(point.get("matmul_n", 2048), point["dtype"], 3)
    out["roofline_gflops"] = mm["gflops"]
  if case.reference and T <= point["check_len"]:
    out.update(_check(case, point, fn, loss, q, k, v, g))
  return out


def _check(case, point, fn, loss, q, k, v, g) -> dict:
  """Max abs error relative to the reference's max abs value, of the output and dq/dk/dv."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  try:
    ref_fn = CASES[case.reference].build(point["T"], point["N"], point["H"], point["dtype"])
  except Unavailable as e:
    return dict(check=f"no reference: {e}")

  def ref_loss(q, k, v):
    return jnp.sum(ref_fn(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))

  def err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))

  res = dict(max_err_fwd=err(jax.jit(fn)(q, k, v), jax.jit(ref_fn)(q, k, v)))
  if point["backward"]:
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(q, k, v)
    res["max_err_grad"] = max(err(a, b) for a, b in zip(grads, ref_grads, strict=True))
  return res


def _measure_torch(case, point) -> dict:
  try:
    fn = case.build(point["T"], point["N"], point["H"], point["dtype"])
    import torch  # noqa: PLC0415
  except Unavailable as e:
    return dict(status="skipped", reason=str(e))
  T, B, N, H = point["T"], point["B"], point["N"], point["H"]
  dtype = getattr(torch, point["dtype"])
  gen = torch.Generator().manual_seed(0)
  q, k, v, g = (torch.randn(B, N, T, H, generator=gen).to(dtype) for _ in range(4))
  out = dict(status="ok", rss_base_mib=_rss_mib())

  def fwd():
    with torch.no_grad():
      fn(q, k, v)

  def fwdbwd():
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    (fn(qq, kk, vv).float() * g.float()).sum().backward()

  modes = [("fwd", fwd)] + ([("fwdbwd", fwdbwd)] if point["backward"] else [])
  for mode, run in modes:
    try:
      out[f"{mode}_ms"] = 1e3 * median_seconds(run, point["repeats"])
    except NotImplementedError as e:
      # e.g. torch 2.13's flex_attention has no CPU backward: keep the forward figure.
      out["note"] = f"{mode}: not supported by the peer ({e})"
      break
    out[f"rss_{mode}_mib"] = _rss_mib()
  return out


def measure_matmul(n: int, dtype: str, repeats: int) -> dict:
  """This machine's matmul throughput (the roofline), as XLA reaches it for an n x n product."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(dtype) for i in (0, 1))
  mm = jax.jit(jnp.matmul).lower(a, b).compile()
  seconds = median_seconds(lambda: jax.block_until_ready(mm(a, b)), max(3, repeats))
  return dict(n=n, dtype=dtype, gflops=2 * n**3 / seconds / 1e9)


def _temp_bytes(compiled) -> int | None:
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except (AttributeError, NotImplementedError, TypeError):
    return None


def _rss_mib() -> float:
  import resource  # noqa: PLC0415

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_series(points: list[dict]):
  """Yields one result per point (ascending T); after a failure the rest are skipped."""
  failed = None
  for point in points:
    if failed is not None:
      yield dict(status="skipped", reason=failed)
      continue
    res = measure_point(point)
    if res["status"] == "skipped":
      failed = res.get("reason", "")
    elif res["status"] in ("oom", "error"):
      failed = f"T={point['T']} already hit {res['status']}"
    yield res
