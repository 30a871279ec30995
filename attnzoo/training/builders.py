"""The one place where a ConfigDict becomes objects: dataset, ModelConfig, optimizer."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import optax

from attnzoo import data as data_lib
from attnzoo import nn
from attnzoo.attention import knobs as knobs_lib
from attnzoo.models import ModelConfig
from attnzoo.models.config import RENAMED


def dataset(config: ml_collections.ConfigDict):
  """`attnzoo.data.get_dataset(config.data.name, **rest of config.data)`."""
  kwargs = config.data.to_dict()
  return data_lib.get_dataset(kwargs.pop("name"), **kwargs)


def _pairs(d) -> tuple[tuple[str, Any], ...]:
  """Sorted (key, value) pairs, None values (= the default) dropped, lists as tuples."""
  items = d.to_dict() if isinstance(d, ml_collections.ConfigDict) else dict(d)
  return tuple(
    sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items.items() if v is not None)
  )


def model_config(config: ml_collections.ConfigDict, ds: data_lib.Dataset) -> ModelConfig:
  """ModelConfig from `config.model` and the dataset's shapes (vocab, length, classes, image).

  `config.model.attention` is one family name or a per-layer pattern separated by
  "," or "+" (cycled over the layers): "softmax", "linear+softmax". A field under a former
  name (`model.kv_heads`, ...) raises, naming the current one.
  """
  m = config.model
  renamed = sorted(set(m.keys()) & set(RENAMED))
  if renamed:
    raise ValueError(
      "config.model uses former names: "
      + "; ".join(f"{old} is now {RENAMED[old]}" for old in renamed)
    )
  attention = knobs_lib.parse_pattern(m.attention)
  declared = {**knobs_lib.aux_weights(attention), **nn.moe.AUX_LOSSES}
  weights = _pairs(m.get("aux_weights", {}))
  unknown = sorted(k for k, _ in weights if k not in declared)
  if unknown:
    raise ValueError(
      f"config.model.aux_weights sets {unknown}, which no family in {attention} declares; "
      f"declared aux losses: {declared or 'none'}"
    )
  return ModelConfig(
    task=ds.task,
    vocab_size=int(ds.vocab_size),
    input_len=int(ds.seq_len),
    num_classes=int(ds.num_classes or 0),
    dim=m.dim,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    num_kv_heads=m.num_kv_heads,
    head_dim=m.head_dim,
    mlp_dim=m.mlp_dim,
    mlp=m.mlp,
    num_experts=int(m.get("num_experts", 0)),
    moe_top_k=int(m.get("moe_top_k", 1)),
    block=m.get("block", "sequential"),
    activation=m.activation,
    norm=m.norm,
    attention=attention,
    knobs=tuple(sorted((family, _pairs(knobs)) for family, knobs in m.knobs.items())),
    aux_weights=weights,
    position=m.position,
    rope_base=float(m.rope_base),
    mask=m.mask,
    mask_kwargs=_pairs(m.mask_kwargs),
    spatial_shape=tuple(ds.spatial_shape or ()),
    patch_size=tuple(m.patch_size),
    pad_id=-1 if ds.pad_id is None else int(ds.pad_id),
    dropout=float(m.dropout),
    dtype=m.dtype,
    pool=m.get("pool", "mean"),
    pool_knobs=_pairs(m.get("pool_knobs", {})),
  )


def model_meta(cfg: ModelConfig) -> dict[str, Any]:
  """JSON-normalised hyper-parameters (tuples become lists), stored beside checkpoints."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter, arXiv 1711.05101) with linear warm-up then cosine decay
  to `min_lr_ratio * learning_rate`, after global-norm clipping. Weight decay applies to
  matrices only (not to norms' scales or biases)."""
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=train.learning_rate,
    warmup_steps=train.warmup_steps,
    decay_steps=max(train.steps, train.warmup_steps + 1),
    end_value=train.learning_rate * train.min_lr_ratio,
  )
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
    optax.clip_by_global_norm(train.grad_clip),
    optax.adamw(
      schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay, mask=decay_mask
    ),
  )
