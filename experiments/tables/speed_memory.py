"""Speed and memory against sequence length (the shape of Lightning Attention-2 Table 1 and of the
neighborhood-attention memory comparisons), measured by `experiments.benchmark` on this machine.

Papers: Qin et al., "Lightning Attention-2", arXiv 2401.04658, Table 1 (time and memory of
attention vs sequence length: linear for lightning, quadratic for softmax); Hassani et al.,
"Neighborhood Attention Transformer" / "Faster Neighborhood Attention", arXiv 2403.04690 (memory
of NA stays linear in the token count). The papers' absolute numbers are GPU numbers and are not
comparable with a CPU; the comparable figures are ratios measured in the same run and growth
exponents: the slope of log(time or memory) against log(T), fitted over the points that ran. The
"paper" column is the exponent the algorithm has (2 = quadratic, 1 = linear); "ours" is the fit.
Memory exponent: XLA's planned temporaries of forward+backward (deterministic), not RSS (which
carries the ~0.3 GiB of the runtime). Not an exact table: no ✓/✗.
"""

from __future__ import annotations

import math
import os

import numpy as np

from experiments.bench import cases as bench_cases
from experiments.bench import runner, table
from experiments.tables import common

NAME = "speed_memory"
TITLE = "Speed and memory vs sequence length (CPU; ratios and growth exponents)"

_ALL_CASES = bench_cases.PAPER_CASES
SIZES = {
  # The default command: a few minutes on an idle 2-core CPU.
  "quick": dict(
    lengths=[1024, 2048, 4096],
    heads=4,
    head_dim=64,
    repeats=3,
    cases=_ALL_CASES,
    interpret_max_len=1024,
    rss_cap_gib=6.0,
    timeout_s=240.0,
  ),
  # The sweep: 1k..16k for every path, 64k for the O(T) ones (others stop by max_len).
  "all": dict(
    lengths=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
    heads=8,
    head_dim=64,
    repeats=5,
    cases=_ALL_CASES,
    interpret_max_len=2048,
    rss_cap_gib=8.0,
    timeout_s=600.0,
  ),
  # Tests: seconds, in-process.
  "smoke": dict(
    lengths=[64, 128],
    heads=1,
    head_dim=16,
    repeats=1,
    backward=False,
    cases=("softmax/xla:full", "softmax/chunked:full"),
    interpret_max_len=64,
    rss_cap_gib=4.0,
    timeout_s=120.0,
    isolate=False,
    matmul_n=256,
    peers=("peer:jax.nn:full",),
  ),
}


def growth_exponent(lengths, values) -> float | None:
  """Least-squares slope of log(value) on log(T); None with fewer than two points."""
  pts = [(t, v) for t, v in zip(lengths, values, strict=True) if v is not None and v > 0]
  if len(pts) < 2:
    return None
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def exponents(doc: dict) -> list[dict]:
  catalogue = bench_cases.all_cases()
  rows = []
  for name in dict.fromkeys(p["case"] for p in doc["points"]):
    case = catalogue[name]
    pts = [p for p in doc["points"] if p["case"] == name and p["status"] == "ok"]
    if not pts:
      continue
    ts = [p["T"] for p in pts]
    rows.append(
      dict(
        case=name,
        lengths=ts,
        expected_time=case.time_exponent,
        expected_memory=case.memory_exponent,
        time_fwd=growth_exponent(ts, [p.get("fwd_ms") for p in pts]),
        time_fwdbwd=growth_exponent(ts, [p.get("fwdbwd_ms") for p in pts]),
        memory=growth_exponent(ts, [p.get("fwdbwd_temp_mib", p.get("fwd_temp_mib")) for p in pts]),
        correctness_only=case.correctness_only,
        peer=case.peer,
        failed=[
          f"T={p['T']}: {p['status']}"
          for p in doc["points"]
          if p["case"] == name and p["status"] in ("oom", "timeout", "error")
        ],
      )
    )
  return rows


def run(results_dir: str, size: str = "quick", log=print) -> str:
  cfg = dict(SIZES[size])
  cases = cfg.pop("cases")
  peers = cfg.pop("peers", bench_cases.default_peers())
  lengths = cfg.pop("lengths")
  doc = runner.run_grid(cases, peers, lengths, ["float32"], log=log, **cfg)
  doc["exponents"] = exponents(doc)
  doc["size"] = size
  common.write_json(results_dir, NAME, doc)
  text = "\n".join(
    [
      f"# {TITLE}",
      "",
      __doc__.split("\n\n", 1)[1].strip(),
      "",
      f"## Growth exponents (T = {lengths[0]}..{lengths[-1]})",
      "",
      _exponent_table(doc["exponents"]),
      "",
      "Reading the fit: over a short range, fixed costs flatten it (the chunked "
      "paths' temporaries are mostly per-tile buffers of a few MiB until T is large, "
      "so their memory exponent sits well below 1 at T <= 4k); `--tables=all` runs "
      "to 16k (64k for the O(T) paths). Times on a shared CPU are noisy: compare "
      "ratios within one run.",
      "",
      "## Every point",
      "",
      table.grid_markdown(doc),
    ]
  )
  common.write_markdown(results_dir, NAME, text)
  _plot(results_dir, doc)
  return f"{NAME}: {_headline(doc)}"


def _exponent_table(rows) -> str:
  def e(x):
    return "" if x is None else f"{x:.2f}"

  body = [
    [
      r["case"] + (" (interpreter)" if r["correctness_only"] else ""),
      f"{r['lengths'][0]}..{r['lengths'][-1]}",
      f"{r['expected_time']:g}",
      e(r["time_fwd"]),
      e(r["time_fwdbwd"]),
      f"{r['expected_memory']:g}",
      e(r["memory"]),
      "; ".join(r["failed"]),
    ]
    for r in rows
  ]
  return common.markdown_table(
    [
      "case",
      "T range fitted",
      "time exponent (paper)",
      "fwd (ours)",
      "fwd+bwd (ours)",
      "memory exponent (paper)",
      "XLA temp f+b (ours)",
      "out of memory / time",
    ],
    body,
  )


def _headline(doc: dict) -> str:
  """Speed-up and memory ratio of each attnzoo path vs dense xla at the longest common T."""
  ok = [p for p in doc["points"] if p["status"] == "ok"]
  base = {p["T"]: p for p in ok if p["case"] == bench_cases.BASELINE}
  if not base:
    return "baseline did not run"
  T = max(base)
  catalogue = bench_cases.all_cases()
  parts = []
  for p in ok:
    case = catalogue[p["case"]]
    if p["T"] != T or case.peer or case.correctness_only or p["case"] == bench_cases.BASELINE:
      continue
    mode = "fwd+bwd" if "fwdbwd_speedup_vs_baseline" in p else "fwd"
    speed = p.get("fwdbwd_speedup_vs_baseline", p.get("fwd_speedup_vs_baseline"))
    mem_b = base[T].get("fwdbwd_temp_mib") or base[T].get("fwd_temp_mib")
    mem = p.get("fwdbwd_temp_mib") or p.get("fwd_temp_mib")
    ratio = f", XLA temp {mem / mem_b:.2g}× of dense" if mem and mem_b else ""
    parts.append(f"{p['case']} {speed:.2f}× {mode}{ratio}")
  oom = sum(p["status"] == "oom" for p in doc["points"])
  return (
    f"at T={T} vs dense xla: " + "; ".join(parts) + (f"; {oom} point(s) marked OOM" if oom else "")
  )


def _plot(results_dir: str, doc: dict) -> None:
  plt = common.pyplot()
  if plt is None:
    return
  catalogue = bench_cases.all_cases()
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.2))
  for name in dict.fromkeys(p["case"] for p in doc["points"]):
    pts = [p for p in doc["points"] if p["case"] == name and p["status"] == "ok"]
    if not pts or catalogue[name].correctness_only:
      continue
    ts = [p["T"] for p in pts]
    style = ":" if catalogue[name].peer else "-"
    ax_t.plot(ts, [p.get("fwdbwd_ms", p.get("fwd_ms")) for p in pts], style, marker="o", label=name)
    mem = [p.get("fwdbwd_temp_mib") or p.get("fwd_temp_mib") or math.nan for p in pts]
    ax_m.plot(ts, mem, style, marker="o", label=name)
  for ax, label in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "XLA temporaries, fwd+bwd (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(label)
    ax.grid(True, which="both", lw=0.3)
  ax_t.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(results_dir, f"{NAME}.png"), dpi=120)
  plt.close(fig)
