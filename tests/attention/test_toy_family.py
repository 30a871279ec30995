"""The family seam end to end, with a family defined outside the package (tests/attention/
toy_family.py: a learned parameter, an aux loss, an EMA state): it runs the conformance suite
and trains, logs its aux loss and resumes exactly through `experiments/train.py`, with no edit
to `attnzoo.nn`, `attnzoo.models`, `attnzoo.training` or `experiments`."""

import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from attnzoo import attention, nn, training
from attnzoo.attention import registry
from tests.attention import conformance, toy_family

globals().update(conformance.suites(toy_family.FAMILY))  # the generated conformance classes


@pytest.fixture
def toy_registered(monkeypatch):
  monkeypatch.setitem(attention.FAMILIES, "toy", toy_family.FAMILY)


def _train(workdir, *overrides, monkeypatch):
  """`python -m experiments.train --config configs/lm_bytes.py:attention=toy,smoke ...`,
  in process (the test's registration of "toy" must be visible)."""
  from experiments import train  # noqa: PLC0415

  argv = [
    "train",
    "--config=configs/lm_bytes.py:attention=toy,smoke",
    f"--workdir={workdir}",
    "--config.model.knobs.toy.implementation=xla",
    *overrides,
  ]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags finds `--config.*` overrides there
  try:
    flags.FLAGS(argv)
    train.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)  # config_flags defines the overrides again on the next parse


def _train_rows(workdir):
  return training.read_metrics(workdir, "train")


def test_toy_trains_logs_its_aux_loss_updates_its_state_and_resumes_exactly(
  toy_registered, tmp_path, monkeypatch
):
  first = str(tmp_path / "first")
  _train(first, monkeypatch=monkeypatch)
  rows = _train_rows(first)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  for r in rows:
    assert {"aux_loss", "aux/gate_l2", "key_norm"} <= set(r), sorted(r)
    # default weight 0.01, two layers with one loss each
    np.testing.assert_allclose(r["aux_loss"], 0.01 * 2 * r["aux/gate_l2"], rtol=1e-5)
  norms = [r["key_norm"] for r in rows]
  assert norms[0] == 1.0 and len(set(norms)) == len(norms), norms  # the EMA moves every step
  assert rows[-1]["aux/gate_l2"] > 0.0  # the gate parameter is learned (it starts at 0)

  # Kill after step 3: drop the step-6 checkpoint, rerun the same command -> steps 4..6 again.
  second = str(tmp_path / "second")
  shutil.copytree(first, second)
  shutil.rmtree(os.path.join(second, "checkpoints", "6"))
  _train(second, monkeypatch=monkeypatch)
  assert _train_rows(second) == rows  # exact: loss, aux loss, EMA state metric


def test_aux_weight_is_a_config_knob_and_unknown_names_raise(toy_registered, tmp_path, monkeypatch):
  workdir = str(tmp_path / "w")
  _train(
    workdir,
    "--config.model.aux_weights.gate_l2=0.5",
    "--config.train.steps=2",
    monkeypatch=monkeypatch,
  )
  for r in _train_rows(workdir):
    np.testing.assert_allclose(r["aux_loss"], 0.5 * 2 * r["aux/gate_l2"], rtol=1e-5)
  with pytest.raises(AttributeError, match="nope"):  # the locked config names the key
    _train(str(tmp_path / "x"), "--config.model.aux_weights.nope=1.0", monkeypatch=monkeypatch)


def test_layer_creates_the_declared_arrays_and_validates_aux(toy_registered):
  from flax import nnx  # noqa: PLC0415

  layer = nn.Attention(16, num_heads=4, num_kv_heads=2, head_dim=8, family="toy", rngs=nnx.Rngs(0))
  assert layer.family_params["head_gate"][...].shape == (4,)
  assert isinstance(layer.family_state["key_norm"], nn.FamilyState)
  x = jnp.ones((2, 5, 16))
  out, aux = nn.run_with_aux(layer, x)
  assert out.shape == x.shape and set(aux.state) == {""}
  nn.apply_state_updates(layer, aux.state)
  assert float(layer.family_state["key_norm"][...]) != 1.0

  def bad(q, k, v, **kw):
    out, aux = toy_family.attention(q, k, v, **kw)
    return out, registry.Aux(losses={"undeclared": aux.losses["gate_l2"]}, state=aux.state)

  broken = registry.Family(**{**toy_family.FAMILY.__dict__, "attention": bad})
  attention.FAMILIES["toy"] = broken  # restored by the fixture's monkeypatch
  layer = nn.Attention(16, num_heads=4, num_kv_heads=2, head_dim=8, family="toy", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="undeclared.*declare"):
    nn.run_with_aux(layer, x)


def test_toy_appears_in_the_benchmark_and_runs(toy_registered):
  from experiments.bench import cases, runner  # noqa: PLC0415

  generated = cases.all_cases()
  assert {"toy/xla:full", "toy/xla:causal", "toy/chunked:neighborhood"} <= set(generated)
  built = generated["toy/chunked:causal"].build(1, 16, 2, 8, "float32")
  assert set(built.params) == {"head_gate"} and set(built.consts) == {"key_norm"}
  doc = runner.run_grid(
    ["toy/chunked:causal"],
    [],
    [32],
    ["float32"],
    log=lambda _: None,
    heads=2,
    head_dim=8,
    repeats=1,
    isolate=False,
    check_len=0,
    matmul_n=64,
  )
  (point,) = [p for p in doc["points"] if p["case"] == "toy/chunked:causal"]
  assert point["status"] == "ok", point.get("reason")
  assert point["fwd_ms"] > 0 and point["fwdbwd_ms"] > 0
