"""reproduce writes every table's files; the benchmark marks failures instead of crashing."""

import json

import numpy as np
import pytest

from experiments import benchmark, reproduce, tables
from experiments.tables import speed_memory


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
  base = [p for p in ok if p["case"] == benchmark.BASELINE]
  np.testing.assert_allclose([p["fwd_speedup_vs_baseline"] for p in base], 1.0)
  assert all(p["max_err_fwd"] < 1e-5 for p in ok if p["case"] == "softmax/chunked:full")
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


def _point(T, rss_cap_gib=4.0):
  return dict(
    case="softmax/xla:full",
    T=T,
    dtype="float32",
    B=1,
    N=1,
    H=8,
    repeats=1,
    backward=False,
    rss_cap_gib=rss_cap_gib,
    check_len=0,
  )


def test_xla_planned_memory_over_the_cap_is_marked_oom_and_stops_the_series():
  # 2 x 512 x 512 f32 logits need ~2 MiB of temporaries, far above a 1 KiB cap.
  res = benchmark.run_series([_point(512, 1e-6), _point(1024, 1e-6)], isolate=False, timeout_s=60)
  assert [r["status"] for r in res] == ["oom", "skipped"]
  assert "XLA plans" in res[0]["reason"]


def test_watchdog_kills_a_child_over_the_rss_cap():
  # A fresh python + jax import passes 50 MiB at once: the child is killed and marked oom.
  res = benchmark.run_series([_point(64, 0.05), _point(128, 0.05)], isolate=True, timeout_s=60)
  assert [r["status"] for r in res] == ["oom", "skipped"]
  assert "resident memory" in res[0]["reason"]


def test_ratios_against_baseline_peer_and_roofline():
  base = dict(case=benchmark.BASELINE, T=8, dtype="float32", B=1, N=1, H=4, status="ok", fwd_ms=4.0)
  chunked = {**base, "case": "softmax/chunked:full", "fwd_ms": 2.0}
  peer = {**base, "case": "peer:jax.nn:full", "fwd_ms": 8.0}
  doc = dict(points=[base, chunked, peer], roofline={"float32": dict(gflops=1e-3)})
  benchmark.add_ratios(doc)
  np.testing.assert_allclose(chunked["fwd_speedup_vs_baseline"], 2.0)
  np.testing.assert_allclose(chunked["fwd_vs_peer"]["peer:jax.nn:full"], 4.0)
  # 4 * 8 * 8 * 4 FLOPs in 2 ms = 0.512 MFLOP/s, over a 1 MFLOP/s roofline.
  np.testing.assert_allclose(chunked["fwd_roofline_fraction"], 0.512)
  assert "fwd_vs_peer" not in peer


def test_isolated_child_reports_its_own_peak_memory():
  (res,) = benchmark.run_series([_point(32)], isolate=True, timeout_s=120)
  assert res["status"] == "ok", res.get("reason")
  assert res["fwd_ms"] > 0 and res["rss_fwd_mib"] >= res["rss_base_mib"] > 0
