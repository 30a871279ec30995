"""Shared by every benchmark: the timing rule (median wall time of repeated runs after a
warm-up) and how a failed point reads in a table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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


def cell(value: float | None, error: str, spec: str) -> str:
  """A table cell: `value` formatted, else "OOM" when the point ran out of memory, else "n/a"."""
  if value is not None:
    return format(value, spec)
  return "OOM" if "RESOURCE_EXHAUSTED" in error or "memory" in error.lower() else "n/a"
