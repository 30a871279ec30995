"""Usage-driven head pruning of SHRP models (arXiv 2512.20635): keep each layer's busiest heads.

SHRP routes every token to exactly one head per layer (`attnzoo.attention.heads.shrp`) and counts
how often each head is chosen (its `usage` state). `prune_heads(model, keep)` keeps, per layer,
the `keep` most-used heads and returns a new `Transformer` with `num_heads = keep` whose
parameters are the old ones sliced along every head axis:

    query/key/value kernels [D, N, H] -> [D, keep, H]   (biases [N, H] -> [keep, H])
    out kernel [N, V, D]               -> [keep, V, D]
    every family / projection / hook array with a declared `ParamSpec.head_axis` (SHRP's router
    [D, N] -> [D, keep], usage [N] -> [keep])

Kept heads stay in their original order, so top-1 ties (the lower index wins) resolve as before:
a token whose selected head is kept gets exactly the same output, and a head that no token
selects can be removed without changing the function.

Choices where the paper is silent (its pruning rule could not be read): the ranking is by raw
usage counts with ties broken by the lower head index (deterministic), the same `keep` in every
layer (the model has one head count), and MHA only (K = N), so a query head's key and value
head go with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.attention import hooks as hooks_lib
from attnzoo.models import Transformer

# Families whose function is unchanged when never-selected heads are removed (top-1 routing).
PRUNABLE = ("shrp",)
# Head axis of the layer's own projections, by path below the attention module.
_PROJECTION_AXES = {
  ("query", "kernel"): 1,
  ("query", "bias"): 0,
  ("key", "kernel"): 1,
  ("key", "bias"): 0,
  ("value", "kernel"): 1,
  ("value", "bias"): 0,
  ("out", "kernel"): 0,
}


def kept_heads(usage, keep: int) -> np.ndarray:
  """Indices of the `keep` largest entries of `usage` (ties: lower index), ascending."""
  usage = np.asarray(usage, np.float64)
  order = np.argsort(-usage, kind="stable")
  return np.sort(order[:keep])


def _head_axes(attn) -> dict[tuple, int]:
  """Path (below the attention module) -> head axis of every array that has one."""
  axes = dict(_PROJECTION_AXES)
  groups = [("family_params", attn.family.params), ("family_state", attn.family.state)]
  if attn.family.projection is not None:
    groups.append(("projection_params", attn.family.projection.params))
  for group, specs in groups:
    axes.update({(group, n): s.head_axis for n, s in specs.items() if s.head_axis is not None})
  for hook in attn.hooks:
    for n, s in hooks_lib.HOOKS[hook].params.items():
      if s.head_axis is not None:
        axes[("hook_params", hook, n)] = s.head_axis
  return axes


def _layer_usage(usage, layers, num_heads: int) -> list[np.ndarray]:
  if usage is None:
    return [np.asarray(attn.family_state["usage"][...]) for attn in layers]
  if len(usage) != len(layers):
    raise ValueError(
      f"usage has {len(usage)} entries for {len(layers)} layers; pass one [N] array per layer "
      "(or None to read each layer's family_state['usage'])"
    )
  out = [np.asarray(u) for u in usage]
  for i, u in enumerate(out):
    if u.shape != (num_heads,):
      raise ValueError(
        f"usage[{i}] has shape {u.shape}, expected (num_heads,) = ({num_heads},): one count per "
        "query head"
      )
  return out


def prune_heads(
  model: Transformer, keep: int, usage: Sequence[jax.Array] | jax.Array | None = None
) -> Transformer:
  """A copy of `model` with the `keep` most-used query heads of each attention layer.

  Args:
    model: a `Transformer` whose attention layers are all SHRP (`attention=("shrp",)`), MHA
      (num_kv_heads == num_heads).
    keep: heads kept per layer, 1 <= keep <= num_heads.
    usage: per-layer head usage, one [N] array per layer (or an [L, N] array); None reads each
      layer's carried `family_state["usage"]`.

  Returns:
    A new `Transformer` (config `num_heads = num_kv_heads = keep`, same head_dim) with every
    parameter and carried state copied, head-indexed arrays sliced to the kept heads.
  """
  cfg = model.cfg
  N = cfg.num_heads
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
    raise ValueError(f"keep={keep!r} must be an int >= 1 (heads kept per layer)")
  if keep > N:
    raise ValueError(
      f"keep={keep} > num_heads={N}: pruning more heads than exist; choose keep <= {N}"
    )
  layers = [block.attn for block in model.blocks]
  for i, attn in enumerate(layers):
    if attn.family.name not in PRUNABLE:
      raise ValueError(
        f"layer {i} uses attention family {attn.family.name!r}; prune_heads needs every layer "
        f"to be one of {PRUNABLE} (top-1 routed heads with usage counts): train with "
        "attention='shrp'"
      )
  if cfg.num_kv_heads != N:
    raise ValueError(
      f"num_kv_heads={cfg.num_kv_heads} != num_heads={N}: prune_heads removes each query head "
      "together with its key/value head, so it needs MHA; build the model with "
      f"num_kv_heads={N} (or 0)"
    )
  kept = [kept_heads(u, keep) for u in _layer_usage(usage, layers, N)]
  axes = [_head_axes(attn) for attn in layers]

  new_cfg = dataclasses.replace(cfg, num_heads=keep, num_kv_heads=keep)
  abstract = nnx.eval_shape(
    lambda: Transformer(new_cfg, rngs=nnx.Rngs(0), constrain=model.constrain)
  )
  graphdef, abstract_state = nnx.split(abstract)
  old = dict(nnx.to_flat_state(nnx.state(model)))
  new_flat = []
  for path, target in nnx.to_flat_state(abstract_state):
    if path not in old:
      raise ValueError(f"the pruned model has {'/'.join(map(str, path))}, the model does not")
    value = old[path][...]
    if len(path) > 3 and path[0] == "blocks" and path[2] == "attn":
      axis = axes[path[1]].get(tuple(path[3:]))
      if axis is not None:
        value = jnp.take(value, jnp.asarray(kept[path[1]]), axis=axis)
    if tuple(value.shape) != tuple(target.shape):
      raise ValueError(
        f"{'/'.join(map(str, path))}: shape {tuple(value.shape)} after pruning, the pruned "
        f"model expects {tuple(target.shape)}; declare its ParamSpec.head_axis so "
        "prune_heads slices it"
      )
    new_flat.append((path, target.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(new_flat))
