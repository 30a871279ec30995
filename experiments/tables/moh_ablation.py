"""MoH Table 6 ablation (arXiv 2410.11842): shared heads and two-stage routing, learned.

The paper (MoH-ViT-S, ImageNet-1K top-1): no shared heads / no two-stage routing 75.6,
+ shared heads 78.3, + two-stage routing 78.6. Our analogue: a small ViT on sklearn's 8x8
digits (2x2 patches → a 4x4 token grid, 4 layers, D = 64, 8 heads), every row with the same
75 % active heads and the same budget, ≥ 3 seeds per row, test accuracy mean ± std. Paired:
seed s gives every row the same data order, and the three MoH rows the same initial weights
(they declare the same arrays), so the per-seed differences between consecutive rows are
reported too. Plain MHA (the `softmax` family) is trained beside them as a reference row.

Rows (knobs of the `moh` family; the code's gate convention):
- no shared, no two-stage: num_shared = 0, top_k = 6 (6 of 8 heads routed per token);
- + shared heads:          num_shared = 4, top_k = 2, two_stage = False (α fixed at ½);
- + two-stage routing:     num_shared = 4, top_k = 2, two_stage = True (α = softmax(W_h x)).

The ordering check is the paper's: mean(no shared) < mean(+shared) < mean(+two-stage). It is
marked ✓ or ✗ with the numbers whatever it shows; nothing is tuned per row. "quick" trains 400
steps per run, "all" 1,000 (digits' own config), 3 seeds each way.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import logging

from attnzoo import training
from configs import digits
from experiments.tables import common

NAME = "moh_ablation"
TITLE = "MoH Table 6: shared heads and two-stage routing (digits ViT analogue, 3 seeds)"

PAPER = {  # row -> MoH-ViT-S top-1 (%), Table 6
  "no shared, no two-stage": 75.6,
  "+ shared heads": 78.3,
  "+ two-stage routing": 78.6,
}
ROWS = {
  "no shared, no two-stage": ("moh", dict(num_shared=0, top_k=6, two_stage=False)),
  "+ shared heads": ("moh", dict(num_shared=4, top_k=2, two_stage=False)),
  "+ two-stage routing": ("moh", dict(num_shared=4, top_k=2, two_stage=True)),
  "MHA (reference)": ("softmax", {}),
}
SEEDS = (0, 1, 2)
STEPS = {"quick": 400, "all": 1000}


def config(family: str, knobs: dict, seed: int, steps: int):
  """The digits ViT config of one row and seed."""
  c = digits.get_config(f"attention={family}")
  c.seed = seed
  c.model.patch_size = (2, 2)
  c.model.num_layers = 4
  c.model.num_heads = 8
  for k, v in knobs.items():
    c.model.knobs[family][k] = v
  c.train.steps = steps
  c.train.warmup_steps = steps // 10
  c.eval.every = steps
  c.eval.batches = 6
  c.checkpoint.every = steps
  c.checkpoint.async_save = False
  c.log_every = steps
  return c


def run(results_dir: str, size: str, log=print) -> str:
  steps = STEPS.get(size, STEPS["quick"])
  accs: dict[str, list[float]] = {}
  with tempfile.TemporaryDirectory() as tmp:
    for row, (family, knobs) in ROWS.items():
      for seed in SEEDS:
        t0 = time.perf_counter()
        verbosity = logging.get_verbosity()
        logging.set_verbosity(logging.WARNING)
        try:
          metrics = training.train_and_evaluate(
            config(family, knobs, seed, steps), os.path.join(tmp, f"{family}-{len(accs)}-{seed}")
          )
        finally:
          logging.set_verbosity(verbosity)
        accs.setdefault(row, []).append(100.0 * metrics["accuracy"])
        log(
          f"[{NAME}] {row} seed {seed}: {accs[row][-1]:.2f} % "
          f"({time.perf_counter() - t0:.0f} s, {steps} steps)"
        )
  stats = {
    row: dict(
      mean=statistics.mean(a),
      std=statistics.stdev(a) if len(a) > 1 else 0.0,
      seeds=a,
    )
    for row, a in accs.items()
  }
  ablation = [stats[row]["mean"] for row in PAPER]
  holds = ablation[0] < ablation[1] < ablation[2]
  names = list(PAPER)
  paired = {}
  for lo, hi in zip(names, names[1:], strict=False):
    d = [b - a for a, b in zip(accs[lo], accs[hi], strict=True)]
    paired[f"{hi} − {lo}"] = dict(
      mean=statistics.mean(d), std=statistics.stdev(d) if len(d) > 1 else 0.0, seeds=d
    )
  rows = []
  for row, s in stats.items():
    per_seed = ", ".join(f"{a:.1f}" for a in s["seeds"])
    rows.append([row, PAPER.get(row, "—"), f"{s['mean']:.2f} ± {s['std']:.2f}", per_seed])
  mark = common.CHECK if holds else common.CROSS
  means = " / ".join(f"{m:.2f}" for m in ablation)
  text = "\n".join(
    [
      f"# {TITLE}",
      "",
      __doc__.split("\n\n", 1)[1].strip(),
      "",
      common.markdown_table(
        ["row", "paper top-1 % (ImageNet)", "ours test acc % (mean ± std)", "per seed"], rows
      ),
      "",
      f"Ordering no-shared < +shared < +two-stage: {mark} (ours {means}; paper 75.6 < 78.3 < "
      f"78.6). {steps} steps per run, seeds {list(SEEDS)}.",
      "",
      "Paired differences (same seed), percentage points:",
      "",
      common.markdown_table(
        ["step", "paper", "ours Δ (mean ± std)", "per seed"],
        [
          [
            name,
            f"{PAPER[name.split(' − ')[0]] - PAPER[name.split(' − ')[1]]:+.1f}",
            f"{p['mean']:+.2f} ± {p['std']:.2f}",
            ", ".join(f"{x:+.2f}" for x in p["seeds"]),
          ]
          for name, p in paired.items()
        ],
      ),
    ]
  )
  common.write_markdown(results_dir, NAME, text)
  common.write_json(
    results_dir, NAME, dict(steps=steps, stats=stats, paired=paired, ordering_holds=holds)
  )
  return f"ordering {mark} ({means}), MHA {stats['MHA (reference)']['mean']:.2f}"
