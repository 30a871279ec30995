"""The one runner of the benchmarks: series of points, isolated or in-process, and the CPU grid.

`run_series` measures the points of one case and dtype in ascending T. Isolated (the CPU grid's
default), they run in one child process, so the child's `ru_maxrss` after a point is that point's
peak (every path needs more memory at a longer T, and nothing else runs in the child); a watchdog
kills a child whose RSS passes the cap (marked "oom") or that runs past `timeout_s` per point
("timeout"). In-process (tests, the GPU scripts: device memory is not RSS, and an
out-of-memory error is an exception there), any `measure(point) -> result` may be given. Either
way a point that fails stops the series: longer points are marked skipped.

`run_grid` is the CPU grid: every (case, T, dtype) point plus the matmul roofline, with ratios
against the baseline (`softmax/xla:full`) and same-scenario peers measured in the same run.
Model FLOPs of dense softmax: 4·B·N·T²·H forward, 3× that forward + backward (two matmuls
forward, four backward).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from experiments.bench import cases, measure

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CHILD = "import sys; from experiments.bench.measure import child_main; child_main(sys.argv[1])"


def run_series(
  points: list[dict],
  *,
  isolate: bool,
  timeout_s: float = 300.0,
  measure_fn: Callable[[dict], dict] | None = None,
) -> list[dict]:
  """Measures points in ascending T (see the module docstring); returns point + result dicts.

  `timeout_s` (per point) applies to an isolated child. `measure_fn` (in-process only)
  defaults to `measure.measure_point` (a grid case by name).
  """
  points = sorted(points, key=lambda p: p["T"])
  if not isolate:
    done = measure.measure_series(points, measure_fn or measure.measure_point)
    return [{**p, **r} for p, r in zip(points, done, strict=True)]
  if measure_fn is not None:
    raise ValueError("measure_fn runs in this process only; pass isolate=False with it")
  proc = subprocess.Popen(
    [sys.executable, "-c", _CHILD, json.dumps(points)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=_REPO_ROOT,
  )
  lines: list[str] = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
  reader.start()
  status, reason, peak = None, "", 0.0
  start = time.monotonic()
  cap_mib = points[0]["rss_cap_gib"] * 1024
  while proc.poll() is None:
    rss = _proc_rss_mib(proc.pid)
    peak = max(peak, rss)
    if rss > cap_mib:
      status, reason = "oom", f"resident memory {rss / 1024:.1f} GiB > cap {cap_mib / 1024:.1f} GiB"
    elif time.monotonic() - start > timeout_s * len(points):
      status, reason = "timeout", f"series still running after {timeout_s * len(points):.0f} s"
    if status:
      proc.kill()
      break
    time.sleep(0.05)
  _, stderr = proc.communicate()
  reader.join(timeout=5)
  done = [json.loads(ln[len(measure.RESULT) :]) for ln in lines if ln.startswith(measure.RESULT)]
  results = [{**p, **r} for p, r in zip(points[: len(done)], done, strict=True)]
  rest = points[len(done) :]
  if rest:
    if status is None:
      tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
      status, reason = "error", f"exit {proc.returncode}: {tail[:300]}"
    results.append({**rest[0], "status": status, "reason": reason, "rss_peak_seen_mib": peak})
    results += [
      {**p, "status": "skipped", "reason": f"T={rest[0]['T']} already hit {status}"}
      for p in rest[1:]
    ]
  return results


def _proc_rss_mib(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


# ------------------------------------------------------------------ the CPU grid


def run_grid(
  case_names,
  peers,
  lengths,
  dtypes,
  *,
  batch=1,
  heads=8,
  head_dim=64,
  repeats=3,
  backward=True,
  isolate=True,
  rss_cap_gib=8.0,
  timeout_s=300.0,
  check_len=1024,
  interpret_max_len=None,
  matmul_n=2048,
  log=print,
) -> dict:
  """Measures every (case, T, dtype) point plus the roofline; returns the results document.

  `interpret_max_len` caps T for correctness-only (interpreter) cases below their own cap.
  """
  catalogue = cases.all_cases()
  names = list(dict.fromkeys([cases.BASELINE, *case_names, *peers]))
  unknown = [n for n in names if n not in catalogue]
  if unknown:
    raise ValueError(f"unknown cases {unknown}; valid: {sorted(catalogue)}")
  doc = dict(
    config=dict(
      batch=batch,
      heads=heads,
      head_dim=head_dim,
      repeats=repeats,
      backward=backward,
      rss_cap_gib=rss_cap_gib,
      timeout_s=timeout_s,
      lengths=[int(t) for t in lengths],
      dtypes=list(dtypes),
      machine=machine(),
    ),
    roofline={},
    points=[],
  )
  for dtype in dtypes:
    mm = _run_matmul(matmul_n, dtype, repeats, isolate, timeout_s)
    doc["roofline"][dtype] = mm
    log(f"[benchmark] matmul roofline {dtype}: {mm.get('gflops', float('nan')):.1f} GFLOP/s")
  for dtype in dtypes:
    for name in names:
      case = catalogue[name]
      max_len = case.max_len
      if case.correctness_only and interpret_max_len is not None:
        max_len = min(max_len, interpret_max_len)
      points = [
        dict(
          case=name,
          T=int(T),
          dtype=dtype,
          B=batch,
          N=heads,
          H=head_dim,
          repeats=repeats,
          backward=backward,
          rss_cap_gib=rss_cap_gib,
          check_len=check_len,
          matmul_n=matmul_n,
          correctness_only=case.correctness_only,
        )
        for T in lengths
      ]
      why_not = case.skip or missing_module(case.requires)
      runnable = [p for p in points if p["T"] <= max_len and not why_not]
      results = run_series(runnable, isolate=isolate, timeout_s=timeout_s) if runnable else []
      for p in points:
        if why_not:
          results.append({**p, "status": "skipped", "reason": why_not})
        elif p["T"] > max_len:
          results.append(
            {**p, "status": "skipped", "reason": f"T > {max_len} for this path in this run"}
          )
      results.sort(key=lambda r: r["T"])
      doc["points"] += results
      for res in results:
        if res["status"] != "skipped":
          log(f"[benchmark] {name} T={res['T']} {dtype}: {one_line(res)}")
      reasons = {r["reason"] for r in results if r["status"] == "skipped"}
      if reasons:
        log(f"[benchmark] skipped {name} at some or all T: {'; '.join(sorted(reasons))}")
  add_ratios(doc)
  return doc


def missing_module(module: str) -> str:
  """ "" when `module` imports (or none is required), else the reason to skip."""
  if not module:
    return ""
  import importlib.util  # noqa: PLC0415

  try:
    found = importlib.util.find_spec(module) is not None
  except ImportError:
    found = False
  if found:
    return ""
  if module == "torch":
    return cases.TORCH_MISSING
  return f"{module} is not importable"


def _run_matmul(n, dtype, repeats, isolate, timeout_s) -> dict:
  if not isolate:
    return measure.measure_matmul(n, dtype, repeats)
  code = (
    "import json; from experiments.bench.measure import RESULT, measure_matmul; "
    f"print(RESULT + json.dumps(measure_matmul({n}, {dtype!r}, {repeats})))"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=timeout_s,
    cwd=_REPO_ROOT,
  )
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(measure.RESULT)]
  return json.loads(lines[-1][len(measure.RESULT) :]) if lines else dict(error=proc.stderr[-300:])


def machine() -> dict:
  import platform  # noqa: PLC0415

  import jax  # noqa: PLC0415

  return dict(
    cpu_count=os.cpu_count(),
    platform=platform.platform(),
    jax=jax.__version__,
    backend=jax.default_backend(),
    device=str(jax.devices()[0].device_kind),
    python=platform.python_version(),
  )


def one_line(res: dict) -> str:
  if res["status"] != "ok":
    return f"{res['status'].upper()} ({res.get('reason', '')})"
  parts = [f"fwd {res['fwd_ms']:.1f} ms"]
  if "fwdbwd_ms" in res:
    parts.append(f"fwd+bwd {res['fwdbwd_ms']:.1f} ms")
  if res.get("rss_fwdbwd_mib") or res.get("rss_fwd_mib"):
    parts.append(f"peak RSS {res.get('rss_fwdbwd_mib') or res['rss_fwd_mib']:.0f} MiB")
  if "max_err_fwd" in res:
    parts.append(f"rel err {res['max_err_fwd']:.1e}/{res.get('max_err_grad', float('nan')):.1e}")
  return ", ".join(parts)


def dense_flops(res: dict, mode: str) -> float:
  """Model FLOPs of dense softmax attention at a point (see module docstring)."""
  fwd = 4 * res["B"] * res["N"] * res["T"] * res["T"] * res["H"]
  return fwd if mode == "fwd" else 3 * fwd


def _scenario(case_name: str) -> str:
  return case_name.rsplit(":", 1)[-1]


def _is_peer(case_name: str) -> bool:
  return case_name.startswith("peer:")


def add_ratios(doc: dict) -> None:
  """Adds speed-up vs baseline and peers, and the roofline fraction of dense softmax, in place.

  Reads only the document (scenario and peer-ness from the case names), so a saved run can be
  re-annotated without the registry that produced it.
  """
  ok = [p for p in doc["points"] if p["status"] == "ok"]
  by_key = {(p["case"], p["T"], p["dtype"]): p for p in ok}
  peer_names = list(dict.fromkeys(p["case"] for p in ok if _is_peer(p["case"])))
  for p in ok:
    scenario = _scenario(p["case"])
    base = by_key.get((cases.BASELINE, p["T"], p["dtype"]))
    for mode in measure.MODES:
      if f"{mode}_ms" not in p:
        continue
      if base and f"{mode}_ms" in base:
        p[f"{mode}_speedup_vs_baseline"] = base[f"{mode}_ms"] / p[f"{mode}_ms"]
        for mem in (f"rss_{mode}_mib", f"{mode}_temp_mib"):
          if base.get(mem) and p.get(mem):
            p[mem.replace("_mib", "_vs_baseline")] = p[mem] / base[mem]
      roofline = p.get("roofline_gflops", doc["roofline"].get(p["dtype"], {}).get("gflops"))
      if scenario == "full" and cases.is_dense_softmax(p["case"]) and roofline:
        achieved = dense_flops(p, mode) / (p[f"{mode}_ms"] / 1e3) / 1e9
        p[f"{mode}_roofline_fraction"] = achieved / roofline
      if _is_peer(p["case"]):
        continue
      for peer in peer_names:
        other = by_key.get((peer, p["T"], p["dtype"]))
        if _scenario(peer) == scenario and other and f"{mode}_ms" in other:
          p.setdefault(f"{mode}_vs_peer", {})[peer] = other[f"{mode}_ms"] / p[f"{mode}_ms"]
