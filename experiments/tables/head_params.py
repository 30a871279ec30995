"""Parameter overheads of head-level families, counted from the built NNX models.

- MoH (arXiv 2410.11842): the router adds D·(h + 2) parameters per layer (W_s, W_r, W_h); the
  paper's model tables print totals with and without it (LLM config table: LLM-S 186/186 M,
  LLM-B 881/882 M; Table 2: DiT-S/B/L 33/33, 130/131, 458/459 M).
- Affine-scaled attention (arXiv 2602.23057), Table 1 ΔParams: 0.4 / 1.0 / 2.1 M for the 0.5B /
  1B / 3B students (L·D·H: α's projection W_a [D, H] per layer; shapes inferred from the named
  base models, see shared/papers/architecture.md §9.4).

"Ours" is the difference of `nnx.Param` counts of two `Transformer`s built with
`nnx.eval_shape` (no memory is allocated) that differ only in the attention family; the closed
form is printed beside it as the cross-check. A MoH row is ✓ when the counted overhead equals the
formula and the paper's printed totals (it prints no overhead itself) are consistent with it
within their rounding to whole millions; an affine row is ✓ when the counted ΔParams prints as
the paper's value.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from attnzoo.models import ModelConfig, Transformer
from experiments.tables import common

NAME = "head_params"
TITLE = "Head-level families: parameter overheads (MoH, affine-scaled attention)"

# name: (layers L, width D, heads h, paper total without, with the router; millions)
MOH = {
  "LLM-S": (12, 768, 12, 186, 186),
  "LLM-B": (24, 1536, 16, 881, 882),
  "DiT-S": (12, 384, 6, 33, 33),
  "DiT-B": (12, 768, 12, 130, 131),
  "DiT-L": (24, 1024, 16, 458, 459),
}
# name: (L, D, H, paper ΔParams in millions as printed)
AFFINE = {
  "0.5B (Qwen1.5-0.5B shape)": (24, 1024, 16, 0.4),
  "1B (Llama-3.2-1B shape)": (16, 2048, 32, 1.0),
  "3B (Llama-3.2-3B shape)": (28, 3072, 24, 2.1),
}


def _mark(match: bool) -> str:
  return common.CHECK if match else common.CROSS


def count_params(family: str, layers: int, dim: int, heads: int) -> int:
  """`nnx.Param` elements of a Transformer whose every layer uses `family` (abstract build)."""
  cfg = ModelConfig(
    task="lm",
    vocab_size=16,
    input_len=8,
    dim=dim,
    num_layers=layers,
    num_heads=heads,
    attention=(family,),
  )
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def run(results_dir: str, size: str) -> str:
  del size  # arithmetic on abstract models: the same in every size
  rows, doc = [], {"moh": {}, "affine_scaled": {}}
  ok = total = 0
  for name, (L, D, h, base_m, moh_m) in MOH.items():
    overhead = count_params("moh", L, D, h) - count_params("softmax", L, D, h)
    formula = L * D * (h + 2)
    match = overhead == formula and abs((moh_m - base_m) - overhead / 1e6) <= 1.0
    ok, total = ok + match, total + 1
    doc["moh"][name] = dict(overhead=overhead, formula=formula, paper=(base_m, moh_m))
    rows.append(
      f"| MoH {name} | L={L}, D={D}, h={h} | {base_m} / {moh_m} M | +{overhead / 1e6:.3f} M "
      f"({overhead:,}) | {formula:,} | {_mark(match)} |"
    )
  for name, (L, D, H, paper) in AFFINE.items():
    delta = count_params("affine_scaled", L, D, H) - count_params("softmax", L, D, H)
    formula = L * D * H
    match = delta == formula and f"{delta / 1e6:.1f}" == f"{paper:.1f}"
    ok, total = ok + match, total + 1
    doc["affine_scaled"][name] = dict(delta=delta, formula=formula, paper=paper)
    rows.append(
      f"| affine-scaled {name} | L={L}, D={D}, H={H} | ΔParams {paper} M | "
      f"+{delta / 1e6:.1f} M ({delta:,}) | {formula:,} | {_mark(match)} |"
    )
  lines = [
    f"# {TITLE}",
    "",
    "Counted from `Transformer` models built with `nnx.eval_shape` that differ only in the",
    "attention family; the closed form (MoH D·(h+2), affine L·D·H per model) is the cross-check.",
    "",
    "| model | shape | paper | ours (counted) | closed form | match |",
    "|---|---|---|---|---|---|",
    *rows,
  ]
  common.write_markdown(results_dir, NAME, "\n".join(lines))
  common.write_json(results_dir, NAME, doc)
  return f"{NAME}: {ok}/{total} rows match the paper (counted from the built models)"
