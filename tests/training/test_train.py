"""train_and_evaluate end to end: every config smoke-trains, exact resume, safety rails."""

import importlib
import logging
import os
import shutil

import numpy as np
import pytest

from attnzoo import attention, training
from attnzoo.training import read_metrics

CONFIGS = ["lm_bytes", "mqar", "selective_copy", "listops", "needle", "digits", "mnist"]


def smoke_config(name="lm_bytes", arg="smoke", **overrides):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  for knobs in config.model.knobs.values():  # the fastest compile on CPU; the
    knobs.implementation = "xla"  # implementations are tested against each other elsewhere
  for dotted, value in overrides.items():
    node, *path = dotted.split("__")
    target = config[node]
    for key in path[:-1]:
      target = target[key]
    if path:
      target[path[-1]] = value
    else:
      config[node] = value
  return config


def losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(workdir, "train")]


def _needs(name):
  if name == "mnist":
    try:
      from attnzoo.data import get_dataset

      get_dataset("mnist").batch(0, 1)
    except ModuleNotFoundError as e:
      pytest.skip(str(e))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """lm_bytes smoke, 6 steps, checkpoints at 3 and 6 (copied by the tests below)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  metrics = training.train_and_evaluate(smoke_config(), workdir)
  return workdir, metrics


def test_reference_run_learns_and_writes_everything(reference_run):
  workdir, metrics = reference_run
  rows = losses(workdir)
  assert [s for s, _ in rows] == [1, 2, 3, 4, 5, 6]
  assert rows[-1][1] < rows[0][1]
  assert set(metrics) == {"loss", "accuracy", "bits_per_byte"}
  np.testing.assert_allclose(metrics["bits_per_byte"], metrics["loss"] / np.log(2), rtol=1e-6)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "lm_bytes"])
def test_every_config_smoke_trains(name, tmp_path):
  _needs(name)
  metrics = training.train_and_evaluate(smoke_config(name), str(tmp_path))
  assert np.isfinite(metrics["loss"]) and 0.0 <= metrics["accuracy"] <= 1.0
  assert len(losses(str(tmp_path))) == 6


@pytest.mark.parametrize("family", sorted(attention.FAMILIES))
def test_every_registered_family_smoke_trains(family, tmp_path):
  """`attention=<family>` in a task config trains with no other change (the registry seam);
  the family's first conformance setting supplies knobs that need a value."""
  config = smoke_config(arg=f"smoke,attention={family}")
  entry = attention.get(family)
  setting = next(iter(entry.conformance.cases.values()))
  if callable(setting.options):  # shape-dependent knobs (e.g. a per-head decay) stay defaulted
    options = {}
  else:
    options = {k: v for k, v in setting.options.items() if k in config.model.knobs[family]}
  for knob, value in options.items():
    config.model.knobs[family][knob] = value
  metrics = training.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["loss"])
  assert len(losses(str(tmp_path))) == 6


def test_vit_patches_with_2d_neighborhood_trains(tmp_path):
  config = smoke_config("digits", "smoke,neighborhood=3", model__patch_size=(2, 2))
  metrics = training.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["loss"])


def test_killed_run_resumes_with_the_same_loss_curve(reference_run, tmp_path):
  workdir = str(tmp_path)
  # "Kill" after step 4: the last checkpoint is step 3, step 4 is lost and recomputed.
  training.train_and_evaluate(smoke_config(), workdir, stop_at=4)
  assert losses(workdir)[-1][0] == 4
  training.train_and_evaluate(smoke_config(), workdir)  # the same command again
  assert losses(workdir) == losses(reference_run[0])  # exact, not approximate


def test_corrupt_latest_checkpoint_falls_back_loudly(reference_run, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_run[0], workdir)
  latest = os.path.join(workdir, "checkpoints", "6", "state")
  for root, _, files in os.walk(latest):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with caplog.at_level(logging.WARNING):
    training.train_and_evaluate(smoke_config(), workdir)
  assert any("UNREADABLE" in r.getMessage() and "STEP 6" in r.getMessage() for r in caplog.records)
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "6"))  # kept, not deleted
  assert losses(workdir) == losses(reference_run[0])  # resumed from step 3, same curve


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, directory)] = (os.path.getsize(p), os.path.getmtime(p))
  return out


def test_incompatible_checkpoint_stops_and_touches_nothing(reference_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_run[0], workdir)
  before = _snapshot(workdir)
  with pytest.raises(training.IncompatibleCheckpointError, match=r"dim: checkpoint=32 config=48"):
    training.train_and_evaluate(smoke_config(model__dim=48), workdir)
  assert _snapshot(workdir) == before
  with pytest.raises(training.IncompatibleCheckpointError, match=r"num_layers"):
    training.train_and_evaluate(smoke_config(model__num_layers=3), workdir)
  assert _snapshot(workdir) == before


def test_non_finite_loss_stops_naming_the_step(tmp_path):
  config = smoke_config(train__learning_rate=1e30, train__grad_clip=1e30)
  with pytest.raises(FloatingPointError, match=r"non-finite training metrics at step \d+"):
    training.train_and_evaluate(config, str(tmp_path))
  steps = [s for s, loss in losses(str(tmp_path))]
  assert steps and steps[-1] < 6


def test_unknown_family_lists_valid_names(tmp_path):
  with pytest.raises(KeyError, match="valid names.*softmax"):
    training.train_and_evaluate(smoke_config(arg="smoke,attention=nope"), str(tmp_path))


@pytest.mark.slow
def test_hybrid_stack_of_registered_families_trains(tmp_path):
  from attnzoo import attention

  if "linear" not in attention.FAMILIES:
    pytest.skip("no 'linear' family registered")
  config = smoke_config(arg="smoke,attention=linear+softmax")
  assert set(config.model.knobs) == {"linear", "softmax"}
  metrics = training.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["loss"])


def test_tnl_style_lm_trains(tmp_path):
  """`lm_bytes.py:tnl`: linear attention with the TNL decay schedule and NormAttention output."""
  metrics = training.train_and_evaluate(smoke_config("lm_bytes", "tnl,smoke"), str(tmp_path))
  assert np.isfinite(metrics["loss"])
  assert len(losses(str(tmp_path))) == 6
