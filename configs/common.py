"""Helpers shared by the `get_config(arg)` files: argument parsing, defaults, smoke, locking.

A config file is one task; the attention family and a few switches come from its
argument, as in big_vision:

    --config configs/lm_bytes.py:attention=softmax,smoke

`parse_arg` turns "k=v,flag" into a ConfigDict over the file's declared defaults
(unknown keys raise, listing the valid ones; a bare key means True; values are cast
to the default's type).
"""

from __future__ import annotations

import re
from typing import Any

import ml_collections
from ml_collections import config_dict

from attnzoo import masks
from attnzoo.attention import knobs as knobs_lib
from attnzoo.attention import pooling as pooling_lib
from attnzoo.nn import moe as moe_lib


def declared(arguments: dict[str, tuple[Any, str]], **values: Any) -> ml_collections.ConfigDict:
  """A ConfigDict of arguments (default, annotation) that the command line can override.

  A None default becomes a typed placeholder (None until set) when the annotation names
  bool/float/int/str; arguments of other types (e.g. a block-size dataclass) are left
  out: set them in a config file.
  """
  out = {}
  for name, (default, annotation) in arguments.items():
    value = values.pop(name, default)
    if value is None:
      kind = next(
        # str first: an argument that takes an array or a name (e.g. linear's decay) can
        # only be given by name on the command line.
        (t for t in (bool, str, float, int) if re.search(rf"\b{t.__name__}\b", annotation)),
        None,
      )
      if kind is None:
        continue
      value = config_dict.placeholder(kind)
    out[name] = value
  if values:
    raise ValueError(f"unknown arguments {sorted(values)}; valid: {sorted(arguments)}")
  return ml_collections.ConfigDict(out)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'attention=linear,smoke' -> ConfigDict(attention='linear', smoke=True, ...defaults)."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; valid: {sorted(defaults)}")
    default = defaults[key]
    if not has_value:
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} must be true/false")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value) if default is not None else value
  return ml_collections.ConfigDict(out)


def base(attention: str) -> ml_collections.ConfigDict:
  """Defaults shared by every task; task files override what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict()  # name + keyword arguments of attnzoo.data.get_dataset

  c.model = ml_collections.ConfigDict()
  c.model.dim = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 0  # 0 = num_heads (MHA); 1 = MQA; a divisor = GQA
  c.model.head_dim = 0  # 0 = dim // num_heads
  c.model.mlp_dim = 0  # 0 = 4 dim (plain) / 8/3 dim (gated)
  c.model.mlp = "gated"  # plain | gated | moe (top-k mixture of gated experts)
  c.model.num_experts = 4  # mlp="moe" only
  c.model.moe_top_k = 1  # mlp="moe" only
  c.model.block = "sequential"  # sequential | parallel (one shared norm, BAM / PaLM)
  c.model.activation = "silu"  # gated + silu = SwiGLU
  c.model.norm = "rms"
  c.model.attention = attention  # one family, or a per-layer pattern "linear+softmax"
  families = knobs_lib.parse_pattern(attention)  # unknown names raise, listing the valid ones
  # Per family, its knobs (keyword arguments) with their defaults, read from the
  # registry: `--config.model.knobs.softmax.implementation=xla`. None = the default.
  # Every family also has the layer knob `hooks` ("srms_norm+output_gate", "none").
  c.model.knobs = ml_collections.ConfigDict(
    {name: declared(knobs_lib.family_knobs(name)) for name in dict.fromkeys(families)}
  )
  # Weights of the aux losses the families declare: `--config.model.aux_weights.balance=0.1`.
  c.model.aux_weights = ml_collections.ConfigDict(knobs_lib.aux_weights(families))
  # The MoE FFN's losses (mlp="moe"): `--config.model.aux_weights.moe_balance=0.01`.
  c.model.aux_weights.update(moe_lib.AUX_LOSSES)
  c.model.position = "rope"  # none | rope | alibi | learned
  c.model.rope_base = 10000.0
  c.model.mask = ""  # "" or a name in attnzoo.masks.MASKS; use set_mask
  c.model.mask_kwargs = ml_collections.ConfigDict()
  c.model.patch_size = ()  # () = one token per input id; (ph, pw) = ViT patches
  c.model.dropout = 0.0
  c.model.dtype = "float32"
  # Classifiers: pooling over tokens, a name in attnzoo.attention.pooling.POOLINGS ("mean" |
  # "lama"); "lm" tasks keep "mean". Knobs of every pooling, None = the chosen one's default:
  # `--config.model.pool=lama --config.model.pool_knobs.num_heads=8`.
  c.model.pool = "mean"
  c.model.pool_knobs = declared(pooling_lib.all_knobs())

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 100
  c.train.min_lr_ratio = 0.1
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 250
  c.eval.batches = 8
  c.eval.batch_size = 64

  c.log_every = 50
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 250
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  # Parallelism: sizes of the mesh axes (one may be -1 = all remaining devices).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
  return c


def smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks any config to a seconds-long CPU run (tiny model, few steps, small eval)."""
  c.model.dim = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.train.steps = 6
  c.train.batch_size = 4
  c.train.warmup_steps = 2
  c.eval.every = 6
  c.eval.batches = 1
  c.eval.batch_size = 4
  c.log_every = 2
  c.checkpoint.every = 3


def set_mask(c: ml_collections.ConfigDict, name: str, **kwargs: Any) -> None:
  """Selects mask `name` and declares all of its arguments (so each can be overridden)."""
  c.model.mask = name
  c.model.mask_kwargs = declared(masks.mask_arguments(name), **kwargs)


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config: setting an unknown key raises, listing the fields present."""
  c.lock()
  return c
