"""The attention layer: projections, positions and hooks around any registered attention family.

The family is looked up by name in `attnzoo.attention` and called as
`family.attention(q, k, v, *, is_causal, [mask], [bias], **knobs, **learned, **carried,
**layer_inputs)` in the primitive layout q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv].
Everything family-specific comes from its registry entry: the arrays it learns (`Family.params`,
created here as `nnx.Param`s under `family_params`), the arrays it carries (`Family.state`, as
`FamilyState` variables under `family_state`, never differentiated), its aux losses/metrics, the
layer values it reads (`x`, `positions`, `valid`, `train`, `rng`), and its hooks
(`attnzoo.attention.hooks`). The layer never branches on a family's or hook's name.

Training mode and randomness: `__call__(..., train=, rngs=)` hands a family that lists "train"
the Python bool, and one that lists "rng" a key drawn from `rngs`' dropout stream for this call
(None outside training or without rngs). The trainer's rngs are `nnx.Rngs(dropout=fold_in(
key(seed), step))`, so the key is a function of (seed, step, call order): runs resume exactly.

Aux results: a family that returns `(out, Aux)` has its record sown (`AttentionAux`); the
trainer runs the model through `run_with_aux`, which gathers every layer's weighted losses,
metrics and state updates, and writes the state with `apply_state_updates` after the optimizer
step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from attnzoo import attention as attention_lib
from attnzoo.attention import hooks as hooks_lib
from attnzoo.attention.registry import Aux, Dims
from attnzoo.nn import positions as positions_lib

POSITIONS = ("none", "rope", "alibi")


class FamilyState(nnx.Variable):
  """Non-gradient arrays a family carries between steps (EMA centroids, usage counters)."""


class AttentionAux(nnx.Intermediate):
  """One layer's aux record: weighted loss, metrics and state updates (see `run_with_aux`)."""


class Attention(nnx.Module):
  """Multi-head attention with independent query and key/value head counts.

  `num_kv_heads == num_heads` is MHA (Vaswani et al., arXiv 1706.03762 §3.2.2),
  `1 < num_kv_heads < num_heads` is GQA (Ainslie et al., arXiv 2305.13245),
  `num_kv_heads == 1` is MQA (Shazeer, arXiv 1911.02150). Kernels: query [D, N, H],
  key [D, K, H], value [D, Kv, V], out [N, V, D] (param paths `query`, `key`, `value`, `out`),
  where the layout (N, K, Kv, H, V) is the model's (num_heads, num_kv_heads, num_kv_heads,
  head_dim, head_dim) unless the family's `heads` rule changes it (`self.dims`). Projections a
  family replaces (`Family.projection`) are None here; its own arrays are `projection_params`.

  Args:
    dim: model width D.
    num_heads, num_kv_heads, head_dim: N, K (N % K == 0), H.
    family: registry name of the attention function.
    knobs: keyword arguments passed to the family on every call (None values are dropped:
      None means the family's default); `hooks` ("srms_norm+output_gate", "none") replaces the
      family's default hooks.
    aux_weights: weight of each aux loss by name (default: the family's declared weights).
    position: "none", "rope" or "alibi" (an additive bias; needs a family that takes `bias=`).
    is_causal: decoder (causal) or encoder (bidirectional) attention.
    mask: an `attnzoo.masks.Mask` (e.g. a 2-D Neighborhood) or None.
    layer, num_layers: this layer's depth, for families whose knobs depend on it
      (`Family.layer_knobs`, e.g. linear attention's `decay="tnl"` schedule).
  """

  def __init__(
    self,
    dim: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    family: str = "softmax",
    knobs: Mapping[str, Any] | None = None,
    aux_weights: Mapping[str, float] | None = None,
    position: str = "none",
    rope_base: float = 10000.0,
    is_causal: bool = False,
    mask: Any = None,
    use_bias: bool = False,
    dtype=None,
    layer: int = 0,
    num_layers: int = 1,
    rngs: nnx.Rngs,
  ):
    if num_heads % num_kv_heads:
      raise ValueError(
        f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}; "
        "choose num_kv_heads among the divisors of num_heads"
      )
    if position not in POSITIONS:
      raise ValueError(f"position={position!r} is not one of {POSITIONS}")
    self.family = attention_lib.get(family)  # KeyError listing the valid names
    if self.family.causal_only and not is_causal:
      raise ValueError(f"family {family!r} is causal only; use it in a decoder (is_causal=True)")
    if not self.family.supports_mask and (mask is not None or position == "alibi"):
      raise ValueError(
        f"family {family!r} takes no mask/bias, so mask={mask!r} and "
        f"position={position!r} cannot apply; drop them or pick another family"
      )
    knobs = {k: v for k, v in (knobs or {}).items() if v is not None}
    hook_spec = knobs.pop("hooks", None)
    self.hooks = self.family.hooks if hook_spec is None else hooks_lib.parse(hook_spec)
    if self.family.layer_knobs is not None:
      knobs = self.family.layer_knobs(
        knobs, layer=layer, num_layers=num_layers, num_heads=num_heads
      )
    self.knobs = knobs
    weights = dict(self.family.aux_losses)
    weights.update({k: v for k, v in (aux_weights or {}).items() if k in weights})
    self.aux_weights = weights
    self.position, self.rope_base, self.is_causal = position, rope_base, is_causal
    self.mask = mask
    model_dims = Dims(
      D=dim,
      N=num_heads,
      K=num_kv_heads,
      H=head_dim,
      V=head_dim,
      knobs=self.family.knob_values(knobs),
    )
    # The family's head layout (SQA's fewer query heads, Sigma's K != Kv, stacked experts).
    dims = self.family.layer_dims(model_dims)
    self.dims = dims
    self.num_heads, self.num_kv_heads, self.head_dim = dims.N, dims.K, dims.H
    projection = self.family.projection
    replaced = projection.replaces if projection is not None else ()
    proj = lambda name, heads, width: (
      None
      if name in replaced
      else nnx.LinearGeneral(dim, (heads, width), use_bias=use_bias, dtype=dtype, rngs=rngs)
    )
    self.query = proj("q", dims.N, dims.H)
    self.key = proj("k", dims.K, dims.H)
    self.value = proj("v", dims.Kv, dims.V)
    self.out = nnx.LinearGeneral(
      (dims.N, dims.V), dim, axis=(-2, -1), use_bias=use_bias, dtype=dtype, rngs=rngs
    )

    def create(specs, kind):  # arrays whose shape is None are switched off by the knobs
      arrays = {name: spec.create(rngs.params(), dims) for name, spec in specs.items()}
      return nnx.Dict({name: kind(a) for name, a in arrays.items() if a is not None})

    self.projection_params = create(projection.params if projection else {}, nnx.Param)
    self.family_params = create(self.family.params, nnx.Param)
    self.family_state = create(self.family.state, FamilyState)
    self.hook_params = nnx.Dict(
      {h: create(hooks_lib.HOOKS[h].params, nnx.Param) for h in self.hooks}
    )

  def __call__(
    self,
    x_BTD: Float[Array, "B T D"],
    positions_BT: Int[Array, "B T"] | None = None,
    valid_BT: Bool[Array, "B T"] | None = None,
    *,
    train: bool = False,
    rngs: nnx.Rngs | None = None,
  ) -> Float[Array, "B T D"]:
    """`valid_BT` marks real (non-padding) tokens; families that keep statistics over tokens
    (routing loads, EMAs) read it as the layer input "valid" (all True when None). `train` (the
    training step: a Python bool) and a key drawn from `rngs` (see the module docstring) are the
    layer inputs "train" and "rng"."""
    if not isinstance(train, bool):
      raise TypeError(
        f"train={train!r} must be a Python bool (it selects the family's code path at trace "
        "time); pass `not deterministic`"
      )
    B, T, _ = x_BTD.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if valid_BT is None:
      valid_BT = jnp.ones((B, T), jnp.bool_)
    plain = lambda proj: None if proj is None else proj(x_BTD)
    q_BTNH, k_BTKH, v_BTKH = plain(self.query), plain(self.key), plain(self.value)
    projection = self.family.projection
    if projection is not None:
      q_BTNH, k_BTKH, v_BTKH = projection.apply(
        _values(self.projection_params, projection.params),
        x_BTD,
        q_BTNH,
        k_BTKH,
        v_BTKH,
        self.dims,
      )
    for name in self.hooks:
      hook = hooks_lib.HOOKS[name]
      if hook.stage == "input":
        q_BTNH, k_BTKH, v_BTKH = hook.apply(
          _values(self.hook_params[name], hook.params), q_BTNH, k_BTKH, v_BTKH, x_BTD=x_BTD
        )
    kwargs: dict[str, Any] = dict(self.knobs, is_causal=self.is_causal)
    if self.position == "rope":
      q_BTNH = positions_lib.rope(q_BTNH, positions_BT, base=self.rope_base)
      k_BTKH = positions_lib.rope(k_BTKH, positions_BT, base=self.rope_base)
    elif self.position == "alibi":
      kwargs["bias"] = positions_lib.alibi_bias(self.num_heads, positions_BT, positions_BT)
    if self.mask is not None:
      kwargs["mask"] = self.mask
    kwargs.update(_values(self.family_params, self.family.params))
    kwargs.update(_values(self.family_state, self.family.state))
    layer_inputs = dict(x=x_BTD, positions=positions_BT, valid=valid_BT, train=train)
    if "rng" in self.family.layer_inputs:  # drawn only when read: other families keep the stream
      layer_inputs["rng"] = _draw_key(rngs, self.family.name) if train else None
    kwargs.update({name: layer_inputs[name] for name in self.family.layer_inputs})
    out_BTNV = self.family.attention(q_BTNH, k_BTKH, v_BTKH, **kwargs)
    if self.family.returns_aux:
      out_BTNV, aux = out_BTNV
      sow_aux(self, "attention_aux", self._aux_record(aux))
    for name in self.hooks:
      hook = hooks_lib.HOOKS[name]
      if hook.stage == "output":
        out_BTNV = hook.apply(_values(self.hook_params[name], hook.params), out_BTNV, x_BTD=x_BTD)
    return self.out(out_BTNV)

  def _aux_record(self, aux: Aux) -> dict[str, Any]:
    """Checks `aux` against the family's declarations; weighs its losses."""
    name = self.family.name
    if not isinstance(aux, Aux):
      raise TypeError(f"family {name!r} returned {type(aux).__name__} as aux; return an Aux")
    undeclared = set(aux.losses) - set(self.family.aux_losses)
    if undeclared:
      raise ValueError(
        f"family {name!r} returned aux losses {sorted(undeclared)} that its registry entry "
        f"does not declare (aux_losses={dict(self.family.aux_losses)}); declare them"
      )
    if set(aux.state) != set(self.family.state):
      raise ValueError(
        f"family {name!r} returned state updates {sorted(aux.state)}; its registry entry "
        f"declares state {sorted(self.family.state)} (return a new value for each)"
      )
    loss = sum(
      (self.aux_weights[k] * jnp.asarray(v, jnp.float32) for k, v in aux.losses.items()),
      start=jnp.zeros((), jnp.float32),
    )
    metrics = {**{f"aux/{k}": v for k, v in aux.losses.items()}, **aux.metrics}
    return dict(loss=loss, metrics=metrics, state=aux.state)


def sow_aux(module: nnx.Module, name: str, record: dict[str, Any]) -> None:
  """Records `record` for `run_with_aux` when the call runs under it (`nnx.capture`); outside
  it (a plain `model(x)`) the record is dropped, so the model's structure never changes.
  (Flax's `sow` outside `nnx.capture` would add a variable to the module — deprecated; a module
  being captured carries flax's `__captures__` attribute, the one flax detail read here.)"""
  if hasattr(module, "__captures__"):
    module.sow(AttentionAux, name, record)


def _draw_key(rngs: nnx.Rngs | None, family: str) -> jax.Array | None:
  """A fresh key from the dropout stream of `rngs` (None without rngs)."""
  if rngs is None:
    return None
  try:
    return rngs.dropout()
  except AttributeError:
    raise ValueError(
      f"family {family!r} reads the layer input 'rng', but the rngs passed have no 'dropout' "
      "(or default) stream; call the model with rngs=nnx.Rngs(dropout=key)"
    ) from None


def _values(d: nnx.Dict, names) -> dict[str, jax.Array]:
  # By declared name: `nnx.capture` adds bookkeeping entries to every submodule it visits;
  # arrays switched off by the knobs (shape None) were never created and are not passed.
  return {k: d[k][...] for k in names if k in d}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AuxTotals:
  """What `run_with_aux` gathered over every attention layer of one forward pass.

  Attributes:
    loss: sum over layers of the weighted aux losses (add it to the objective).
    metrics: name -> mean over the layers that reported it (`aux/<loss>` unweighted values too).
    state: module path ("blocks/0/attn") -> {name: new value} of carried family state.
  """

  loss: jax.Array
  metrics: dict[str, jax.Array]
  state: dict[str, dict[str, jax.Array]]


def run_with_aux(model: nnx.Module, *args, **kwargs) -> tuple[Any, AuxTotals]:
  """`model(*args, **kwargs)` and the aux records its attention layers produced."""
  out, sown = nnx.capture(model, AttentionAux)(*args, **kwargs)
  loss = jnp.zeros((), jnp.float32)
  metric_lists: dict[str, list[jax.Array]] = {}
  state: dict[str, dict[str, jax.Array]] = {}
  for path, records in nnx.to_flat_state(sown):
    records = records.get_value() if isinstance(records, nnx.Variable) else records
    module_path = "/".join(str(p) for p in path[:-1])
    for record in records:
      loss = loss + record["loss"]
      for k, v in record["metrics"].items():
        metric_lists.setdefault(k, []).append(jnp.asarray(v, jnp.float32))
      if record["state"]:
        state[module_path] = dict(record["state"])
  metrics = {k: jnp.mean(jnp.stack(v)) for k, v in metric_lists.items()}
  return out, AuxTotals(loss=loss, metrics=metrics, state=state)


def apply_state_updates(model: nnx.Module, updates: Mapping[str, Mapping[str, jax.Array]]):
  """Writes the carried family state gathered by `run_with_aux` into `model` (in place)."""
  if not updates:
    return
  modules = {"/".join(str(p) for p in path): m for path, m in nnx.iter_graph(model)}
  for path, values in updates.items():
    for name, value in values.items():
      var = modules[path].family_state[name]
      var[...] = jax.lax.stop_gradient(jnp.asarray(value, var[...].dtype))


def layer_families(pattern: Sequence[str], num_layers: int) -> tuple[str, ...]:
  """The family of each layer: `pattern` cycled over `num_layers` (hybrid stacks)."""
  if not pattern:
    raise ValueError("the attention pattern is empty; give at least one family name")
  if num_layers % len(pattern):
    raise ValueError(
      f"attention pattern {tuple(pattern)} (length {len(pattern)}) does not "
      f"divide num_layers={num_layers}; give one name per layer or a divisor"
    )
  return tuple(pattern) * (num_layers // len(pattern))
