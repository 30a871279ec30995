"""Measuring in this process: the one timing loop of every benchmark, and the benchmark's points.

`time_call` is how every benchmark here (the CPU grid, `experiments.gpu_bench_*`) times a JAX
function: compile and ask XLA for the planned temporaries (a plan over the cap is an "oom"
without running), then the median of `repeats` calls after a warm-up (`experiments.timing`),
forward and forward+backward (gradient of <out, g> for a fixed random g with respect to q, k, v
and the learned params). A failure is a status, never an exception: "oom" (over the cap, or
RESOURCE_EXHAUSTED) or "error", with the reason.

The grid runs the points of one case in a child process that calls `child_main`, which prints
one `RESULT {json}` line per point (see `runner.run_series`).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

from experiments.bench import cases

RESULT = "RESULT "
MODES = ("fwd", "fwdbwd")


def median_seconds(run: Callable[[], object], repeats: int, *, warmup: bool = True) -> float:
  """Median seconds of `repeats` calls of `run`, which must block until its work is done
  (e.g. `lambda: jax.block_until_ready(f(x))`). The warm-up call absorbs compilation."""
  if warmup:
    run()
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_call(
  fn: Callable,
  q,
  k,
  v,
  params=None,
  consts=None,
  *,
  repeats: int,
  backward: bool = True,
  cap_bytes: float | None = None,
) -> dict:
  """Times `fn(q, k, v, params, consts) -> out` forward and forward+backward (see module doc).

  Returns `status` ("ok" | "oom" | "error"), `reason` when not ok, and per mode that ran:
  `<mode>_ms`, `<mode>_compile_s`, `<mode>_temp_mib` (XLA's planned temporaries, None when the
  backend does not say) and `rss_<mode>_mib` (this process's peak RSS so far).
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  params, consts = params or {}, consts or {}
  res: dict = dict(status="ok")
  try:
    out_shape = jax.eval_shape(fn, q, k, v, params, consts)
    g = jax.random.normal(jax.random.key(3), out_shape.shape, jnp.float32)
  except Exception as e:  # noqa: BLE001 (a failed point is recorded, never fatal)
    return _failed(res, "build", e)

  # Everything is an argument, never a closed-over constant that XLA would fold into the program.
  def loss(q, k, v, params, consts, g):
    return jnp.sum(fn(q, k, v, params, consts).astype(jnp.float32) * g)

  modes = [("fwd", jax.jit(fn), (q, k, v, params, consts))]
  if backward:
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    modes.append(("fwdbwd", grad, (q, k, v, params, consts, g)))
  for mode, jitted, args in modes:
    try:
      t0 = time.perf_counter()
      compiled = jitted.lower(*args).compile()
      res[f"{mode}_compile_s"] = time.perf_counter() - t0
      temp = _temp_bytes(compiled)
      res[f"{mode}_temp_mib"] = None if temp is None else temp / 2**20
      if cap_bytes is not None and temp is not None and temp > cap_bytes:
        res.update(
          status="oom",
          reason=f"{mode}: XLA plans {temp / 2**30:.1f} GiB of temporaries > cap "
          f"{cap_bytes / 2**30:.1f} GiB (not run)",
        )
        return res
      seconds = median_seconds(
        lambda compiled=compiled, args=args: jax.block_until_ready(compiled(*args)), repeats
      )
      res[f"{mode}_ms"] = 1e3 * seconds
      res[f"rss_{mode}_mib"] = _rss_mib()
    except Exception as e:  # noqa: BLE001 (OOM / unsupported shape: recorded, not fatal)
      return _failed(res, mode, e)
  return res


def _failed(res: dict, mode: str, e: Exception) -> dict:
  text = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
  oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
  return {**res, "status": "oom" if oom else "error", "reason": f"{mode}: {text}"}


def random_qkv(B, T, N, H, dtype: str, input_scale: float = 1.0):
  """q, k ~ input_scale * N(0, 1) and v ~ N(0, 1), [B, T, N, H] (the conformance suite's rule)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  keys = jax.random.split(jax.random.key(0), 3)
  scales = (input_scale, input_scale, 1.0)
  return tuple(
    (s * jax.random.normal(key, (B, T, N, H), jnp.float32)).astype(dtype)
    for key, s in zip(keys, scales, strict=True)
  )


# ------------------------------------------------------------------ points of the grid


def measure_point(point: dict) -> dict:
  """Measures one grid point in this process; never raises for an expected failure."""
  case = cases.get(point["case"])
  if case.framework == "torch":
    return _measure_torch(case, point)
  B, T, N, H, dtype = point["B"], point["T"], point["N"], point["H"], point["dtype"]
  try:
    built = case.build(B, T, N, H, dtype)
  except cases.Unavailable as e:
    return dict(status="skipped", reason=str(e))
  except Exception as e:  # noqa: BLE001 (a family that cannot build this shape: a row, no crash)
    return _failed(dict(status="ok"), "build", e)
  q, k, v = random_qkv(B, T, N, H, dtype, built.input_scale)
  out = dict(status="ok", rss_base_mib=_rss_mib())
  out.update(
    time_call(
      built.fn,
      q,
      k,
      v,
      built.params,
      built.consts,
      repeats=point["repeats"],
      backward=point["backward"],
      cap_bytes=point["rss_cap_gib"] * 2**30,
    )
  )
  if out["status"] != "ok":
    return out
  if case.scenario == "full" and cases.is_dense_softmax(case.name):
    # Measured beside the point: on a shared machine the load drifts between points.
    out["roofline_gflops"] = measure_matmul(point.get("matmul_n", 2048), dtype, 3)["gflops"]
  if case.reference and T <= point["check_len"]:
    out.update(_check(case, point, built, q, k, v))
  return out


def _check(case, point, built, q, k, v) -> dict:
  """Max abs error relative to the reference's max abs value, of the output and the gradients."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  try:
    ref = cases.get(case.reference).build(
      point["B"], point["T"], point["N"], point["H"], point["dtype"]
    )
  except (cases.Unavailable, KeyError) as e:
    return dict(check=f"no reference: {e}")

  def err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))

  def grads(b):
    g = jax.random.normal(jax.random.key(3), q.shape[:3] + v.shape[-1:], jnp.float32)

    def loss(q, k, v, params):
      return jnp.sum(b.fn(q, k, v, params, b.consts).astype(jnp.float32) * g)

    return jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, b.params))

  def fwd(b):
    return jax.jit(b.fn)(q, k, v, b.params, b.consts)

  res = dict(max_err_fwd=err(fwd(built), fwd(ref)))
  if point["backward"]:
    res["max_err_grad"] = max(err(a, b) for a, b in zip(grads(built), grads(ref), strict=True))
  return res


def _measure_torch(case, point) -> dict:
  try:
    built = case.build(point["B"], point["T"], point["N"], point["H"], point["dtype"])
    import torch  # noqa: PLC0415
  except cases.Unavailable as e:
    return dict(status="skipped", reason=str(e))
  T, B, N, H = point["T"], point["B"], point["N"], point["H"]
  dtype = getattr(torch, point["dtype"])
  gen = torch.Generator().manual_seed(0)
  q, k, v, g = (torch.randn(B, N, T, H, generator=gen).to(dtype) for _ in range(4))
  out = dict(status="ok", rss_base_mib=_rss_mib())

  def fwd():
    with torch.no_grad():
      built.fn(q, k, v, {}, {})

  def fwdbwd():
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    (built.fn(qq, kk, vv, {}, {}).float() * g.float()).sum().backward()

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


def measure_series(
  points: Iterable[dict], measure: Callable[[dict], dict] = measure_point
) -> Iterator[dict]:
  """Yields one result per point (ascending T); after a failure the rest are skipped."""
  failed = None
  for point in points:
    if failed is not None:
      yield dict(status="skipped", reason=failed)
      continue
    res = measure(point)
    if res["status"] == "skipped":
      failed = res.get("reason", "")
    elif res["status"] in ("oom", "error"):
      failed = f"T={point['T']} already hit {res['status']}"
    yield res


def child_main(points_json: str) -> None:
  """The isolated child of `runner.run_series`: one `RESULT {json}` line per point."""
  points = sorted(json.loads(points_json), key=lambda p: p["T"])
  for res in measure_series(points):
    print(RESULT + json.dumps(res), flush=True)
