"""The LAMA parameter table (`experiments.tables.pool_params`): counted from built models."""

import json

from experiments import tables
from experiments.tables import pool_params


def test_table_counts_the_built_pooling_and_matches_every_row(tmp_path):
  summary = pool_params.run(str(tmp_path), "quick")
  n = len(pool_params.SETTINGS)
  assert summary.startswith(f"pool_params: {n}/{n} ")
  doc = json.loads((tmp_path / "pool_params.json").read_text())
  lin = doc["Lin et al. 2017 (BiLSTM 2×300, r=30)"]
  assert (lin["lama_counted"], lin["lin"], lin["mhsa"]) == (
    600 * 350 * 2 + 350 * 30,
    600 * 350 + 350 * 30,
    4 * 600**2,
  )
  assert "✓" in (tmp_path / "pool_params.md").read_text()
  assert pool_params.NAME in tables.QUICK and tables.TABLES[pool_params.NAME] is pool_params


def test_count_differs_when_the_knobs_do():
  assert pool_params.count_lama(64, {"rank": 8, "num_heads": 2}) == 64 * 8 * 2 + 8 * 2
  assert pool_params.count_lama(64, {"rank": 8, "num_heads": 3}) == 64 * 8 * 2 + 8 * 3
