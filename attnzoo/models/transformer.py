"""One pre-norm transformer stack: decoder LM, encoder classifier and ViT-style image model.

The stack is the same for every task; what varies is the input embedding (token table
or linear patch embedding), whether attention is causal, and the head (per-position
logits, or class logits after a pooling chosen by name). The attention family of each layer
comes from `ModelConfig.attention` through the registry, so hybrid stacks are a setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from attnzoo import masks, nn
from attnzoo.attention import pooling as pooling_lib
from attnzoo.models.config import ModelConfig


class Block(nnx.Module):
  """Pre-norm residual block. block="sequential": x + drop(attn(norm(x))), then
  x + drop(mlp(norm(x))); "parallel": x + drop(attn(n)) + drop(mlp(n)) with n = attn_norm(x),
  one norm shared by both branches (GPT-J, PaLM, BAM; `mlp_norm` is None). mlp="moe" is
  `nn.MoEFFN` (it reads the valid-token mask for its load statistics)."""

  def __init__(
    self,
    cfg: ModelConfig,
    family: str,
    *,
    layer: int,
    mask: Any,
    rngs: nnx.Rngs,
  ):
    dtype = jnp.dtype(cfg.dtype)
    self.attn_norm = nn.norm(cfg.norm, cfg.dim, dtype=dtype, rngs=rngs)
    self.attn = nn.Attention(
      cfg.dim,
      num_heads=cfg.num_heads,
      num_kv_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      family=family,
      knobs=cfg.knobs_of(family),
      aux_weights=dict(cfg.aux_weights),
      position=cfg.position if cfg.position != "learned" else "none",
      rope_base=cfg.rope_base,
      is_causal=cfg.task == "lm",
      mask=mask,
      dtype=dtype,
      layer=layer,
      num_layers=cfg.num_layers,
      rngs=rngs,
    )
    parallel = cfg.block == "parallel"
    self.mlp_norm = None if parallel else nn.norm(cfg.norm, cfg.dim, dtype=dtype, rngs=rngs)
    if cfg.mlp == "moe":
      self.mlp = nn.MoEFFN(
        cfg.dim,
        cfg.mlp_dim,
        cfg.num_experts,
        top_k=cfg.moe_top_k,
        activation=cfg.activation,
        aux_weights=dict(cfg.aux_weights),
        dtype=dtype,
        rngs=rngs,
      )
    else:
      self.mlp = nn.MLP(
        cfg.dim,
        cfg.mlp_dim,
        gated=cfg.mlp == "gated",
        activation=cfg.activation,
        dtype=dtype,
        rngs=rngs,
      )
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_BTD, positions_BT, valid_BT, *, deterministic: bool, rngs: nnx.Rngs | None):
    drop = lambda h_BTD: self.dropout(h_BTD, deterministic=deterministic, rngs=rngs)
    mlp = lambda y_BTD: (
      self.mlp(y_BTD, valid_BT) if isinstance(self.mlp, nn.MoEFFN) else self.mlp(y_BTD)
    )
    y_BTD = self.attn_norm(x_BTD)
    # The training step is the non-deterministic one; a family that samples (a Gumbel router)
    # draws its key from the same rngs as dropout.
    h_BTD = self.attn(y_BTD, positions_BT, valid_BT, train=not deterministic, rngs=rngs)
    if self.mlp_norm is None:
      return x_BTD + drop(h_BTD) + drop(mlp(y_BTD))
    x_BTD = x_BTD + drop(h_BTD)
    return x_BTD + drop(mlp(self.mlp_norm(x_BTD)))


def patchify(
  pixels_BL: Array, spatial_shape: tuple[int, ...], patch_size: tuple[int, ...]
) -> Array:
  """[B, prod(spatial)] row-major pixels -> [B, prod(grid), prod(patch)] patches, row-major."""
  B = pixels_BL.shape[0]
  grid = [s // p for s, p in zip(spatial_shape, patch_size, strict=True)]
  split = [d for g, p in zip(grid, patch_size, strict=True) for d in (g, p)]
  x = pixels_BL.reshape(B, *split)
  n = len(grid)
  x = x.transpose(0, *(1 + 2 * i for i in range(n)), *(2 + 2 * i for i in range(n)))
  return x.reshape(B, math.prod(grid), math.prod(patch_size))


class Pool(nnx.Module):
  """A classifier's pooling over tokens: `cfg.pool` from `attnzoo.attention.pooling.POOLINGS`
  with `cfg.pool_knobs`, its learned arrays as `nnx.Param`s under `params/<name>`.
  `__call__(x [B,T,D], valid [B,T]) -> (pooled [B, out_dim], weights [B,M,T] or None)`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.entry = pooling_lib.get_pooling(cfg.pool)
    dims = self.entry.dims(cfg.dim, dict(cfg.pool_knobs))
    self.knobs = dict(dims.knobs)
    self.out_dim = self.entry.out_dim(dims)
    self.params = nnx.Dict(
      {
        name: nnx.Param(spec.create(rngs.params(), dims))
        for name, spec in self.entry.params.items()
      }
    )

  def __call__(self, x_BTD, valid_BT):
    arrays = {name: self.params[name][...] for name in self.entry.params}
    return self.entry.pool(x_BTD, valid_BT, **arrays, **self.knobs)


class Transformer(nnx.Module):
  """The generic stack. `__call__(inputs [B, L] int32) -> logits`.

  task="lm": causal, logits [B, L, vocab_size] (position t predicts token t + 1).
  task="classify": bidirectional, pooled over tokens (`cfg.pool`: mean by default, or an
  attention pooling such as LAMA), logits [B, num_classes].

  Args:
    cfg: the model's hyper-parameters.
    constrain: optional `(x, logical_axes) -> x` sharding constraint applied to the
      residual stream (logical axes "batch", "length", "embed"); the trainer builds it
      from the mesh and its activation rules.
  """

  def __init__(
    self,
    cfg: ModelConfig,
    *,
    rngs: nnx.Rngs,
    constrain: Callable[..., Any] | None = None,
  ):
    self.cfg = cfg
    self.constrain = constrain
    dtype = jnp.dtype(cfg.dtype)
    if cfg.patch_size:
      self.embed = nnx.Linear(math.prod(cfg.patch_size), cfg.dim, dtype=dtype, rngs=rngs)
    else:
      self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, dtype=dtype, rngs=rngs)
    if cfg.position == "learned":
      self.pos_embed = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (cfg.seq_len, cfg.dim))
      )
    else:
      self.pos_embed = None
    mask = masks.build_mask(cfg.mask, cfg.token_grid or None, dict(cfg.mask_kwargs))
    self.blocks = nnx.List(
      [
        Block(cfg, family, layer=i, mask=mask, rngs=rngs)
        for i, family in enumerate(nn.layer_families(cfg.attention, cfg.num_layers))
      ]
    )
    self.final_norm = nn.norm(cfg.norm, cfg.dim, dtype=dtype, rngs=rngs)
    self.pool = Pool(cfg, rngs=rngs) if cfg.task == "classify" else None
    out = cfg.vocab_size if cfg.task == "lm" else cfg.num_classes
    width = cfg.dim if self.pool is None else self.pool.out_dim
    self.head = nnx.Linear(width, out, dtype=dtype, rngs=rngs)

  def _constrain(self, x_BTD):
    return x_BTD if self.constrain is None else self.constrain(x_BTD, ("batch", "length", "embed"))

  def __call__(
    self, inputs_BL: Int[Array, "B L"], *, deterministic: bool = True, rngs: nnx.Rngs | None = None
  ) -> Float[Array, "B ..."]:
    cfg = self.cfg
    if inputs_BL.ndim != 2 or inputs_BL.shape[1] != cfg.input_len:
      raise ValueError(f"inputs have shape {inputs_BL.shape}; expected [B, {cfg.input_len}]")
    if cfg.patch_size:
      patches = patchify(inputs_BL, cfg.spatial_shape, cfg.patch_size)
      x_BTD = self.embed(patches.astype(jnp.float32) / max(cfg.vocab_size - 1, 1))
    else:
      x_BTD = self.embed(inputs_BL)
    B, T, _ = x_BTD.shape
    if self.pos_embed is not None:
      x_BTD = x_BTD + self.pos_embed[...].astype(x_BTD.dtype)[None]
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if cfg.pad_id >= 0 and not cfg.patch_size:
      valid_BT = inputs_BL != cfg.pad_id
    else:
      valid_BT = jnp.ones((B, T), jnp.bool_)
    for block in self.blocks:
      x_BTD = self._constrain(x_BTD)
      x_BTD = block(x_BTD, positions_BT, valid_BT, deterministic=deterministic, rngs=rngs)
    x_BTD = self.final_norm(self._constrain(x_BTD))
    if self.pool is not None:
      x_BF, _ = self.pool(x_BTD, valid_BT)
      return self.head(x_BF).astype(jnp.float32)
    return self.head(x_BTD).astype(jnp.float32)
