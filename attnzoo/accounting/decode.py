"""Per-token decode cost of an attention layout: KV-cache bytes and attention FLOPs.

Paper: StepFun, "Step-3 is Large yet Affordable: Model-system Co-design for Cost-effective
Decoding", arXiv 2507.19427, Sec. 4 / Tables 2 and 3 (per decoded token, 8K and 32K context,
8-bit KV cache) and Sec. 5.1 (arithmetic intensity). MFA itself: Hu et al., "Multi-matrix
Factorization Attention", arXiv 2412.19255.

When a model decodes one token against a cache of `s` tokens, every layer reads the whole cache and
every query head scores and mixes `s` cached vectors:

    KV bytes  = L * s * cached_elements_per_token_per_layer * bytes_per_element
    attn FLOPs = 2 * L * Hq * s * (Dqk + Dv)            (QK^T and PV; projections excluded)

with `cached_elements = Hk * Dqk + Hv * Dv` for MHA / GQA / MQA / MFA (Hk = Hv = Hkv) and Sigma's
DiffQKV (Lin et al., arXiv 2501.13629, Eq. 1: separate key and value head counts), and
`= latent` for layouts whose key and value are read from one shared cached vector (MLA's
compressed latent, MFA-KR). The arithmetic intensity is FLOPs / bytes, independent of `s`.

Prefill / training (`attention_flops`): a sequence of T queries against S keys costs

    attn FLOPs = 2 * L * Hq * T * S * (Dqk + Dv)        (causal: T * S -> T * (T + 1) / 2)

the same convention per (query, key) pair as decoding; it is what SQA (arXiv 2510.01817)
reduces by Hq / H.

Differences from the paper / choices where it is silent:
  * "8K" and "32K" are 8192 and 32768 tokens (the report's digits match only these).
  * DeepSeek-V3's MLA row: the report counts 576 (= kv_lora_rank 512 + rope dim 64) for both the
    QK and the V dimension of the absorbed attention. The true absorbed value width is 512; the
    preset keeps the report's convention so the table can be checked, and says so.
  * FLOPs count a multiply-add as 2 and ignore softmax, scaling and masking; `attention_flops` is
    the forward pass of one sequence (batch 1; a backward pass adds about twice as much), and a
    causal count keeps only the T (T + 1) / 2 visible pairs (top-left aligned, T = S).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """The attention layout of a model, as far as decode cost is concerned.

  Attributes:
    name: label for tables.
    num_layers: L, attention layers.
    num_q_heads: Hq, query heads.
    num_kv_heads: Hkv, cached key heads, and value heads unless `num_v_heads` is given (1 for
      MQA / MFA / MLA's latent).
    qk_head_dim: Dqk, width of a query-key dot product (MLA: latent + rope dims, absorbed).
    v_head_dim: Dv, width of a value vector each query head mixes.
    shared_kv_dim: when key and value are read from one cached vector per kv head (MLA latent,
      MFA-KR), its width; None for separate K and V caches.
    bytes_per_element: bytes of one cached element (1 = the report's 8-bit KV cache).
    note: provenance of the hyper-parameters and any convention kept for a table.
    num_v_heads: cached value heads when they differ from the key heads (Sigma's DiffQKV);
      None = num_kv_heads.
  """

  name: str
  num_layers: int
  num_q_heads: int
  num_kv_heads: int
  qk_head_dim: int
  v_head_dim: int
  shared_kv_dim: int | None = None
  bytes_per_element: float = 1
  note: str = ""
  num_v_heads: int | None = None

  def __post_init__(self):
    for field in ("num_layers", "num_q_heads", "num_kv_heads", "qk_head_dim", "v_head_dim"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}={value!r} must be a positive int")
    if self.num_q_heads % self.num_kv_heads:
      raise ValueError(
        f"num_q_heads={self.num_q_heads} is not divisible by "
        f"num_kv_heads={self.num_kv_heads}: each kv head serves a whole group"
      )
    if self.num_v_heads is not None:
      if not isinstance(self.num_v_heads, int) or self.num_v_heads <= 0:
        raise ValueError(f"num_v_heads={self.num_v_heads!r} must be a positive int or None")
      if self.num_q_heads % self.num_v_heads:
        raise ValueError(
          f"num_q_heads={self.num_q_heads} is not divisible by "
          f"num_v_heads={self.num_v_heads}: each value head serves a whole group"
        )
      if self.shared_kv_dim is not None and self.num_v_heads != self.num_kv_heads:
        raise ValueError(
          f"num_v_heads={self.num_v_heads} != num_kv_heads={self.num_kv_heads} with "
          f"shared_kv_dim={self.shared_kv_dim}: a shared cached vector serves key and value "
          "alike; drop num_v_heads or shared_kv_dim"
        )
    if self.shared_kv_dim is not None and self.shared_kv_dim <= 0:
      raise ValueError(f"shared_kv_dim={self.shared_kv_dim!r} must be a positive int or None")
    if self.bytes_per_element <= 0:
      raise ValueError(f"bytes_per_element={self.bytes_per_element!r} must be positive")

  @property
  def value_heads(self) -> int:
    """Hv, cached value heads (num_v_heads, or num_kv_heads when that is None)."""
    return self.num_kv_heads if self.num_v_heads is None else self.num_v_heads

  @property
  def cached_elements_per_token(self) -> int:
    """Cache elements one token adds to one layer: Hk * Dqk + Hv * Dv (or Hkv * latent)."""
    if self.shared_kv_dim is not None:
      return self.num_kv_heads * self.shared_kv_dim
    return self.num_kv_heads * self.qk_head_dim + self.value_heads * self.v_head_dim

  @property
  def effective_rank(self) -> int:
    """Total attention effective rank Hq * Dqk (Step-3 report Sec. 5.1)."""
    return self.num_q_heads * self.qk_head_dim


@dataclasses.dataclass(frozen=True)
class DecodeCost:
  """Cost of decoding one token against `context_len` cached tokens (all layers)."""

  context_len: int
  kv_cache_bytes: float
  attention_flops: float

  @property
  def arithmetic_intensity(self) -> float:
    """FLOPs per byte of KV cache read."""
    return self.attention_flops / self.kv_cache_bytes


def decode_cost(spec: AttentionSpec, context_len: int) -> DecodeCost:
  """KV-cache bytes read and attention FLOPs (no projections) for one decoded token."""
  if not isinstance(context_len, int) or context_len <= 0:
    raise ValueError(f"context_len={context_len!r} must be a positive int (cached tokens)")
  kv_bytes = spec.num_layers * context_len * spec.cached_elements_per_token * spec.bytes_per_element
  flops = (
    2 * spec.num_layers * spec.num_q_heads * context_len * (spec.qk_head_dim + spec.v_head_dim)
  )
  return DecodeCost(
    context_len=context_len, kv_cache_bytes=float(kv_bytes), attention_flops=float(flops)
  )


def attention_flops(
  spec: AttentionSpec, seq_len: int, *, kv_len: int | None = None, causal: bool = False
) -> float:
  """Attention FLOPs (QK^T and PV, no projections) of one forward pass over one sequence.

  2 * L * Hq * pairs * (Dqk + Dv), pairs = seq_len * kv_len (kv_len None = seq_len), or with
  `causal` the seq_len * (seq_len + 1) / 2 visible pairs (needs kv_len == seq_len).
  """
  if not isinstance(seq_len, int) or seq_len <= 0:
    raise ValueError(f"seq_len={seq_len!r} must be a positive int (query tokens)")
  kv_len = seq_len if kv_len is None else kv_len
  if not isinstance(kv_len, int) or kv_len <= 0:
    raise ValueError(f"kv_len={kv_len!r} must be a positive int (key tokens) or None")
  if causal and kv_len != seq_len:
    raise ValueError(
      f"causal=True counts the top-left aligned triangle and needs kv_len == seq_len; got "
      f"seq_len={seq_len}, kv_len={kv_len} (count such a mask's pairs yourself)"
    )
  pairs = seq_len * (seq_len + 1) // 2 if causal else seq_len * kv_len
  return float(
    2 * spec.num_layers * spec.num_q_heads * pairs * (spec.qk_head_dim + spec.v_head_dim)
  )


# Published hyper-parameters (8-bit KV cache, as in the Step-3 report's Tables 2 and 3).
STEP3 = AttentionSpec(
  name="Step-3 (MFA)",
  num_layers=61,
  num_q_heads=64,
  num_kv_heads=1,
  qk_head_dim=256,
  v_head_dim=256,
  note="Step-3 report Sec. 3: 61 layers, 64 query heads, one K and one V head of dim 256 "
  "(MFA; query low-rank 2048 does not enter decode cost)",
)
DEEPSEEK_V3 = AttentionSpec(
  name="DeepSeek-V3 (MLA)",
  num_layers=61,
  num_q_heads=128,
  num_kv_heads=1,
  qk_head_dim=576,
  v_head_dim=576,
  shared_kv_dim=576,
  note="MLA absorbed: cache kv_lora_rank 512 + rope 64 = 576 per token and layer; the report "
  "counts 576 for the value width too (true absorbed value width: 512)",
)
QWEN3_235B = AttentionSpec(
  name="Qwen3-235B-A22B (GQA)",
  num_layers=94,
  num_q_heads=64,
  num_kv_heads=4,
  qk_head_dim=128,
  v_head_dim=128,
  note="Qwen3 report: 94 layers, 64 query / 4 kv heads, head dim 128",
)
QWEN3_32B = AttentionSpec(
  name="Qwen3-32B (GQA)",
  num_layers=64,
  num_q_heads=64,
  num_kv_heads=8,
  qk_head_dim=128,
  v_head_dim=128,
  note="Qwen3 report: 64 layers, 64 query / 8 kv heads, head dim 128",
)

PRESETS: dict[str, AttentionSpec] = {
  "step3": STEP3,
  "deepseek_v3": DEEPSEEK_V3,
  "qwen3_235b": QWEN3_235B,
  "qwen3_32b": QWEN3_32B,
}
