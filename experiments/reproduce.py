r"""Regenerates paper tables with attnzoo's own code: `results/<name>.{md,json,png}`.

    python -m experiments.reproduce                          # --tables=quick (a few minutes, CPU)
    python -m experiments.reproduce --tables=gna_sim,decode_cost
    python -m experiments.reproduce --tables=all --results_dir=results/full

Each table's markdown has a "paper" and an "ours" column; exact tables (analytic accounting) mark
every row ✓ or ✗ with the reason. One summary line per table is printed. Tables live in
`experiments/tables/` (one module each, registered in `experiments.tables.TABLES`).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from experiments import tables

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "tables", "quick", f"comma-separated names from {sorted(tables.TABLES)}, or quick, or all."
)
flags.DEFINE_string("results_dir", "results", "where the tables are written.")
flags.DEFINE_enum(
  "size",
  None,
  ["quick", "all", "smoke"],
  "sweep size of measured tables; default: all for --tables=all, else quick.",
)


def select(spec: str) -> list[str]:
  """Table names from a --tables value; ValueError names an unknown table and the valid ones."""
  if spec == "quick":
    return list(tables.QUICK)
  if spec == "all":
    return list(tables.TABLES)
  names = [n.strip() for n in spec.split(",") if n.strip()]
  unknown = [n for n in names if n not in tables.TABLES]
  if unknown or not names:
    raise ValueError(
      f"--tables={spec!r}: unknown {unknown}; use quick, all, or names from {sorted(tables.TABLES)}"
    )
  return names


def reproduce(names: list[str], results_dir: str, size: str, log=print) -> dict[str, str]:
  """Runs the tables; returns name -> summary line."""
  os.makedirs(results_dir, exist_ok=True)
  summaries = {}
  for name in names:
    start = time.monotonic()
    summary = tables.TABLES[name].run(results_dir, size)
    summaries[name] = summary
    log(f"[reproduce] {summary}  ({time.monotonic() - start:.0f} s)")
  return summaries


def main(argv):
  del argv
  names = select(FLAGS.tables)
  size = FLAGS.size or ("all" if FLAGS.tables == "all" else "quick")
  results_dir = os.path.abspath(FLAGS.results_dir)
  print(f"[reproduce] tables {', '.join(names)} ({size}) -> {results_dir}")
  summaries = reproduce(names, results_dir, size)
  written = sorted(f for f in os.listdir(results_dir) if os.path.splitext(f)[0] in summaries)
  print(f"[reproduce] done: {len(summaries)} table(s) in {results_dir}/: {', '.join(written)}")


if __name__ == "__main__":
  app.run(main)
