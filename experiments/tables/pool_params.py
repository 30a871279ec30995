"""Parameter table of attention poolings: LAMA vs structured self-attention vs MHSA.

LAMA (Mehta, Rangwala, Ramakrishnan; arXiv 1912.00835) scores M heads with shared low-rank
factors U [d, k], V [d_c, k] and a mixing matrix P [k, M]: d·k + d_c·k + k·M parameters
(architecture.md §6.3), against Lin et al.'s structured self-attention (arXiv 1703.03130),
W_s1 [d_a, d] and W_s2 [M, d_a]: d·d_a + d_a·M, and one Transformer MHSA layer (Q, K, V, O
projections, no biases): 4·d².

"Ours" (LAMA) is counted from the `pool` module of a `Transformer(pool="lama")` classifier built
with `nnx.eval_shape` (no memory is allocated), with the closed form as the cross-check (✓ when
equal); d_c = d because this package's LAMA context c is the masked mean of the token states.
The Lin et al. and MHSA columns are closed forms (they are not pooling modules here).

Settings (the paper's own table was not retrieved, so its numbers are not claimed):
- "Lin et al. 2017": BiLSTM 2×300 (d = 600), d_a = 350, r = M = 30 heads (Lin et al.'s Yelp/age
  setting); LAMA with k = d_a.
- "BiGRU 2×128": the small analogue of architecture.md §6.4 (d = 256), M = 4, k = d_a = 64.
- "listops default" / "smoke": this package's classifier widths (d = 128 / 32) with the pooling's
  default knobs (M = 4, k = d // 2), d_a = k.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from attnzoo.attention import pooling
from attnzoo.models import ModelConfig, Transformer
from experiments.tables import common

NAME = "pool_params"
TITLE = "Attention pooling parameters: LAMA vs structured self-attention vs MHSA"

# name: (d, k or None = the default d // 2, M or None = the default, d_a)
SETTINGS = {
  "Lin et al. 2017 (BiLSTM 2×300, r=30)": (600, 350, 30, 350),
  "BiGRU 2×128 (§6.4 analogue)": (256, 64, 4, 64),
  "listops default (d=128, LAMA defaults)": (128, None, None, 64),
  "smoke (d=32, LAMA defaults)": (32, None, None, 16),
}


def count_lama(d: int, knobs: dict) -> int:
  """`nnx.Param` elements of the LAMA pooling of a classifier of width d (abstract build)."""
  cfg = ModelConfig(
    task="classify",
    vocab_size=16,
    input_len=8,
    num_classes=2,
    dim=d,
    num_layers=1,
    num_heads=4,
    pool="lama",
    pool_knobs=tuple(sorted(knobs.items())),
  )
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.pool, nnx.Param)))


def run(results_dir: str, size: str) -> str:
  del size  # arithmetic on abstract models: the same in every size
  entry = pooling.get_pooling("lama")
  rows, doc, ok = [], {}, 0
  for name, (d, k, m, d_a) in SETTINGS.items():
    knobs = {key: v for key, v in (("rank", k), ("num_heads", m)) if v is not None}
    values = entry.knob_values(knobs)
    k_, m_ = values["rank"] or d // 2, values["num_heads"]
    counted = count_lama(d, knobs)
    formula = d * k_ + d * k_ + k_ * m_  # d_c = d
    match = counted == formula == entry.num_params(d, knobs)
    ok += match
    lin, mhsa = d * d_a + d_a * m_, 4 * d * d
    doc[name] = dict(
      d=d, k=k_, m=m_, d_a=d_a, lama_counted=counted, lama_formula=formula, lin=lin, mhsa=mhsa
    )
    rows.append(
      [
        name,
        f"d={d}, k={k_}, M={m_}, d_a={d_a}",
        f"{counted:,}",
        f"{formula:,}",
        common.CHECK if match else common.CROSS,
        f"{lin:,}",
        f"{mhsa:,}",
        f"{counted / lin:.2f} / {counted / mhsa:.3f}",
      ]
    )
  header = [
    "setting",
    "shape",
    "LAMA ours (counted)",
    "LAMA d·k + d_c·k + k·M",
    "match",
    "Lin et al. d·d_a + d_a·M",
    "MHSA 4·d²",
    "LAMA / Lin, / MHSA",
  ]
  lines = [
    f"# {TITLE}",
    "",
    "LAMA counted from the `pool` module of `Transformer(pool='lama')` built with",
    "`nnx.eval_shape` (d_c = d: the context is the masked mean of the states); the closed form",
    "is the cross-check. Lin et al. and MHSA are closed forms. The classifier head after",
    "pooling is not counted (LAMA widens it from d to M·d inputs). At k = d_a LAMA has about",
    "twice Lin et al.'s pooling parameters (the extra d_c·k of the context factor); it is smaller",
    "only with k < d_a·(d + M)/(2d + M), and far smaller than one MHSA layer.",
    "",
    common.markdown_table(header, rows),
  ]
  common.write_markdown(results_dir, NAME, "\n".join(lines))
  common.write_json(results_dir, NAME, doc)
  return f"{NAME}: {ok}/{len(SETTINGS)} LAMA rows counted from the built pooling = closed form"
