r"""Speed and memory of attention implementations over sequence length, with peers side by side.

    python -m experiments.benchmark --lengths=1024,2048,4096 --out=results/bench
    python -m experiments.benchmark --cases=softmax/xla:full,linear/chunked:causal --dtypes=bfloat16
    python -m experiments.benchmark --platform=gpu      # the colleagues' GPU kernel benchmarks

The points of one case and dtype run in their own subprocess (`--isolate`, default), in ascending
T, so the child's `ru_maxrss` after a point is that point's peak (every path needs more memory at a
longer T, and nothing else runs in the child); a watchdog kills a child whose RSS passes
`--rss_cap_gib` (marked "oom") or that runs past `--timeout_s` per point ("timeout"), and the
longer points of that case are then skipped. Before running a point, the child asks XLA for the
compiled program's temporary buffer size and marks the point "oom" without running it when the
plan alone exceeds the cap. Times are the median of `--repeats` runs after a
compile-and-warm-up call (`block_until_ready`), forward and forward+backward (gradient of
<out, g> for a fixed random g with respect to q, k, v).

Figures that travel across machines are ratios: each time against the baseline
(`softmax/xla:full`, dense XLA softmax) measured in the same run, each attnzoo time against the
peers of the same mask (`jax.nn.dot_product_attention`, torch SDPA / flex_attention when torch is
installed), and dense-softmax throughput as a fraction of this machine's matmul FLOP/s measured in
the same process right after the point (the roofline; a shared machine's load drifts). Model
FLOPs of dense softmax: 4·B·N·T²·H forward, 3× that forward + backward (two matmuls forward,
four backward).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

from absl import app, flags

from experiments import bench_cases
from experiments.bench_cases import BASELINE, CASES
from experiments.bench_measure import RESULT as _RESULT
from experiments.bench_measure import measure_matmul, measure_series

FLAGS = flags.FLAGS


# ------------------------------------------------------------------ a series (in the parent)


def run_series(points: list[dict], *, isolate: bool, timeout_s: float, log=print) -> list[dict]:
  """Measures points of one case and dtype in ascending T, in one guarded subprocess.

  `ru_maxrss` only grows within a process, so the peak reported at T is the peak over the series
  up to T; every path here needs more memory at a longer T, so that is the peak at T. A point that
  runs out of memory or time stops the series: longer points are marked skipped.
  """
  points = sorted(points, key=lambda p: p["T"])
  if not isolate:
    return [{**p, **r} for p, r in zip(points, measure_series(points), strict=True)]
  cmd = [sys.executable, "-m", "experiments.benchmark", f"--point={json.dumps(points)}"]
  proc = subprocess.Popen(
    cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=_repo_root()
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
  done = [json.loads(ln[len(_RESULT) :]) for ln in lines if ln.startswith(_RESULT)]
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


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ the grid


def run_grid(
  cases,
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
  names = list(dict.fromkeys([BASELINE, *cases, *peers]))
  unknown = [n for n in names if n not in CASES]
  if unknown:
    raise ValueError(f"unknown cases {unknown}; valid: {sorted(CASES)}")
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
      machine=_machine(),
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
      case = CASES[name]
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
        )
        for T in lengths
      ]
      missing = _missing_module(case.requires)
      runnable = [p for p in points if p["T"] <= max_len and not missing]
      results = run_series(runnable, isolate=isolate, timeout_s=timeout_s) if runnable else []
      for p in points:
        if missing:
          results.append({**p, "status": "skipped", "reason": missing})
        elif p["T"] > max_len:
          results.append(
            {**p, "status": "skipped", "reason": f"T > {max_len} for this path in this run"}
          )
      results.sort(key=lambda r: r["T"])
      doc["points"] += results
      for res in results:
        if res["status"] != "skipped":
          log(f"[benchmark] {name} T={res['T']} {dtype}: {_one_line(res)}")
      reasons = {r["reason"] for r in results if r["status"] == "skipped"}
      if reasons:
        log(f"[benchmark] skipped {name} at some or all T: {'; '.join(sorted(reasons))}")
  add_ratios(doc)
  return doc


def _missing_module(module: str) -> str:
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
    return "torch is not installed (optional `bench` extra: pip install 'attnzoo[bench]')"
  return f"{module} is not importable yet"


def _run_matmul(n, dtype, repeats, isolate, timeout_s) -> dict:
  if not isolate:
    return measure_matmul(n, dtype, repeats)
  code = (
    "import json,sys; from experiments.bench_measure import measure_matmul; "
    f"print({_RESULT!r} + json.dumps(measure_matmul({n}, {dtype!r}, {repeats})))"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=timeout_s,
    cwd=_repo_root(),
  )
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
  return json.loads(lines[-1][len(_RESULT) :]) if lines else dict(error=proc.stderr[-300:])


def _machine() -> dict:
  import platform  # noqa: PLC0415

  import jax  # noqa: PLC0415

  return dict(
    cpu_count=os.cpu_count(),
    platform=platform.platform(),
    jax=jax.__version__,
    backend=jax.default_backend(),
    python=platform.python_version(),
  )


def _one_line(res: dict) -> str:
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


def add_ratios(doc: dict) -> None:
  """Adds speed-up vs baseline and peers, and the roofline fraction of dense softmax, in place."""
  by_key = {(p["case"], p["T"], p["dtype"]): p for p in doc["points"] if p["status"] == "ok"}
  for p in doc["points"]:
    if p["status"] != "ok":
      continue
    case = CASES[p["case"]]
    base = by_key.get((BASELINE, p["T"], p["dtype"]))
    for mode in ("fwd", "fwdbwd"):
      if f"{mode}_ms" not in p:
        continue
      if base and f"{mode}_ms" in base:
        p[f"{mode}_speedup_vs_baseline"] = base[f"{mode}_ms"] / p[f"{mode}_ms"]
        for mem in (f"rss_{mode}_mib", f"{mode}_temp_mib"):
          if base.get(mem) and p.get(mem):
            p[mem.replace("_mib", "_vs_baseline")] = p[mem] / base[mem]
      roofline = p.get("roofline_gflops", doc["roofline"].get(p["dtype"], {}).get("gflops"))
      if case.scenario == "full" and roofline:
        achieved = dense_flops(p, mode) / (p[f"{mode}_ms"] / 1e3) / 1e9
        p[f"{mode}_roofline_fraction"] = achieved / roofline
      if not case.peer:
        for peer_name, peer in CASES.items():
          other = by_key.get((peer_name, p["T"], p["dtype"]))
          if peer.peer and peer.scenario == case.scenario and other and f"{mode}_ms" in other:
            p.setdefault(f"{mode}_vs_peer", {})[peer_name] = other[f"{mode}_ms"] / p[f"{mode}_ms"]


# ------------------------------------------------------------------ reporting


def to_markdown(doc: dict) -> str:
  """One row per point; ratios are speed-ups (> 1 = faster than the baseline / peer)."""
  cfg = doc["config"]
  lines = [
    f"B={cfg['batch']}, N={cfg['heads']}, H={cfg['head_dim']}, median of {cfg['repeats']} "
    f"runs; machine: {cfg['machine']['cpu_count']} CPUs, {cfg['machine']['backend']}, "
    f"jax {cfg['machine']['jax']}. Matmul roofline: "
    + ", ".join(
      f"{d} {r.get('gflops', float('nan')):.0f} GFLOP/s" for d, r in doc["roofline"].items()
    )
    + ".",
    "Speed-ups are baseline time / time (baseline: `softmax/xla:full`, same run); "
    "'vs peer' is peer time / attnzoo time; '% roofline' is dense-softmax model FLOP/s over "
    "the matmul FLOP/s measured right after the point in the same process (the run-level "
    "figure above is for reference). Memory: XLA's planned temporaries and the child's peak "
    "RSS.",
    "",
    "| case | dtype | T | fwd ms | fwd × base | fwd+bwd ms | f+b × base | XLA temp MiB f / f+b"
    " | f+b temp / base | peak RSS MiB | % roofline f / f+b | vs peers (f+b, else fwd) | note |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for p in doc["points"]:
    if p["status"] == "skipped":
      continue
    case = CASES[p["case"]]
    note = "interpreter: correctness only" if case.correctness_only else ""
    if p["status"] != "ok":
      lines.append(
        f"| {p['case']} | {p['dtype']} | {p['T']} | {p['status'].upper()} | | | | | | "
        f"{_f(p.get('rss_peak_seen_mib'), 0)} | | | {p.get('reason', '')} |"
      )
      continue
    if p.get("note"):
      note = (note + "; " if note else "") + p["note"]
    if "max_err_fwd" in p:
      note = (note + "; " if note else "") + (
        f"rel err {p['max_err_fwd']:.0e} / grad {p.get('max_err_grad', float('nan')):.1e}"
      )
    mode = "fwdbwd" if "fwdbwd_vs_peer" in p else "fwd"
    peers = ", ".join(
      f"{n.split(':')[1]} {r:.2f}×" for n, r in p.get(f"{mode}_vs_peer", {}).items()
    )
    roof = (
      f"{_pct(p.get('fwd_roofline_fraction'))} / {_pct(p.get('fwdbwd_roofline_fraction'))}"
      if "fwd_roofline_fraction" in p
      else ""
    )
    rss = p.get("rss_fwdbwd_mib") or p.get("rss_fwd_mib")
    lines.append(
      f"| {p['case']} | {p['dtype']} | {p['T']} | {_f(p.get('fwd_ms'))} | "
      f"{_f(p.get('fwd_speedup_vs_baseline'), 2)} | {_f(p.get('fwdbwd_ms'))} | "
      f"{_f(p.get('fwdbwd_speedup_vs_baseline'), 2)} | {_f(p.get('fwd_temp_mib'), 0)} / "
      f"{_f(p.get('fwdbwd_temp_mib'), 0)} | {_f(p.get('fwdbwd_temp_vs_baseline'), 3)} | "
      f"{_f(rss, 0)} | {roof} | {peers} | {note} |"
    )
  skipped = {}
  for p in doc["points"]:
    if p["status"] == "skipped":
      skipped.setdefault(p["case"], p["reason"])
  if skipped:
    lines += ["", "Skipped: " + "; ".join(f"`{n}` ({r})" for n, r in skipped.items())]
  return "\n".join(lines) + "\n"


def _f(x, digits=1) -> str:
  return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x) -> str:
  return "" if x is None else f"{100 * x:.0f}%"


def write(doc: dict, out_prefix: str) -> tuple[str, str]:
  os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
  with open(out_prefix + ".json", "w") as f:
    json.dump(doc, f, indent=1)
  with open(out_prefix + ".md", "w") as f:
    f.write(to_markdown(doc))
  return out_prefix + ".json", out_prefix + ".md"


# ------------------------------------------------------------------ entry point


def _run_gpu(out_prefix: str, dry_run: bool = False) -> None:
  """Delegates to the GPU kernel benchmarks (imported lazily: they need a GPU and triton)."""
  import importlib  # noqa: PLC0415

  for module in ("experiments.gpu_bench_block_sparse", "experiments.gpu_bench_linear"):
    try:
      mod = importlib.import_module(module)
    except ImportError as e:
      print(f"[benchmark] skip {module}: not importable ({e})")
      continue
    entry = getattr(mod, "run", None)
    if entry is None:
      print(f"[benchmark] skip {module}: it has no run(out_prefix, dry_run=...) function")
      continue
    prefix = f"{out_prefix}_{module.rsplit('.', 1)[1]}"
    entry(prefix, dry_run=dry_run)
    print(f"[benchmark] {module}: wrote {prefix}.json and {prefix}.md")


def _define_flags() -> None:
  """Flags of the command line only: importing this module (reproduce, tests) defines none."""
  flags.DEFINE_list("cases", list(bench_cases.DEFAULT_CASES), "attnzoo cases (see bench_cases).")
  flags.DEFINE_list("peers", list(bench_cases.DEFAULT_PEERS), "peer cases; [] for none.")
  flags.DEFINE_list("lengths", ["1024", "2048", "4096"], "sequence lengths T (= S).")
  flags.DEFINE_list("dtypes", ["float32"], "input dtypes.")
  flags.DEFINE_integer("batch", 1, "B.")
  flags.DEFINE_integer("heads", 8, "N (= K: no grouping).")
  flags.DEFINE_integer("head_dim", 64, "H (= Hv).")
  flags.DEFINE_integer("repeats", 3, "timed runs per point (median).")
  flags.DEFINE_bool("backward", True, "also time forward+backward.")
  flags.DEFINE_bool("isolate", True, "one subprocess per case and dtype (own peak RSS).")
  flags.DEFINE_float("rss_cap_gib", 8.0, "kill a point above this resident memory (marked oom).")
  flags.DEFINE_float("timeout_s", 300.0, "kill a point after this many seconds (marked timeout).")
  flags.DEFINE_integer("check_len", 1024, "check outputs against the reference up to this T.")
  flags.DEFINE_string("out", "results/benchmark", "output prefix: writes <out>.json and <out>.md.")
  flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"], "gpu: run the GPU kernel benchmarks.")
  flags.DEFINE_bool("gpu_dry_run", False, "with --platform=gpu: tiny interpret-mode runs (CPU).")
  flags.DEFINE_string(
    "point", None, "internal: JSON list of points (one case, ascending T) to measure."
  )


def main(argv):
  del argv
  if FLAGS.point is not None:
    points = sorted(json.loads(FLAGS.point), key=lambda p: p["T"])
    for res in measure_series(points):
      print(_RESULT + json.dumps(res), flush=True)
    return
  if FLAGS.platform == "gpu":
    _run_gpu(FLAGS.out, FLAGS.gpu_dry_run)
    return
  doc = run_grid(
    FLAGS.cases,
    FLAGS.peers,
    FLAGS.lengths,
    FLAGS.dtypes,
    batch=FLAGS.batch,
    heads=FLAGS.heads,
    head_dim=FLAGS.head_dim,
    repeats=FLAGS.repeats,
    backward=FLAGS.backward,
    isolate=FLAGS.isolate,
    rss_cap_gib=FLAGS.rss_cap_gib,
    timeout_s=FLAGS.timeout_s,
    check_len=FLAGS.check_len,
  )
  paths = write(doc, FLAGS.out)
  print(f"[benchmark] wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
