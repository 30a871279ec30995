"""reproduce writes every table's files (the benchmark itself: test_benchmark.py)."""

import json

import numpy as np
import pytest

from experiments import reproduce, tables
from experiments.bench import cases
from experiments.tables import speed_memory
from tests import tolerances


def test_analytic_tables_and_tiny_speed_memory_write_their_files(tmp_path):
  lines = []
  summaries = reproduce.reproduce(
    ["decode_cost", "gna_sim", "speed_memory"], str(tmp_path), "smoke", log=lines.append
  )
  assert len(lines) == 3
  for name in ("decode_cost", "gna_sim", "speed_memory"):
    md = (tmp_path / f"{name}.md").read_text()
    assert "paper" in md and "ours" in md, name
    json.loads((tmp_path / f"{name}.json").read_text())
  assert (tmp_path / "gna_sim.png").stat().st_size > 0
  assert (tmp_path / "speed_memory.png").stat().st_size > 0
  # Exact tables carry a mark on every row.
  rows = [
    r
    for r in (tmp_path / "decode_cost.md").read_text().splitlines()
    if r.startswith("| ") and "paper" not in r
  ]
  assert rows and all(("✓" in r) != ("✗" in r) for r in rows)
  doc = json.loads((tmp_path / "speed_memory.json").read_text())
  ok = [p for p in doc["points"] if p["status"] == "ok"]
  assert {p["case"] for p in ok} >= {"softmax/xla:full", "softmax/chunked:full"}
  base = [p for p in ok if p["case"] == cases.BASELINE]
  np.testing.assert_allclose([p["fwd_speedup_vs_baseline"] for p in base], 1.0)
  # max_err_fwd is max|out - ref| / max|ref|: the magnitude-scaled rule of tests/tolerances.py.
  chunked = [p for p in ok if p["case"] == "softmax/chunked:full"]
  assert all(p["max_err_fwd"] < tolerances.fwd_tol(p["dtype"])["atol"] for p in chunked), chunked
  assert "speed_memory" in summaries["speed_memory"]


def test_select_tables():
  assert reproduce.select("quick") == list(tables.QUICK)
  assert set(reproduce.select("all")) == set(tables.TABLES)
  assert reproduce.select("gna_sim, decode_cost") == ["gna_sim", "decode_cost"]
  with pytest.raises(ValueError, match="nope"):
    reproduce.select("gna_sim,nope")


def test_growth_exponent_recovers_a_power_law():
  ts = [1024, 2048, 4096]
  np.testing.assert_allclose(speed_memory.growth_exponent(ts, [3 * t**2 for t in ts]), 2.0)
  np.testing.assert_allclose(speed_memory.growth_exponent(ts, [5, None, 20]), 1.0)
  assert speed_memory.growth_exponent(ts, [1.0, None, None]) is None


def test_head_params_counts_the_built_models_and_matches_every_row(tmp_path):
  from experiments.tables import head_params  # noqa: PLC0415

  summary = head_params.run(str(tmp_path), "quick")
  total = len(head_params.MOH) + len(head_params.AFFINE)
  assert f"{total}/{total} rows match" in summary
  doc = json.loads((tmp_path / "head_params.json").read_text())
  assert doc["moh"]["LLM-S"]["overhead"] == 12 * 768 * 14  # L·D·(h+2), counted not typed
  assert doc["affine_scaled"]["1B (Llama-3.2-1B shape)"]["delta"] == 16 * 2048 * 32
