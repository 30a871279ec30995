"""The one table writer of the benchmarks: rows (dicts) x `Column`s -> markdown, and the
document as `<prefix>.json` + `<prefix>.md`. Also the columns of the CPU grid
(`grid_markdown`); the GPU scripts declare theirs beside their measurements.

A row is a measured point: its fields plus `status` ("ok" | "oom" | "timeout" | "error" |
"skipped") and `reason`. Where a timing column has no value, the cell reads the status
("OOM", "timeout", "error", "skipped"), so a failed point is a row, never a gap.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

_STATUS = dict(oom="OOM", timeout="timeout", error="error", skipped="skipped")


@dataclasses.dataclass(frozen=True)
class Column:
  """One markdown column.

  Attributes:
    header: the column title.
    value: a row key, or `row -> value`.
    spec: format spec of a number ("" = `str`); None / NaN print as "".
    status: where the value is missing, print the row's failure status instead of "".
  """

  header: str
  value: str | Callable[[dict], Any]
  spec: str = ""
  status: bool = False

  def cell(self, row: dict) -> str:
    x = row.get(self.value) if isinstance(self.value, str) else self.value(row)
    if x is None or (isinstance(x, float) and math.isnan(x)):
      return _STATUS.get(row.get("status", ""), "") if self.status else ""
    return format(x, self.spec) if self.spec else str(x)


def markdown(rows: list[dict], columns: list[Column]) -> str:
  lines = [
    "| " + " | ".join(c.header for c in columns) + " |",
    "|" + "---|" * len(columns),
  ]
  lines += ["| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write(doc: dict, out_prefix: str, text: str) -> tuple[str, str]:
  """Writes `doc` to `<out_prefix>.json` and `text` to `<out_prefix>.md`; returns both paths."""
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  with open(out_prefix + ".json", "w") as f:
    json.dump(doc, f, indent=1, default=float)
  with open(out_prefix + ".md", "w") as f:
    f.write(text if text.endswith("\n") else text + "\n")
  return out_prefix + ".json", out_prefix + ".md"


def skipped_line(rows: list[dict], key: str = "case") -> str:
  """The "Skipped: `name` (reason); ..." line of rows skipped as a whole, or ""."""
  skipped = {}
  for r in rows:
    if r["status"] == "skipped":
      skipped.setdefault(r[key], r.get("reason", ""))
  return "Skipped: " + "; ".join(f"`{n}` ({r})" for n, r in skipped.items()) if skipped else ""


# ------------------------------------------------------------------ the CPU grid


def _pct(x) -> str:
  return "" if x is None else f"{100 * x:.0f}%"


def _pair(a, b, spec: str = ".0f") -> Callable[[dict], str]:
  def value(r):
    if r.get(a) is None and r.get(b) is None:
      return None
    return " / ".join("" if r.get(x) is None else format(r[x], spec) for x in (a, b))

  return value


def _roofline(r):
  if "fwd_roofline_fraction" not in r:
    return None
  return f"{_pct(r.get('fwd_roofline_fraction'))} / {_pct(r.get('fwdbwd_roofline_fraction'))}"


def _peers(r):
  mode = "fwdbwd" if "fwdbwd_vs_peer" in r else "fwd"
  return ", ".join(f"{n.split(':')[1]} {x:.2f}×" for n, x in r.get(f"{mode}_vs_peer", {}).items())


def _note(r):
  notes = []
  if r.get("correctness_only"):
    notes.append("interpreter: correctness only")
  if r["status"] != "ok":
    notes.append(r.get("reason", ""))
  if r.get("note"):
    notes.append(r["note"])
  if "max_err_fwd" in r:
    notes.append(f"rel err {r['max_err_fwd']:.0e} / grad {r.get('max_err_grad', math.nan):.1e}")
  return "; ".join(notes)


GRID_COLUMNS = [
  Column("case", "case"),
  Column("dtype", "dtype"),
  Column("T", "T"),
  Column("fwd ms", "fwd_ms", ".1f", status=True),
  Column("fwd × base", "fwd_speedup_vs_baseline", ".2f"),
  Column("fwd+bwd ms", "fwdbwd_ms", ".1f", status=True),
  Column("f+b × base", "fwdbwd_speedup_vs_baseline", ".2f"),
  Column("XLA temp MiB f / f+b", _pair("fwd_temp_mib", "fwdbwd_temp_mib")),
  Column("f+b temp / base", "fwdbwd_temp_vs_baseline", ".3f"),
  Column(
    "peak RSS MiB",
    lambda r: r.get("rss_fwdbwd_mib") or r.get("rss_fwd_mib") or r.get("rss_peak_seen_mib"),
    ".0f",
  ),
  Column("% roofline f / f+b", _roofline),
  Column("vs peers (f+b, else fwd)", _peers),
  Column("note", _note),
]


def grid_markdown(doc: dict) -> str:
  """The CPU grid: one row per point that ran (or failed); ratios are speed-ups (> 1 = faster
  than the baseline / peer); cases skipped as a whole are listed below the table."""
  cfg = doc["config"]
  roofline = ", ".join(
    f"{d} {r.get('gflops', math.nan):.0f} GFLOP/s" for d, r in doc["roofline"].items()
  )
  lines = [
    f"B={cfg['batch']}, N={cfg['heads']}, H={cfg['head_dim']}, median of {cfg['repeats']} "
    f"runs; machine: {cfg['machine']['cpu_count']} CPUs, {cfg['machine']['backend']}, "
    f"jax {cfg['machine']['jax']}. Matmul roofline: {roofline}.",
    "Speed-ups are baseline time / time (baseline: `softmax/xla:full`, same run); "
    "'vs peer' is peer time / attnzoo time; '% roofline' is dense-softmax model FLOP/s over "
    "the matmul FLOP/s measured right after the point in the same process (the run-level "
    "figure above is for reference). Memory: XLA's planned temporaries and the child's peak "
    "RSS.",
    "",
    markdown([p for p in doc["points"] if p["status"] != "skipped"], GRID_COLUMNS),
  ]
  skipped = skipped_line(doc["points"])
  if skipped:
    lines += ["", skipped]
  return "\n".join(lines) + "\n"
