"""Multi-host training on one machine: 2 processes x 4 virtual CPU devices = one 8-device mesh.

Each process runs the real command line (`python -m experiments.train ... --multihost
--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i`); `jax.distributed`
joins them and CPU collectives go through gloo. The mesh is data=4 x sequence=2 (ring
attention): data rows 0-1 live on process 0 and rows 2-3 on process 1, so the gradient
all-reduce crosses the process boundary and each ring stays inside one process (a ring
across processes, data=1 x sequence=8, also trains; checked by hand). Both processes share one
workdir: orbax writes one checkpoint from both, process 0 alone writes metrics.jsonl.
Then the newest checkpoint is made unreadable and the same command resumes from step 3.

Expected: the resumed curve equals the uninterrupted one exactly (same processes, same
reduction order), and both equal a single process on 8 devices to float32 rounding: CPU
all-reduce sums devices in order 0..7 inside one process, gloo in its own order across
processes, so a loss can differ in its last bit (measured: at most 1 ulp, |d| <= 4.8e-7).

    pytest tests/training/test_multihost.py   # ~1-2 min on 2 cores
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from attnzoo.training import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300  # per launch; every process still running then is killed
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
COMMAND = [
  sys.executable,
  "-m",
  "experiments.train",
  "--config",
  "configs/lm_bytes.py:attention=softmax,smoke",  # 6 steps, checkpoints at 3 and 6
  "--config.mesh.data=4",
  "--config.mesh.sequence=2",
  "--config.model.knobs.softmax.implementation=xla",
]


def test_multihost_flag_selects_gloo_for_cpu_collectives(monkeypatch):
  """Without a CPU collectives implementation a cross-process computation fails with
  "Multiprocess computations aren't implemented on the CPU backend"."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  before = jax.config.jax_cpu_collectives_implementation
  jax.config.update("jax_cpu_collectives_implementation", None)
  try:
    sharding.maybe_initialize_distributed(
      enabled=True, coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1
    )
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
  finally:
    jax.config.update("jax_cpu_collectives_implementation", before)
  assert calls == [dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir: str, logdir: str, *, processes: int, devices: int) -> list[str]:
  """Runs COMMAND in `processes` processes with `devices` CPU devices each (multi-host
  flags when processes > 1); returns their stderr. Fails with every process's stderr if
  one exits non-zero or TIMEOUT_S passes (the others are killed then, not left waiting
  for a peer that is gone)."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    PYTHONPATH=ROOT,
    PYTHONUNBUFFERED="1",
  )
  env.pop("JAX_NUM_CPU_DEVICES", None)
  port = _free_port()
  procs, logs = [], []
  for i in range(processes):
    flags = [f"--workdir={workdir}"]
    if processes > 1:
      flags += [
        "--multihost",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={i}",
      ]
    logs.append(os.path.join(logdir, f"{os.path.basename(workdir)}.{i}.stderr"))
    with open(logs[-1], "w") as err:
      procs.append(
        subprocess.Popen(COMMAND + flags, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
      )
  deadline = time.monotonic() + TIMEOUT_S
  failure = None
  while failure is None and any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs):
      failure = "a process failed: " + str([p.poll() for p in procs])
    elif time.monotonic() > deadline:
      failure = f"timed out after {TIMEOUT_S} s"
    else:
      time.sleep(0.2)
  if failure is None and any(p.returncode for p in procs):
    failure = "exit codes " + str([p.returncode for p in procs])
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  stderrs = []
  for path in logs:
    with open(path, errors="replace") as f:
      stderrs.append(f.read())
  if failure:
    shown = "".join(
      f"\n===== process {i} (exit {p.returncode}) stderr, [Gloo] lines left out =====\n"
      + "\n".join(line for line in err.splitlines() if not line.startswith("[Gloo]"))[-6000:]
      for i, (p, err) in enumerate(zip(procs, stderrs, strict=True))
    )
    print(shown)
    pytest.fail(f"{' '.join(COMMAND[2:])} in {workdir}: {failure}{shown}", pytrace=False)
  return stderrs


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _losses(rows, split="train"):
  return [(r["step"], r["loss"]) for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 2-process run, its resume after losing checkpoint 6, and a 1-process reference."""
  base = tmp_path_factory.mktemp("multihost")
  logdir, multi, single = str(base), str(base / "multi"), str(base / "single")
  t0 = time.perf_counter()
  first = _launch(multi, logdir, processes=NUM_PROCESSES, devices=LOCAL_DEVICES)
  t1 = time.perf_counter()
  uninterrupted = _rows(multi)
  state_files = sorted(os.listdir(os.path.join(multi, "checkpoints", "6", "state")))
  # Lose the newest checkpoint (a truncated / corrupt write): the rerun sets it aside and
  # resumes from step 3, recomputing steps 4-6.
  for root, _, files in os.walk(os.path.join(multi, "checkpoints", "6", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  resumed = _launch(multi, logdir, processes=NUM_PROCESSES, devices=LOCAL_DEVICES)
  t2 = time.perf_counter()
  _launch(single, logdir, processes=1, devices=NUM_PROCESSES * LOCAL_DEVICES)
  t3 = time.perf_counter()
  print(f"wall: 2-process {t1 - t0:.1f} s, resume {t2 - t1:.1f} s, 1-process {t3 - t2:.1f} s")
  return dict(
    first=first,
    resumed=resumed,
    uninterrupted=uninterrupted,
    state_files=state_files,
    multi=multi,
    single=single,
  )


@pytest.mark.slow
@pytest.mark.multidevice
def test_one_mesh_spans_both_processes(runs):
  for i, err in enumerate(runs["first"]):
    assert f"process {i} of 2, 4 local / 8 global devices" in err, err[-3000:]
  # Processes other than 0 log warnings only (one progress log per job).
  mesh_line = "mesh {'data': 4, 'fsdp': 1, 'tensor': 1, 'sequence': 2} over 8 devices"
  assert mesh_line in runs["first"][0]
  assert mesh_line not in runs["first"][1]


@pytest.mark.slow
@pytest.mark.multidevice
def test_process_0_alone_writes_metrics(runs):
  rows = runs["uninterrupted"]
  assert [(r["step"], r["split"]) for r in rows] == [(s, "train") for s in range(1, 7)] + [
    (6, "eval")
  ]


@pytest.mark.slow
@pytest.mark.multidevice
def test_orbax_checkpoint_holds_both_processes_shards(runs):
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(runs["state_files"]), runs["state_files"]


@pytest.mark.slow
@pytest.mark.multidevice
def test_resume_sets_aside_the_lost_checkpoint_and_repeats_the_curve_exactly(runs):
  for err in runs["resumed"]:
    assert "CHECKPOINT OF STEP 6 IS UNREADABLE" in err, err[-3000:]
  assert "restored checkpoint of step 3" in runs["resumed"][0], runs["resumed"][0][-3000:]
  assert os.path.isdir(os.path.join(runs["multi"], "corrupt_checkpoints", "6"))
  assert _rows(runs["multi"]) == runs["uninterrupted"]  # exact: train and eval lines


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_match_one_process_on_8_devices(runs):
  multi, single = _rows(runs["multi"]), _rows(runs["single"])
  for split in ("train", "eval"):
    m, s = _losses(multi, split), _losses(single, split)
    assert [step for step, _ in m] == [step for step, _ in s]
    a, b = np.array([x for _, x in m]), np.array([x for _, x in s])
    print(split, "2-process", a.tolist(), "1-process", b.tolist(), "max |d|", np.abs(a - b).max())
    # float32 rounding only (all-reduce order, see the module docstring); not exact
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=0)
