"""`ModelConfig`: every hyper-parameter of the transformer stack, frozen and hashable."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from attnzoo.attention import pooling as pooling_lib

TASKS = ("lm", "classify")
# Former names of fields -> the one name each concept has now (configs using them get an error).
RENAMED = {
  "kv_heads": "num_kv_heads",
  "head_size": "head_dim",
  "hidden_dim": "mlp_dim",
  "max_len": "input_len",
  "attention_output_norm": "knobs.<family>.hooks = 'srms_norm'",
  "attention_output_gate": "knobs.<family>.hooks = 'output_gate'",
}
EMBEDDINGS = ("tokens", "patches")
MLPS = ("plain", "gated", "moe")
BLOCKS = ("sequential", "parallel")
# The pooling every config declares; the only one an "lm" model (which does not pool) accepts.
DEFAULT_POOL = "mean"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of `Transformer`. Built from a ConfigDict in one place
  (`attnzoo.training.builders.model_config`); modules only ever see this.

  Attributes:
    task: "lm" (causal decoder, logits at every position) or "classify"
      (bidirectional encoder, pooled by `pool`, one label per sequence).
    vocab_size: input token vocabulary (pixel intensity levels for images).
    input_len: L, the number of input ids per example (pixels for images; the tokens that
      attention sees are `seq_len`, fewer when patches group pixels).
    num_classes: labels of a "classify" model.
    dim, num_layers, num_heads: D, L layers, N.
    num_kv_heads: K (N % K == 0): N = MHA, 1 = MQA, between = GQA. 0 means N (resolved
      in __post_init__: after construction it is always the actual K).
    head_dim: H; 0 means D // N (resolved likewise).
    mlp_dim: feed-forward width; 0 means 4 D (plain) or 8/3 D rounded to 8 (gated) (resolved).
    mlp: "plain", "gated" or "moe" (top-k mixture of gated experts, `attnzoo.nn.MoEFFN`);
      activation: "gelu", "relu" or "silu" (gated + silu = SwiGLU).
    num_experts, moe_top_k: E experts and k per token of mlp="moe" (ignored otherwise).
    block: "sequential" (x + attn(norm x), then + mlp(norm x)) or "parallel"
      (x + attn(norm x) + mlp(norm x), ONE shared norm as GPT-J / PaLM / BAM).
    norm: "rms" or "layer".
    attention: family name per layer; cycled when shorter than num_layers (hybrids).
    knobs: (family, ((knob, value), ...)) pairs: each layer passes its family's knobs
      (including the layer knob `hooks`, e.g. TNL's "srms_norm+output_gate").
    aux_weights: (loss name, weight) pairs overriding the families' default aux-loss weights.
    position: "none", "rope", "alibi" (inside attention) or "learned" (absolute, added
      to the embeddings).
    mask: name in `attnzoo.masks.MASKS` ("" = none) with `mask_kwargs` pairs.
    spatial_shape: image shape of the input (H, W); the token grid is
      spatial_shape // patch_size and is what N-D masks see.
    patch_size: () embeds every input token (pixel or byte) through a table;
      (ph, pw) embeds flattened patches of intensities linearly (ViT, arXiv 2010.11929 §3.1).
    pad_id: input id of padding (-1: none); a classifier pools over non-pad tokens only.
    dropout: residual dropout rate.
    dtype: activation dtype ("float32" / "bfloat16"); params stay float32.
    pool: a classifier's pooling over tokens, a name in `attnzoo.attention.pooling.POOLINGS`
      ("mean": masked mean, the default; "lama": LAMA attention pooling); "lm" takes only "mean".
    pool_knobs: (knob, value) pairs of that pooling (LAMA: num_heads, rank).
  """

  task: str
  vocab_size: int
  input_len: int
  num_classes: int = 0
  dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 0
  head_dim: int = 0
  mlp_dim: int = 0
  mlp: str = "gated"
  activation: str = "silu"
  num_experts: int = 0
  moe_top_k: int = 1
  block: str = "sequential"
  norm: str = "rms"
  attention: tuple[str, ...] = ("softmax",)
  knobs: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
  aux_weights: tuple[tuple[str, float], ...] = ()
  position: str = "rope"
  rope_base: float = 10000.0
  mask: str = ""
  mask_kwargs: tuple[tuple[str, Any], ...] = ()
  spatial_shape: tuple[int, ...] = ()
  patch_size: tuple[int, ...] = ()
  pad_id: int = -1
  dropout: float = 0.0
  dtype: str = "float32"
  pool: str = DEFAULT_POOL
  pool_knobs: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task={self.task!r} is not one of {TASKS}")
    if self.task == "classify" and self.num_classes < 2:
      raise ValueError(f"num_classes={self.num_classes} must be >= 2 for task='classify'")
    if self.dim % self.num_heads and not self.head_dim:
      raise ValueError(
        f"dim={self.dim} is not divisible by num_heads={self.num_heads}; set head_dim explicitly"
      )
    resolve = lambda name, value: object.__setattr__(self, name, value)
    resolve("num_kv_heads", self.num_kv_heads or self.num_heads)
    resolve("head_dim", self.head_dim or self.dim // self.num_heads)
    if not self.mlp_dim:
      gated = 8 * ((8 * self.dim // 3 + 7) // 8)
      resolve("mlp_dim", 4 * self.dim if self.mlp == "plain" else gated)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
      )
    if self.patch_size:
      if len(self.patch_size) != len(self.spatial_shape):
        raise ValueError(
          f"patch_size={self.patch_size} and spatial_shape={self.spatial_shape} "
          "must have the same number of axes"
        )
      for p, s in zip(self.patch_size, self.spatial_shape, strict=True):
        if s % p:
          raise ValueError(
            f"patch_size={self.patch_size} does not tile spatial_shape={self.spatial_shape}"
          )
    if self.spatial_shape and math.prod(self.spatial_shape) != self.input_len:
      raise ValueError(
        f"spatial_shape={self.spatial_shape} has {math.prod(self.spatial_shape)} "
        f"pixels but input_len={self.input_len}"
      )
    if self.mlp not in MLPS:
      raise ValueError(f"mlp={self.mlp!r} is not one of {MLPS}")
    if self.mlp == "moe" and not 1 <= self.moe_top_k <= self.num_experts:
      raise ValueError(
        f"mlp='moe' needs 1 <= moe_top_k <= num_experts, got moe_top_k={self.moe_top_k}, "
        f"num_experts={self.num_experts}; set model.num_experts (>= 1) and model.moe_top_k"
      )
    if self.block not in BLOCKS:
      raise ValueError(f"block={self.block!r} is not one of {BLOCKS}")
    self._check_pool()

  def _check_pool(self):
    if self.pool not in pooling_lib.POOLINGS:
      raise ValueError(
        f"pool={self.pool!r} is not a registered pooling; valid: {sorted(pooling_lib.POOLINGS)}"
      )
    if self.task == "lm" and (self.pool != DEFAULT_POOL or self.pool_knobs):
      raise ValueError(
        f"pool={self.pool!r} with pool_knobs={self.pool_knobs} applies to task='classify' "
        f"only; an 'lm' model predicts at every position: leave pool={DEFAULT_POOL!r}"
      )
    entry = pooling_lib.get_pooling(self.pool)
    entry.out_dim(entry.dims(self.dim, dict(self.pool_knobs)))  # unknown or bad knobs raise

  def knobs_of(self, family: str) -> dict[str, Any]:
    """The knobs a layer of `family` passes (empty when none were set)."""
    return dict(dict(self.knobs).get(family, ()))

  @property
  def token_grid(self) -> tuple[int, ...]:
    """Shape of the token grid seen by attention (spatial_shape // patch_size)."""
    if not self.spatial_shape:
      return ()
    patch = self.patch_size or (1,) * len(self.spatial_shape)
    return tuple(s // p for s, p in zip(self.spatial_shape, patch, strict=True))

  @property
  def seq_len(self) -> int:
    """T, the number of tokens attention sees (input_len, or the patch count of an image)."""
    return math.prod(self.token_grid) if self.spatial_shape else self.input_len
