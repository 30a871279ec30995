"""Config files: argument parsing, locking, family knobs, every file builds."""

import importlib
import subprocess
import sys

import pytest

from configs import common, lm_bytes

NAMES = ["lm_bytes", "mqar", "selective_copy", "listops", "needle", "digits", "mnist"]


def test_parse_arg():
  arg = common.parse_arg(
    "attention=linear,smoke,seq_len=64", attention="softmax", smoke=False, seq_len=128
  )
  assert (arg.attention, arg.smoke, arg.seq_len) == ("linear", True, 64)
  with pytest.raises(ValueError, match=r"unknown config argument 'sise'.*valid"):
    common.parse_arg("sise=3", size=1)


@pytest.mark.parametrize("name", NAMES)
def test_every_config_builds_and_is_locked(name):
  module = importlib.import_module(f"configs.{name}")
  assert "python -m experiments.train" in module.__doc__ and "Expected" in module.__doc__
  for arg in (None, "smoke"):
    c = module.get_config(arg)
    assert c.model.attention == "softmax"
    with pytest.raises(AttributeError, match="learning_rate"):  # lists the valid fields
      c.train.learning_rte = 1.0
  smoke = module.get_config("smoke")
  assert smoke.train.steps <= 10 and smoke.model.dim <= 32


def test_family_knobs_come_from_the_registry_and_accept_overrides():
  c = importlib.import_module("configs.lm_bytes").get_config("smoke")
  assert set(c.model.knobs.softmax) >= {"implementation", "scale", "logits_soft_cap"}
  c.model.knobs.softmax.implementation = "xla"  # a typed placeholder accepts its type
  c.model.knobs.softmax.scale = 0.5
  with pytest.raises(AttributeError):
    c.model.knobs.softmax.windw = 3


def test_unknown_family_lists_valid_names():
  with pytest.raises(KeyError, match="valid names.*softmax"):
    importlib.import_module("configs.lm_bytes").get_config("attention=nope")


def test_neighborhood_argument_declares_the_mask():
  c = importlib.import_module("configs.digits").get_config("neighborhood=3")
  assert c.model.mask == "neighborhood"
  assert c.model.mask_kwargs.window == 3 and c.model.mask_kwargs.stride == 1


@pytest.mark.slow
def test_command_line_rejects_unknown_key(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      "--config",
      "configs/lm_bytes.py:smoke",
      "--workdir",
      str(tmp_path),
      "--config.train.lerning_rate=0.1",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  assert "lerning_rate" in proc.stderr and "learning_rate" in proc.stderr


@pytest.mark.parametrize(
  "old, new", [("kv_heads", "num_kv_heads"), ("max_len", "input_len"), ("hidden_dim", "mlp_dim")]
)
def test_a_former_model_field_name_raises_naming_the_current_one(old, new):
  from attnzoo import data  # noqa: PLC0415
  from attnzoo.training import builders  # noqa: PLC0415

  config = lm_bytes.get_config("smoke")
  with config.unlocked():
    config.model[old] = 2
  with pytest.raises(ValueError, match=f"{old} is now {new}"):
    builders.model_config(config, data.get_dataset("stdlib", seq_len=32))


def test_hooks_and_aux_weights_are_declared_for_every_family():
  config = lm_bytes.get_config("attention=linear+softmax,smoke")
  assert set(config.model.knobs) == {"linear", "softmax"}
  assert all("hooks" in knobs for knobs in config.model.knobs.values())
  with pytest.raises(ValueError, match="unknown attention hooks"):
    from attnzoo.attention import hooks  # noqa: PLC0415

    hooks.parse("srms_norm+nope")
