"""BAM (arXiv 2408.08274) Table 9 (small-scale parameter counts) and Table 7 (FLOPs per token).

Small scale (spec: shared/papers/architecture.md §12.1, §12.4, Appendix A): D = 1024, d_ff =
4096 SwiGLU, 8 heads, 6 layers, vocabulary 256,000, untied embeddings, parallel-attention
blocks; BAM = soft MoA over E = 4 attention experts (KV experts) + top-1 MoE FFN over 4 experts;
BTX = dense attention + the same MoE FFN.

Parameter counts are counted from `Transformer`s built with `nnx.eval_shape` (nothing is
allocated) and compared with the paper and with the closed form that hits its digits:

    dense      2VD + L(4D² + 1.5·D·d_ff + D) + D
    BAM total  2VD + L(E·4D² + E·1.5·D·d_ff + 2·E·D + D) + D       (two routers per block)
    BAM active 2VD + L(E·4D² + k·1.5·D·d_ff + E·D + D) + D         (the paper counts one)
    BTX total  2VD + L(4D² + E·1.5·D·d_ff + E·D + D) + D

Conventions (how the built model maps to the paper's):
- "SwiGLU with d_ff = 4096 has 1.5·D·d_ff parameters": a fused input projection D -> d_ff split
  into gate and up halves, so the model is built with gated mlp_dim = d_ff / 2 = 2048
  (up, gate [D, 2048] + down [2048, D] = 1.5·D·d_ff).
- One norm per parallel block + the final norm (the L·D + D terms): the model's
  block="parallel" with RMSNorm (a scale only).
- The model's output head has a bias (V = 256,000 parameters) that the paper's untied output
  embedding does not: it is counted, shown, and subtracted before comparing.
- "Active" drops the k-unselected FFN experts and, as the paper's digits require, one of the two
  D·E routers of a BAM block (the built model has both: attention and FFN router).

FLOPs per token and layer (Table 7, n_ctx = 256), Appendix A:

    attention(E) = E·(6D² + 2·n_ctx·D + 2D²),  ffn(k) = 3k·D·d_ff + 1.5·k·d_ff,  router(E) = 2ED

cross-checked against the built layer's shapes: 2 × (q, k, v, o parameters) + 2·n_ctx·(query
heads × head dim), 2k × (one expert's parameters) + 3k·mlp_dim, 2 × (router parameters).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from attnzoo.models import ModelConfig, Transformer
from experiments.tables import common

NAME = "bam_params"
TITLE = "BAM (arXiv 2408.08274): Table 9 parameter counts and Table 7 FLOPs per token"

D, D_FF, HEADS, LAYERS, VOCAB, N_CTX = 1024, 4096, 8, 6, 256_000, 256

PAPER_PARAMS = {
  "Dense": 587_209_728,
  "BAM total": 776_002_560,
  "BAM active": 662_731_776,
  "BTX (4 experts, top-1) total": 700_480_512,
}
PAPER_FLOPS = {
  "BAM attention": 35_651_584,
  "BAM FFN": 12_589_056,
  "BAM total": 48_257_024,
  "BTX attention": 8_912_896,
  "BTX total": 21_510_144,
  "BTX 6 experts top-3 FFN": 37_767_168,
  "BTX 6 experts top-3 total": 46_692_352,
}

DENSE = ModelConfig(
  task="lm",
  vocab_size=VOCAB,
  input_len=N_CTX,
  dim=D,
  num_layers=LAYERS,
  num_heads=HEADS,
  mlp_dim=D_FF // 2,
  mlp="gated",
  block="parallel",
  norm="rms",
  position="rope",
)


def config(kind: str, *, experts: int = 4, top_k: int = 1, share_kv: bool = False) -> ModelConfig:
  """ "dense", "bam" (MoA + MoE) or "btx" (dense attention + MoE) at the small scale."""
  if kind == "dense":
    return DENSE
  moe = dataclasses.replace(DENSE, mlp="moe", num_experts=experts, moe_top_k=top_k)
  if kind == "btx":
    return moe
  if kind == "bam":
    knobs = (("bam", (("num_experts", experts), ("share_kv", share_kv))),)
    return dataclasses.replace(moe, attention=("bam",), knobs=knobs)
  raise ValueError(f"kind={kind!r} is not one of 'dense', 'bam', 'btx'")


def build(cfg: ModelConfig) -> Transformer:
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def param_groups(model: Transformer) -> dict[str, int]:
  """`nnx.Param` elements by role: attention, attn_router, ffn, ffn_router, norms, embed,
  head (kernel), head_bias."""
  groups = dict.fromkeys(
    ("attention", "attn_router", "ffn", "ffn_router", "norms", "embed", "head", "head_bias"), 0
  )
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    p = "/".join(str(x) for x in path)
    size = int(np.prod(leaf.shape))
    if "/attn/family_params/" in p:
      groups["attn_router"] += size
    elif "/attn/" in p:
      groups["attention"] += size
    elif p.endswith("/mlp/router"):
      groups["ffn_router"] += size
    elif "/mlp/" in p:
      groups["ffn"] += size
    elif p.endswith("norm/scale"):
      groups["norms"] += size
    elif p.startswith("embed/"):
      groups["embed"] += size
    elif p == "head/bias":
      groups["head_bias"] += size
    else:
      groups["head"] += size
  return groups


def formula_params(kind: str, *, experts: int = 4, top_k: int = 1, active: bool = False) -> int:
  """Appendix A's closed forms (see the module docstring)."""
  ffn = 3 * D_FF * D // 2
  attn_experts = experts if kind == "bam" else 1
  ffn_experts = 1 if kind == "dense" else (top_k if active else experts)
  routers = {"dense": 0, "btx": 1, "bam": 1 if active else 2}[kind]
  per_layer = attn_experts * 4 * D * D + ffn_experts * ffn + routers * experts * D + D
  return 2 * VOCAB * D + LAYERS * per_layer + D


def formula_flops(attn_experts: int, top_k: int, routers: list[int]) -> dict[str, int]:
  """Table 7 per token and layer: {attention, ffn, router, total} (Appendix A)."""
  attention = attn_experts * (6 * D * D + 2 * N_CTX * D + 2 * D * D)
  ffn = 3 * top_k * D * D_FF + 3 * top_k * D_FF // 2
  router = sum(2 * e * D for e in routers)
  return dict(attention=attention, ffn=ffn, router=router, total=attention + ffn + router)


def model_flops(model: Transformer) -> dict[str, int]:
  """The same FLOPs from the built layer's shapes (block 0): matmuls 2·params, attention
  context term 2·n_ctx·(query heads × head dim), SwiGLU elementwise 3·mlp_dim per expert."""
  block = model.blocks[0]
  size = lambda a: int(np.prod(a.shape))
  attn = block.attn
  proj = sum(size(m.kernel) for m in (attn.query, attn.key, attn.value, attn.out))
  attention = 2 * proj + 2 * N_CTX * attn.dims.N * attn.dims.H
  routers = [size(v) for v in jax.tree.leaves(nnx.state(attn.family_params, nnx.Param))]
  mlp = block.mlp
  k = getattr(mlp, "top_k", 1)
  if hasattr(mlp, "router"):
    expert = sum(size(getattr(mlp, n)) for n in ("up", "gate", "down")) // mlp.num_experts
    hidden = mlp.up.shape[-1]
    routers.append(size(mlp.router))
  else:
    expert = sum(size(getattr(mlp, n).kernel) for n in ("up", "gate", "down"))
    hidden = mlp.up.kernel.shape[-1]
  ffn = 2 * k * expert + 3 * k * hidden
  router = sum(2 * r for r in routers)
  return dict(attention=attention, ffn=ffn, router=router, total=attention + ffn + router)


def _mark(match: bool) -> str:
  return common.CHECK if match else common.CROSS


def run(results_dir: str, size: str) -> str:
  del size  # arithmetic on abstract models: the same in every size
  ok = total = 0
  doc: dict = {"params": {}, "flops": {}}
  models = {
    "dense": build(config("dense")),
    "bam": build(config("bam")),
    "btx": build(config("btx")),
    "btx6": build(config("btx", experts=6, top_k=3)),
    "bam_kv_sharing": build(config("bam", share_kv=True)),
  }
  groups = {k: param_groups(m) for k, m in models.items()}
  E = 4

  def counted(kind, active=False):
    g = groups[kind]
    n = sum(g.values())
    if active:  # k = 1 of E FFN experts, and one router per block (the paper's convention)
      n -= (E - 1) * (g["ffn"] // E) + g["attn_router"]
    return n, g["head_bias"]

  param_rows = []
  for label, kind, active in (
    ("Dense", "dense", False),
    ("BAM total", "bam", False),
    ("BAM active", "bam", True),
    ("BTX (4 experts, top-1) total", "btx", False),
  ):
    n, bias = counted(kind, active)
    ours = n - bias
    formula = formula_params(kind, active=active)
    match = ours == formula == PAPER_PARAMS[label]
    ok, total = ok + match, total + 1
    doc["params"][label] = dict(counted=n, head_bias=bias, ours=ours, formula=formula)
    param_rows.append(
      [label, f"{PAPER_PARAMS[label]:,}", f"{n:,}", f"{ours:,}", f"{formula:,}", _mark(match)]
    )
  n, bias = counted("bam_kv_sharing")
  doc["params"]["BAM KV sharing total"] = dict(counted=n, head_bias=bias, ours=n - bias)
  param_rows.append(
    ["BAM KV sharing total", "(cell inconsistent, §12.4)", f"{n:,}", f"{n - bias:,}", "", "—"]
  )

  flop_specs = {
    "BAM": ("bam", formula_flops(E, 1, [E, E])),
    "BTX": ("btx", formula_flops(1, 1, [E])),
    "BTX 6 experts top-3": ("btx6", formula_flops(1, 3, [6])),
  }
  flop_rows = []
  for label, paper in PAPER_FLOPS.items():
    model_label, part = label.rsplit(" ", 1)
    kind, formula = flop_specs[model_label]
    part = part.lower()
    built = model_flops(models[kind])[part]
    match = built == formula[part] == paper
    ok, total = ok + match, total + 1
    doc["flops"][label] = dict(paper=paper, formula=formula[part], model=built)
    flop_rows.append([label, f"{paper:,}", f"{formula[part]:,}", f"{built:,}", _mark(match)])

  lines = [
    f"# {TITLE}",
    "",
    f"Small scale: D={D}, d_ff={D_FF} (SwiGLU), {HEADS} heads, {LAYERS} layers, vocab {VOCAB:,},",
    "untied embeddings, parallel blocks; BAM = 4 attention experts (KV experts, soft) + 4 FFN",
    "experts (top-1); BTX = dense attention + 4 FFN experts (top-1).",
    "",
    "## Table 9: parameters (counted from `Transformer`s built with `nnx.eval_shape`)",
    "",
    "Conventions: the model's SwiGLU is built with mlp_dim = d_ff/2 (the paper's 1.5·D·d_ff);",
    "its output head carries a bias of V = 256,000 parameters that the paper's untied output",
    "embedding does not, so 'ours' = counted - head bias; 'active' drops the 3 unselected FFN",
    "experts and one of the two D·E routers per BAM block (the paper counts one).",
    "",
    common.markdown_table(
      ["row", "paper", "counted (model)", "ours (- head bias)", "closed form", "match"],
      param_rows,
    ),
    "",
    f"## Table 7: FLOPs per token and layer, n_ctx = {N_CTX}",
    "",
    "Closed form: attention E·(6D² + 2·n_ctx·D + 2D²), FFN 3k·D·d_ff + 1.5·k·d_ff, routers",
    "2·E·D each (BAM: two). 'From the model': 2 x (projection / expert / router parameters of",
    "block 0) + 2·n_ctx·(query heads x head dim) + 3k·mlp_dim.",
    "",
    common.markdown_table(["row", "paper", "closed form", "from the model", "match"], flop_rows),
  ]
  common.write_markdown(results_dir, NAME, "\n".join(lines))
  common.write_json(results_dir, NAME, doc)
  return f"{NAME}: {ok}/{total} cells match the paper (Table 9 counted from the built models)"
