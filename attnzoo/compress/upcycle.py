"""Upcycling dense checkpoints into a BAM mixture (soft MoA attention + top-k MoE FFN).

"BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts"
(Zhang et al.; arXiv 2408.08274), §4 and Figure 1; spec: shared/papers/architecture.md §12.1.
From dense models M_1..M_E (a seed and its branches, continued on their own domains):

    attention expert e  <- M_e's W_q, W_k, W_v, W_o        (family "bam", stacked on the head
                                                           axis by `bam.stack_heads`; with
                                                           share_kv the shared W_k, W_v are
                                                           the average)
    FFN expert e        <- M_e's up, gate, down            (`nn.MoEFFN`, stacked on axis 0)
    everything else     <- (1/E) Σ_e M_e                   (embeddings, norms, head, biases;
                                                           a non-bam attention = BTX's average)
    routers             <- random (the mixture's own init) or zeros (`router_init`)

One source fills every expert with copies. The mixture is built from `cfg` (its `ModelConfig`)
and must have the dense models' widths: only `attention`, its knobs, `mlp`, `num_experts`,
`moe_top_k` and `aux_weights` may differ (`block` must match: the paper's seed is already a
parallel-attention model).

What equals what (tested in tests/compress/test_upcycle.py):
- Attention: with copies of one dense attention, Σ_e g_e MHA_e = MHA for ANY router, since
  the soft gates sum to 1. An attention-only upcycle (mlp unchanged) reproduces the dense
  model's outputs up to float rounding.
- MoE FFN: top-k outputs Σ_{i∈T} p_i FFN_i(x), not renormalised, so with E copies of one FFN
  and k = 1 the layer outputs p_max(x)·FFN(x) — NOT the dense FFN(x) (BAM's formula; the
  paper trains after upcycling). With router_init="zeros", p = 1/E for every token, so the
  upcycled model equals the dense model whose FFN down-projections are scaled by 1/E, exactly
  (up to rounding); with E = 1 it equals the dense model.
- N identical sources: every averaged parameter equals the source's.

Sources are dense models (`Transformer`) or checkpoint directories written by
`attnzoo.training` (a workdir, its `checkpoints/` directory or one `checkpoints/<step>`
directory; the newest step unless `step=`). They are read with orbax and never written to.

Choices where the paper is silent:
- The number of sources must be 1 or the number of experts (of each mixture layer); the
  caller orders them (expert e <- source e).
- Routers keep the mixture's random init (normal, std 0.02) by default, as the paper.
- Dense arrays the mixture has no place for (e.g. a sequential block's second norm) raise
  instead of being dropped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from attnzoo import nn
from attnzoo.attention.heads import bam
from attnzoo.models import ModelConfig, Transformer

ROUTER_INITS = ("random", "zeros")
# Fields a mixture may change with respect to its dense sources.
MIXTURE_FIELDS = ("attention", "knobs", "mlp", "num_experts", "moe_top_k", "aux_weights")

_ATTN = re.compile(r"^blocks/(\d+)/attn/(query|key|value|out)/(kernel|bias)$")
_FFN = re.compile(r"^blocks/(\d+)/mlp/(up|gate|down)$")


class _Source:
  """One dense model's arrays by path ("blocks/0/attn/query/kernel") and its hyper-parameters."""

  def __init__(self, name: str, arrays: dict[str, np.ndarray], model: dict[str, Any] | None):
    self.name, self.arrays, self.model = name, arrays, model
    self.used: set[str] = set()

  def get(
    self, path: str, want: tuple[int, ...], cfg: ModelConfig, *, per_expert: bool = False
  ) -> np.ndarray:
    if path not in self.arrays:
      raise ValueError(
        f"{self.name}: has no array {path!r}, which the mixture needs; {self._fix(cfg)}"
      )
    array = self.arrays[path]
    if tuple(array.shape) != tuple(want):
      raise ValueError(
        f"{self.name}: {path} has shape {tuple(array.shape)}, the mixture expects "
        f"{tuple(want)}{' per expert' if per_expert else ''}; " + self._fix(cfg)
      )
    self.used.add(path)
    return array

  def _fix(self, cfg: ModelConfig) -> str:
    mixture = _normalised(cfg)
    differ = [
      f"{k}: dense={self.model[k]!r} mixture={mixture.get(k)!r}"
      for k in sorted(self.model or {})
      if k not in MIXTURE_FIELDS and self.model[k] != mixture.get(k)
    ]
    return (
      "build the mixture's ModelConfig from the dense one, changing only "
      f"{', '.join(MIXTURE_FIELDS)}" + (f" (differing now: {'; '.join(differ)})" if differ else "")
    )


def _normalised(cfg: ModelConfig) -> dict[str, Any]:
  """JSON-normalised fields (as the trainer stores them beside checkpoints)."""
  return json.loads(json.dumps({f: getattr(cfg, f) for f in cfg.__dataclass_fields__}))


def _flat(tree, prefix="") -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      if set(value) == {"value"} and not isinstance(value["value"], dict):
        out[path] = np.asarray(value["value"])
      else:
        out.update(_flat(value, path))
    else:
      out[path] = np.asarray(value)
  return out


def _step_dir(path: str, step: int | None) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"no checkpoint at {path!r}: not a directory; pass a training workdir, its "
      "checkpoints/ directory or one checkpoints/<step> directory"
    )
  if os.path.isdir(os.path.join(path, "state")):
    return path
  directory = os.path.join(path, "checkpoints")
  directory = directory if os.path.isdir(directory) else path
  steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
  if not steps:
    raise FileNotFoundError(
      f"no checkpoint steps under {directory!r} (expected numbered step directories, as "
      "attnzoo.training writes them); train the dense model first or fix the path"
    )
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"step={step} is not among the checkpoints {steps} in {directory!r}")
  return os.path.join(directory, str(step))


def _read_checkpoint(path: str, step: int | None) -> _Source:
  """The model arrays and hyper-parameters of a trainer checkpoint (read-only)."""
  step_dir = _step_dir(os.fspath(path), step)
  try:
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
      meta = json.load(f)
    with ocp.StandardCheckpointer() as checkpointer:
      state = checkpointer.restore(os.path.join(os.path.abspath(step_dir), "state"))
    model_tree = state["0"]  # the trainer saves nnx.state((model, optimizer))
  except Exception as e:  # noqa: BLE001 (any read failure means this checkpoint is unusable)
    raise ValueError(
      f"checkpoint {step_dir!r} cannot be read ({type(e).__name__}: "
      f"{str(e).splitlines()[0][:300] if str(e) else ''}); it was left as it is: pick "
      "another step (step=...) or re-save the dense model"
    ) from e
  return _Source(f"checkpoint {step_dir!r}", _flat(model_tree), meta.get("model"))


def _from_model(model: Transformer, index: int) -> _Source:
  arrays = {
    "/".join(str(p) for p in path): np.asarray(var.get_value())
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  return _Source(f"dense model #{index}", arrays, _normalised(model.cfg))


def _experts(sources: list[_Source], count: int, what: str) -> list[_Source]:
  if len(sources) == 1:
    return sources * count
  if len(sources) != count:
    raise ValueError(
      f"{len(sources)} dense sources for {count} {what}: pass one source (copied into every "
      f"expert) or exactly {count} (expert e <- source e)"
    )
  return sources


def upcycle(
  sources: str | os.PathLike | Transformer | Sequence[str | os.PathLike | Transformer],
  cfg: ModelConfig,
  *,
  seed: int = 0,
  router_init: str = "random",
  step: int | None = None,
) -> Transformer:
  """A `Transformer(cfg)` initialised from dense models; see the module docstring.

  Args:
    sources: one or E dense models or trainer checkpoint directories (read, never written).
    cfg: the mixture (e.g. attention=("bam",), mlp="moe", num_experts=E, block="parallel").
    seed: init of what is not copied (the routers under router_init="random").
    router_init: "random" (the mixture's init, as the paper) or "zeros" (uniform gates 1/E).
    step: checkpoint step to read (default: the newest of each directory).
  """
  if router_init not in ROUTER_INITS:
    raise ValueError(f"router_init={router_init!r} is not one of {ROUTER_INITS}")
  if isinstance(sources, (str, os.PathLike, Transformer)):
    sources = [sources]
  if not sources:
    raise ValueError("no dense sources given; pass at least one model or checkpoint directory")
  loaded = [
    _from_model(s, i) if isinstance(s, Transformer) else _read_checkpoint(s, step)
    for i, s in enumerate(sources)
  ]
  model = Transformer(cfg, rngs=nnx.Rngs(params=seed))
  blocks = model.blocks
  params = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(params)
  for path_t, var in flat:
    path = "/".join(str(p) for p in path_t)
    want = tuple(var.get_value().shape)
    attn = _ATTN.match(path)
    ffn = _FFN.match(path)
    layer = blocks[int(path_t[1])] if path_t[0] == "blocks" else None
    mixture_attn = layer is not None and layer.attn.family is bam.FAMILY
    if (mixture_attn and path_t[2:4] == ("attn", "family_params")) or (
      layer is not None and path_t[2:] == ("mlp", "router")
    ):
      value = jnp.zeros(want) if router_init == "zeros" else var.get_value()
    elif attn and mixture_attn and not (attn[2] == "out" and attn[3] == "bias"):
      value = _attention_experts(loaded, layer.attn, path, attn[2], attn[3], want, cfg)
    elif ffn and isinstance(layer.mlp, nn.MoEFFN):
      experts = _experts(loaded, want[0], f"FFN experts of block {ffn[1]}")
      source_path = f"blocks/{ffn[1]}/mlp/{ffn[2]}/kernel"
      value = np.stack([s.get(source_path, want[1:], cfg, per_expert=True) for s in experts])
    else:
      # The mean in float64: N identical float32 arrays average back to themselves exactly.
      value = np.mean(np.stack([s.get(path, want, cfg) for s in loaded]).astype(np.float64), 0)
    var.set_value(jnp.asarray(value, var.get_value().dtype))
  for s in loaded:
    unused = sorted(set(s.arrays) - s.used)
    if unused:
      raise ValueError(
        f"{s.name}: arrays {unused[:6]}{' ...' if len(unused) > 6 else ''} have no place in "
        f"the mixture (block={cfg.block!r}, mlp={cfg.mlp!r}); " + s._fix(cfg)
      )
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def _attention_experts(loaded, attn: nn.Attention, path, role, kind, want, cfg: ModelConfig):
  """One stacked projection of a bam layer from the experts' dense projections."""
  E = attn.dims.knobs["num_experts"]
  share_kv = bool(attn.dims.knobs.get("share_kv", False))
  experts = _experts(loaded, E, f"attention experts ({path})")
  head_axis = 0 if role == "out" or kind == "bias" else 1
  kv = role in ("key", "value")
  per_expert = list(want)
  if not (kv and share_kv):
    per_expert[head_axis] //= E
  arrays = [jnp.asarray(s.get(path, tuple(per_expert), cfg, per_expert=True)) for s in experts]
  return bam.stack_heads(arrays, head_axis, role="kv" if kv else "q", share_kv=share_kv)
