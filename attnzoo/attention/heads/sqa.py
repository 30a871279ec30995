"""SQA: Sparse Query Attention — fewer query heads than the model's head split.

"Sparse Query Attention (SQA): A Computationally Efficient Attention Mechanism with Query
Heads Reduction" (Filipek, Reactive AI; arXiv 2510.01817), §3 and the author's write-up
(`RxAI-dev/RxNN/docs/research/sparse_query_attention.md`). The model keeps its head split H
(head dim d_head = D / H) but projects only H_q < H query heads and H_kv ≤ H_q key/value heads:

    Q = X W_q,  W_q [D, H_q·d_head];   K = X W_k, V = X W_v,  [D, H_kv·d_head]
    O_h = softmax(Q_h K_{g(h)}ᵀ / √d_head) V_{g(h)},  g(h) = floor(h·H_kv / H_q),  h < H_q
    Y = concat(O_1 .. O_{H_q}) W_o,  W_o [H_q·d_head, D]

The score and value products cost 2·T·S·d_head per query head, so attention FLOPs scale as
H_q / H (theoretical speed-up H / H_q); `attnzoo.accounting.attention_flops` counts them.

Variants (knob `variant`, the write-up's experiments):
    "sqa":   H_q = H/2, H_kv = H/4        "ssqa":  H_q = H_kv = H/2 (symmetric)
    "xsqa":  H_q = H_kv = H/4 (extreme)   "xsmqa": H_q = H/4, H_kv = 1
`num_query_heads` / `num_kv_heads` override the preset's counts (None = from the preset).

Implementation: the head layout is `FAMILY.heads` (the layer then builds query [D,H_q,d_head],
key/value [D,H_kv,d_head] and out [H_q,d_head,D]); the function itself is softmax attention
(`dot_product_attention`, implementations "xla", "chunked", "pallas") on those heads. The
layout knobs are read by `FAMILY.heads` when the layer is built; the function accepts and
ignores them (its inputs already have H_q / H_kv heads).

Differences from the paper: none in the math. The model's `num_kv_heads` is not used by this
family: the preset (or `num_kv_heads` knob) sets H_kv.

Choices where the paper is silent:
- Default variant "sqa" (the paper's headline H_q = H/2, H_kv = H/4).
- A preset whose fraction does not divide H raises (no rounding): e.g. "sqa" needs H % 4 == 0.
- d_head stays D / H (the model's), as the paper's "keep the head split"; with an explicit
  `head_dim` in the model config that value is used.
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Float

from attnzoo.attention import registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.masks import Mask
from pallas_kernels.block_sparse import BlockSizes

# variant -> (H / H_q, H / H_kv); None = one kv head (MQA-style).
VARIANTS: dict[str, tuple[int, int | None]] = {
  "sqa": (2, 4),
  "ssqa": (2, 2),
  "xsqa": (4, 4),
  "xsmqa": (4, None),
}
_IMPLEMENTATIONS = ("xla", "chunked", "pallas")


def resolve_heads(
  num_heads: int,
  *,
  variant: str = "sqa",
  num_query_heads: int | None = None,
  num_kv_heads: int | None = None,
) -> tuple[int, int]:
  """(H_q, H_kv) for a model with `num_heads` = H; ValueError naming the value and the fix."""
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} must be one of {sorted(VARIANTS)}")
  q_div, kv_div = VARIANTS[variant]
  if num_query_heads is None:
    if num_heads % q_div:
      raise ValueError(
        f"variant={variant!r} uses H_q = H/{q_div}, but the model has H={num_heads} heads; "
        f"choose H divisible by {q_div}, another variant, or set num_query_heads"
      )
    num_query_heads = num_heads // q_div
  if num_kv_heads is None:
    if kv_div is not None and num_heads % kv_div:
      raise ValueError(
        f"variant={variant!r} uses H_kv = H/{kv_div}, but the model has H={num_heads} heads; "
        f"choose H divisible by {kv_div}, another variant, or set num_kv_heads"
      )
    num_kv_heads = 1 if kv_div is None else num_heads // kv_div
  if not 1 <= num_query_heads <= num_heads:
    raise ValueError(
      f"num_query_heads={num_query_heads} must be in [1, H] = [1, {num_heads}]: SQA uses at "
      "most the model's head split"
    )
  if num_kv_heads < 1 or num_query_heads % num_kv_heads:
    raise ValueError(
      f"num_kv_heads={num_kv_heads} must divide H_q={num_query_heads} (grouped kv heads); "
      f"choose num_kv_heads among the divisors of {num_query_heads}"
    )
  return num_query_heads, num_kv_heads


def attention(
  q: Float[Array, "B T Nq H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  mask: Mask | jax.Array | None = None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
  logits_soft_cap: float | None = None,
  variant: str = "sqa",
  num_query_heads: int | None = None,
  num_kv_heads: int | None = None,
  implementation: str | None = None,
  block_sizes: BlockSizes | None = None,
  interpret: bool | None = None,
) -> Float[Array, "B T Nq V"]:
  """SQA attention on the reduced heads; see the module docstring.

  Args:
    q, k, v: [B,T,H_q,d], [B,S,H_kv,d], [B,S,H_kv,Hv] (the layer's reduced heads).
    mask, bias, is_causal, scale, segment_ids, logits_soft_cap: as `dot_product_attention`.
    variant, num_query_heads, num_kv_heads: the head layout (read by `FAMILY.heads` when the
      layer is built; checked here only for a known variant name).
    implementation: "xla", "chunked" or "pallas"; None = automatic.
    block_sizes, interpret: as `dot_product_attention`.
  """
  del num_query_heads, num_kv_heads  # the layout knobs act through FAMILY.heads
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} must be one of {sorted(VARIANTS)}")
  impl = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="sqa"
  )
  return dot_product_attention(
    q,
    k,
    v,
    mask=mask,
    bias=bias,
    is_causal=is_causal,
    scale=scale,
    segment_ids=segment_ids,
    logits_soft_cap=logits_soft_cap,
    implementation=impl,
    block_sizes=block_sizes,
    interpret=interpret,
  )


def layer_heads(dims: registry.Dims) -> registry.Dims:
  """The layer's layout: H_q query heads and H_kv key/value heads at the model's head dim."""
  knobs = dims.knobs
  num_q, num_kv = resolve_heads(
    dims.N,
    variant=knobs.get("variant", "sqa"),
    num_query_heads=knobs.get("num_query_heads"),
    num_kv_heads=knobs.get("num_kv_heads"),
  )
  return dims.replace(N=num_q, K=num_kv, Kv=num_kv)


FAMILY = registry.Family(
  name="sqa",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="Sparse Query Attention (arXiv 2510.01817)",
  heads=layer_heads,
  conformance=registry.Conformance(
    # One setting: the function is softmax attention on the heads it is given; "ssqa" is the
    # preset valid for the smoke configs' 2-head models (the smoke-train reads this setting).
    cases={"ssqa": registry.ConformanceCase(options={"variant": "ssqa"})},
    implementation_options={
      "chunked": {"block_sizes": BlockSizes(16, 8)},
      "pallas": {"block_sizes": BlockSizes(16, 16)},  # interpreted on CPU (logged)
    },
    slow=("pallas",),
  ),
)
