"""Metrics as JSON lines in the workdir, and the human progress line."""

from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import logging


class MetricsWriter:
  """Appends `{"step": s, "split": ..., **metrics}` lines to `<workdir>/metrics.jsonl`.

  On resume from step s0, lines with step > s0 (written after the checkpoint the run
  resumes from) are dropped first, so the file always describes one consistent run.
  In a multi-host run only process 0 writes (the others would duplicate every line).
  """

  def __init__(self, workdir: str, *, resume_step: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0:  # multi-host: every process has the same metrics; one writes
      self._file = open(os.devnull, "w")  # noqa: SIM115
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        lines = [line for line in f if line.strip()]
      kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
      if len(kept) != len(lines):
        logging.info(
          "metrics.jsonl: dropping %d lines after step %d (resuming there)",
          len(lines) - len(kept),
          resume_step,
        )
        with open(self.path, "w") as f:
          f.writelines(kept)
    self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    self._file.write(json.dumps(dict(step=step, split=split, **metrics)) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
  """The metric lines of `split`, in order (for tests and notebooks)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r["split"] == split]


class Progress:
  """Formats `step 120/1000 | loss 2.3456 | 12.3 steps/s | ETA 1m12s` from wall time."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self._t0, self._s0 = time.perf_counter(), start_step

  def line(self, step: int, metrics: dict[str, float]) -> str:
    elapsed = time.perf_counter() - self._t0
    rate = (step - self._s0) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else math.inf
    ordered = sorted(metrics.items(), key=lambda kv: kv[0] != "loss")  # loss first
    shown = " | ".join(f"{k} {v:.4f}" for k, v in ordered)
    return f"step {step}/{self.total} | {shown} | {rate:.2f} steps/s | ETA {_duration(eta)}"


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
