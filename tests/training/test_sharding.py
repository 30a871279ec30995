"""Mesh construction, logical axis rules, and (in a subprocess with 8 virtual CPU devices)
data-, FSDP-, tensor- and sequence-parallel steps equal to one device."""

import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from attnzoo.training import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mesh_shape_fills_one_axis():
  assert sharding.mesh_shape(dict(data=-1), 8) == (8, 1, 1, 1)
  assert sharding.mesh_shape(dict(data=2, fsdp=-1, sequence=2), 8) == (2, 2, 1, 2)


@pytest.mark.parametrize(
  "axes, match",
  [
    (dict(pipeline=2), "unknown mesh axes"),
    (dict(data=-1, fsdp=-1), "at most one"),
    (dict(data=3), "does not fit"),
    (dict(data=2), "uses 2 devices but 8"),
  ],
)
def test_bad_mesh_raises(axes, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(axes, 8)


def test_logical_rules_and_divisibility():
  class FakeMesh:
    shape = dict(data=2, fsdp=4, tensor=2, sequence=1)

  mesh = FakeMesh()
  assert sharding.logical_to_spec(("batch", "length"), (8, 16), mesh) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("embed", "heads", None), (32, 4, 8), mesh) == P(
    "fsdp", "tensor", None
  )
  # 6 is not divisible by fsdp=4: replicated instead of failing
  assert sharding.logical_to_spec(("embed", "mlp"), (6, 4), mesh) == P(None, "tensor")
  assert sharding.param_logical_axes("0/blocks/1/attn/query/kernel", 3) == ("embed", "heads", None)
  # optimizer moments repeat the param path
  assert sharding.param_logical_axes("1/opt_state/0/mu/blocks/0/mlp/down/kernel", 2) == (
    "mlp",
    "embed",
  )
  assert sharding.param_logical_axes("0/blocks/0/attn_norm/scale", 1) == (None,)


def test_main_process_keeps_one_device():
  assert jax.device_count() == 1


@pytest.fixture(scope="module")
def multidevice_run():
  """One subprocess with 8 virtual CPU devices checks every mesh kind (one compile each)."""
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT,
  )
  return subprocess.run(
    [sys.executable, "-m", "tests.training.multidevice_check"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("kind", ["data", "fsdp", "tensor", "sequence"])
def test_parallel_step_equals_one_device(multidevice_run, kind):
  lines = [
    line for line in multidevice_run.stdout.splitlines() if line.split(":")[0].endswith(f" {kind}")
  ]
  assert lines and lines[0].startswith(f"OK {kind}"), (
    "\n".join(lines) + multidevice_run.stdout[-2000:] + multidevice_run.stderr[-4000:]
  )
