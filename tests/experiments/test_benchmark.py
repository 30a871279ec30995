"""The benchmark package: registry-generated cases, the runner's failure handling, the tables."""

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo import attention
from attnzoo.attention import registry
from experiments import gpu_bench_linear
from experiments.bench import cases, measure, runner, table

# ------------------------------------------------------------------ a family added by registration


def _scaled_softmax(q, k, v, *, head_scale, is_causal=False, implementation=None):
  """Softmax attention whose logits are scaled by exp(head_scale) per head (a learned [N])."""
  del implementation
  T, S = q.shape[1], k.shape[1]
  logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q, k) * jnp.exp(head_scale)[None, :, None, None]
  if is_causal:
    logits_BNTS = jnp.where(jnp.tril(jnp.ones((T, S), bool)), logits_BNTS, -jnp.inf)
  out = jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(logits_BNTS, axis=-1), v)
  return out, registry.Aux(losses={"l": jnp.mean(head_scale**2)})


_TOY = registry.Family(
  name="toy",
  attention=_scaled_softmax,
  implementations=("xla",),
  returns_aux=True,
  supports_mask=False,
  params={"head_scale": registry.ParamSpec(lambda d: (d.N,), doc="log logit scale per head")},
  aux_losses={"l": 0.1},
)


def _tiny_grid(names, **kw):
  """In-process grid at T=32, N=2, H=8 (plus the baseline): seconds on a CPU."""
  opts = dict(heads=2, head_dim=8, repeats=1, isolate=False, check_len=0, matmul_n=64)
  return runner.run_grid(names, [], [32], ["float32"], log=lambda _: None, **{**opts, **kw})


def test_a_registered_family_is_benchmarked_without_editing_experiments(monkeypatch):
  monkeypatch.setitem(attention.FAMILIES, "toy", _TOY)
  generated = cases.all_cases()
  # supports_mask=False: no structured-mask scenario; the default grid picks it up.
  assert {"toy/xla:full", "toy/xla:causal"} <= set(generated)
  assert "toy/xla:neighborhood" not in generated
  assert "toy/xla:causal" in cases.default_cases()

  built = generated["toy/xla:causal"].build(1, 8, 2, 4, "float32")
  assert set(built.params) == {"head_scale"} and not built.consts

  # The isolated child re-imports the registry and would not see the monkeypatched entry:
  # the in-process path (isolate=False) measures it.
  doc = _tiny_grid(["toy/xla:causal"])
  (point,) = [p for p in doc["points"] if p["case"] == "toy/xla:causal"]
  assert point["status"] == "ok", point.get("reason")
  assert point["fwd_ms"] > 0 and point["fwdbwd_ms"] > 0
  assert point["fwdbwd_speedup_vs_baseline"] > 0
  rows = [r for r in table.grid_markdown(doc).splitlines() if r.startswith("| toy/xla:causal |")]
  assert len(rows) == 1


def test_registry_cases_cover_every_implementation_and_skip_the_ring_with_its_reason():
  generated = cases.all_cases()
  for name, family in attention.FAMILIES.items():
    for impl in family.implementations:
      assert any(n.startswith(f"{name}/{impl}:") for n in generated), (name, impl)
  ring = generated["softmax/ring:full"]
  assert ring.skip and "mesh" in ring.skip
  doc = _tiny_grid(["softmax/ring:full"], backward=False)
  md = table.grid_markdown(doc)
  assert "| softmax/ring:full |" not in md
  assert f"`softmax/ring:full` ({ring.skip})" in md


def test_a_setting_that_is_causal_only_gets_only_the_causal_scenario(monkeypatch):
  toy = registry.Family(
    name="toy",
    attention=_scaled_softmax,
    implementations=("xla",),
    returns_aux=True,
    supports_mask=False,
    params=_TOY.params,
    aux_losses={"l": 0.1},
    conformance=registry.Conformance(
      cases={
        "plain": registry.ConformanceCase(),
        "decayed": registry.ConformanceCase(causal_only=True, input_scale=0.3),
      }
    ),
  )
  monkeypatch.setitem(attention.FAMILIES, "toy", toy)
  names = {n for n in cases.all_cases() if n.startswith("toy")}
  assert names == {"toy/xla:full", "toy/xla:causal", "toy(decayed)/xla:causal"}
  assert cases.get("toy(decayed)/xla:causal").build(1, 8, 1, 4, "float32").input_scale == 0.3


# ------------------------------------------------------------------ the runner


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
  res = runner.run_series([_point(512, 1e-6), _point(1024, 1e-6)], isolate=False, timeout_s=60)
  assert [r["status"] for r in res] == ["oom", "skipped"]
  assert "XLA plans" in res[0]["reason"]


def test_watchdog_kills_a_child_over_the_rss_cap():
  # A fresh python + jax import passes 50 MiB at once: the child is killed and marked oom.
  res = runner.run_series([_point(64, 0.05), _point(128, 0.05)], isolate=True, timeout_s=60)
  assert [r["status"] for r in res] == ["oom", "skipped"]
  assert "resident memory" in res[0]["reason"]


def test_isolated_child_reports_its_own_peak_memory():
  (res,) = runner.run_series([_point(32)], isolate=True, timeout_s=120)
  assert res["status"] == "ok", res.get("reason")
  assert res["fwd_ms"] > 0 and res["rss_fwd_mib"] >= res["rss_base_mib"] > 0


def test_a_failing_call_is_a_status_not_an_exception():
  q = k = v = jnp.ones((1, 8, 1, 4))

  def exhausted(q, k, v, params, consts):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

  def broken(q, k, v, params, consts):
    raise ValueError("block_q=3 must divide T=8")

  assert measure.time_call(exhausted, q, k, v, repeats=1)["status"] == "oom"
  res = measure.time_call(broken, q, k, v, repeats=1)
  assert res["status"] == "error" and "block_q=3" in res["reason"]
  # In a series, a failure skips the longer points.
  points = [dict(T=t) for t in (8, 16)]
  rows = runner.run_series(
    points,
    isolate=False,
    timeout_s=60,
    measure_fn=lambda p: measure.time_call(broken, q, k, v, repeats=1),
  )
  assert [r["status"] for r in rows] == ["error", "skipped"]


def test_ratios_against_baseline_peer_and_roofline():
  base = dict(case=cases.BASELINE, T=8, dtype="float32", B=1, N=1, H=4, status="ok", fwd_ms=4.0)
  chunked = {**base, "case": "softmax/chunked:full", "fwd_ms": 2.0}
  linear = {**base, "case": "linear/chunked:full", "fwd_ms": 1.0}
  peer = {**base, "case": "peer:jax.nn:full", "fwd_ms": 8.0}
  doc = dict(points=[base, chunked, linear, peer], roofline={"float32": dict(gflops=1e-3)})
  runner.add_ratios(doc)
  np.testing.assert_allclose(chunked["fwd_speedup_vs_baseline"], 2.0)
  np.testing.assert_allclose(chunked["fwd_vs_peer"]["peer:jax.nn:full"], 4.0)
  # 4 * 8 * 8 * 4 FLOPs in 2 ms = 0.512 MFLOP/s, over a 1 MFLOP/s roofline.
  np.testing.assert_allclose(chunked["fwd_roofline_fraction"], 0.512)
  assert "fwd_vs_peer" not in peer
  # Dense-softmax FLOPs say nothing about linear attention: no roofline figure for it.
  assert "fwd_roofline_fraction" not in linear and "fwd_vs_peer" in linear


# ------------------------------------------------------------------ tables and the GPU scripts


def test_a_missing_value_reads_as_the_row_status():
  cols = [table.Column("T", "T"), table.Column("ms", "fwd_ms", ".1f", status=True)]
  rows = [
    dict(T=1, status="ok", fwd_ms=2.25),
    dict(T=2, status="oom"),
    dict(T=4, status="skipped"),
  ]
  assert table.markdown(rows, cols).splitlines()[2:] == [
    "| 1 | 2.2 |",
    "| 2 | OOM |",
    "| 4 | skipped |",
  ]


def test_gpu_linear_dry_run_writes_its_table(tmp_path):
  doc = gpu_bench_linear.run(
    str(tmp_path / "linear"), dry_run=True, impls=("linear_chunked", "dpa_xla")
  )
  assert [(r["T"], r["impl"], r["status"]) for r in doc["rows"]] == [
    (128, "linear_chunked", "ok"),
    (128, "dpa_xla", "ok"),
    (256, "linear_chunked", "ok"),
    (256, "dpa_xla", "ok"),
  ]
  md = (tmp_path / "linear.md").read_text()
  assert "| 256 | 1 | dpa_xla |" in md
  assert (tmp_path / "linear.json").stat().st_size > 0
