"""The family contract: what a family declares, the typed aux result, and implementation dispatch.

A family is a pure function `attention(q, k, v, *, <options>, <knobs>, <learned arrays>,
implementation=None)` in the layout q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv], plus a
`Family` entry that says everything a layer, a trainer, a test or a benchmark needs to use it
without knowing its name:

- `params`: arrays it learns beyond the q/k/v/o projections (a router, centroids, per-head
  scalars), as `ParamSpec`s; the layer creates them and passes them by keyword.
- `state`: non-gradient arrays it carries between steps (EMA centroids, usage counters), also
  passed by keyword; new values come back in `Aux.state` and are written after the optimizer step.
- `aux_losses`: the names of the losses it returns in `Aux.losses`, with default weights
  (overridable per run as `config.model.aux_weights.<name>`).
- `layer_inputs`: values of the layer it reads besides q/k/v ("x": the layer input [B,T,D],
  "positions": int [B,T], "valid": bool [B,T], False at padding tokens, "train": a Python bool,
  True in the training step, "rng": a PRNG key drawn for this layer and step from the model's
  rngs while training, else None).
- `hooks`: default input/output hooks of the layer (`attnzoo.attention.hooks`).
- `heads`: the layer's head layout when it is not the model's (fewer query heads, different key
  and value head counts, experts stacked along the head axis): `Dims -> Dims`.
- `projection`: the family's own q/k/v projections when the layer's plain ones are not what it
  computes (a low-rank query, values re-parameterised from keys, an augmented query).
- `conformance`: how the shared conformance suite and the benchmark call it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

# Every `implementation=` name a family may offer, in the order automatic choice prefers them.
IMPLEMENTATIONS = ("xla", "chunked", "pallas", "ring", "recurrent")
# Layer values a family may read (`Family.layer_inputs`), passed by keyword. "train" is a Python
# bool (static: the training step vs eval / inference); "rng" is a key, or None outside training
# or without rngs; the layer draws it only for a family that lists "rng", so the others leave the
# model's random streams as they were.
LAYER_INPUTS = ("x", "positions", "valid", "train", "rng")


@dataclasses.dataclass(frozen=True)
class Dims:
  """What a learned array's shape may depend on: model width D, query heads N, key heads K,
  query/key head dim H, value head dim V, value heads Kv (0 means K: the usual shared kv head
  count), and the family's knobs as the call will see them (`Family.knob_values`: the function's
  defaults updated with the given knobs), so a knob such as a convolution's kernel size can size
  its array: `lambda d: (d.knobs["kernel_size"], d.H)`."""

  D: int
  N: int
  K: int
  H: int
  V: int
  knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  Kv: int = 0

  def __post_init__(self):
    if not self.Kv:
      object.__setattr__(self, "Kv", self.K)

  def replace(self, **changes) -> Dims:
    """A copy with `changes` (a family's `heads` rule builds the layer's layout with it)."""
    if "K" in changes and "Kv" not in changes and self.Kv == self.K:
      changes["Kv"] = changes["K"]
    return dataclasses.replace(self, **changes)


def zeros_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One array a family (or hook) learns or carries.

  Attributes:
    shape: `Dims -> tuple[int, ...]`, e.g. `lambda d: (d.D, d.N)` for a per-token head router,
      or `None` when the knobs switch the array off (an optional augmented query): it is then
      not created, not checkpointed and not passed (a family param needs a default).
    init: `(key, shape, dtype) -> array` (any `jax.nn.initializers` function); zeros by default.
    doc: one line for the docs and error messages.
    head_axis: the axis indexed by query head, if any (head pruning slices it).
  """

  shape: Callable[[Dims], tuple[int, ...]]
  init: Callable[..., jax.Array] = zeros_init
  doc: str = ""
  head_axis: int | None = None

  def create(self, key, dims: Dims, dtype=jnp.float32) -> jax.Array | None:
    """A fresh array, or None when `shape(dims)` is None (switched off by the knobs)."""
    shape = self.shape(dims)
    if shape is None:
      return None
    return self.init(key, tuple(int(s) for s in shape), dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Aux:
  """The second result of a family that declares aux outputs.

  Attributes:
    losses: name -> scalar; each name is declared in `Family.aux_losses` (its default weight).
    metrics: name -> scalar, logged per step, never differentiated.
    state: name -> new value of a declared `Family.state` array (written after the optimizer
      step; the family should `stop_gradient` it).
  """

  losses: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  state: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


PROJECTED = ("q", "k", "v")


@dataclasses.dataclass(frozen=True)
class Projection:
  """A family's own q/k/v projections, used by the layer instead of (some of) its plain ones.

  The layer creates its plain projections query [D,N,H], key [D,K,H], value [D,Kv,V] for the
  names not in `replaces`, computes them from the layer input, then calls
  `apply(params, x_BTD, q, k, v, dims) -> (q, k, v)` with None for each replaced one; `params`
  are created from their specs like a family's (`nnx.Param`s under `projection_params`). Input
  hooks and positions (RoPE) run on what `apply` returns.

  Attributes:
    replaces: which of "q", "k", "v" the layer does not create (the family computes them).
    params: the arrays `apply` learns, by name.
    apply: see above; `dims` is the layer's layout (after `Family.heads`).
  """

  replaces: tuple[str, ...]
  params: Mapping[str, ParamSpec]
  apply: Callable[..., tuple[Any, Any, Any]]

  def __post_init__(self):
    bad = [r for r in self.replaces if r not in PROJECTED]
    if bad:
      raise ValueError(f"Projection.replaces {bad} not among {PROJECTED}")


@dataclasses.dataclass(frozen=True)
class ConformanceCase:
  """One setting of a family under the conformance suite (and the benchmark).

  Attributes:
    options: keyword arguments for every call (knobs that need a value), or a function
      `Dims -> options` for knobs whose shape depends on the call (a per-head decay [N]).
    causal_only: this setting is only defined causally (e.g. a decayed recurrence).
    input_scale: scale of the random q/k (unnormalised linear attention wants small inputs).
  """

  options: Mapping[str, Any] | Callable[[Dims], Mapping[str, Any]] = dataclasses.field(
    default_factory=dict
  )
  causal_only: bool = False
  input_scale: float = 1.0

  def options_for(self, dims: Dims) -> dict[str, Any]:
    return dict(self.options(dims) if callable(self.options) else self.options)


@dataclasses.dataclass(frozen=True)
class Conformance:
  """How the shared conformance suite (and the benchmark) call a family.

  Attributes:
    cases: named settings; the suite runs every implementation under each.
    implementation_options: extra keyword arguments per implementation (e.g. tile sizes that
      make small test shapes span several tiles).
    reference: the implementation every other one is compared with.
    skip: implementation -> reason the standalone suite cannot run it (e.g. the ring needs a
      multi-device mesh; it has its own test).
    slow: implementations whose suite is marked slow (e.g. Pallas interpret mode).
    benchmark: the settings `experiments.benchmark` runs instead of `cases`, when the suite's
      knobs are sized for its tiny shapes (8-token tiles) rather than for 4k-16k tokens;
      None = `cases`.
  """

  cases: Mapping[str, ConformanceCase] = dataclasses.field(
    default_factory=lambda: {"default": ConformanceCase()}
  )
  implementation_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  reference: str = "xla"
  skip: Mapping[str, str] = dataclasses.field(default_factory=dict)
  slow: tuple[str, ...] = ()
  benchmark: Mapping[str, ConformanceCase] | None = None

  @property
  def benchmark_cases(self) -> Mapping[str, ConformanceCase]:
    return self.cases if self.benchmark is None else self.benchmark


@dataclasses.dataclass(frozen=True)
class Family:
  """One attention family: what is computed, and which implementations compute it.

  Attributes:
    name: registry key.
    attention: the pure function (returns `(out, Aux)` when `returns_aux`).
    implementations: the `implementation=` values it accepts, best first.
    paper: "Title (arXiv id)" of the defining paper, or "" for textbook attention.
    returns_aux: the function returns `(out, Aux)`; required when it declares state or losses.
    supports_mask: accepts `mask=` / `bias=` like softmax attention.
    causal_only: only defined for causal attention (a recurrence).
    decode_step: optional single-token step `(state, q_t, k_t, v_t) -> (out_t, state)`.
    layer_knobs: optional `(knobs, *, layer, num_layers, num_heads) -> knobs`: resolves knob
      values that depend on the layer's depth (e.g. TNL's per-layer decay schedule) when a
      model builds its layers; the pure function itself only ever sees concrete values.
    params, state: learned / carried arrays by keyword-argument name (see the module docstring).
    aux_losses: loss name -> default weight.
    layer_inputs: layer values passed by keyword (subset of `LAYER_INPUTS`).
    hooks: default layer hooks by name (`attnzoo.attention.hooks.HOOKS`), in order.
    heads: optional `Dims -> Dims`: the layer's head layout from the model's (SQA's fewer query
      heads, Sigma's separate key and value head counts, MFA's one wide kv head, mixture
      experts stacked on the head axis); None keeps the model's.
    projection: optional `Projection`: q/k/v computed by the family's own projections.
    conformance: options of the shared conformance suite and benchmark cases.
  """

  name: str
  attention: Callable[..., Any]
  implementations: tuple[str, ...]
  paper: str = ""
  returns_aux: bool = False
  supports_mask: bool = True
  causal_only: bool = False
  decode_step: Callable[..., Any] | None = None
  layer_knobs: Callable[..., dict[str, Any]] | None = None
  params: Mapping[str, ParamSpec] = dataclasses.field(default_factory=dict)
  state: Mapping[str, ParamSpec] = dataclasses.field(default_factory=dict)
  aux_losses: Mapping[str, float] = dataclasses.field(default_factory=dict)
  layer_inputs: tuple[str, ...] = ()
  hooks: tuple[str, ...] = ()
  heads: Callable[[Dims], Dims] | None = None
  projection: Projection | None = None
  conformance: Conformance = dataclasses.field(default_factory=Conformance)

  def __post_init__(self):
    unknown = [i for i in self.implementations if i not in IMPLEMENTATIONS]
    if unknown:
      raise ValueError(
        f"family {self.name!r}: implementations {unknown} are not among {IMPLEMENTATIONS}; "
        "add a new name to registry.IMPLEMENTATIONS first"
      )
    if (self.state or self.aux_losses) and not self.returns_aux:
      raise ValueError(
        f"family {self.name!r} declares state {sorted(self.state)} / aux losses "
        f"{sorted(self.aux_losses)} but returns_aux=False; return (out, Aux) and set it"
      )
    bad = [i for i in self.layer_inputs if i not in LAYER_INPUTS]
    if bad:
      raise ValueError(f"family {self.name!r}: layer_inputs {bad} not among {LAYER_INPUTS}")
    clash = set(self.params) & set(self.state)
    if clash:
      raise ValueError(f"family {self.name!r}: {sorted(clash)} is both a param and a state")

  def knob_values(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The function's keyword-only defaults, updated with `given` (None values = default)."""
    values = {
      p.name: p.default
      for p in inspect.signature(self.attention).parameters.values()
      if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }
    values.update({k: v for k, v in (given or {}).items() if v is not None})
    return values

  def layer_dims(self, model: Dims) -> Dims:
    """The layer's head layout for a model's `Dims` (`heads` applied and checked)."""
    dims = model if self.heads is None else self.heads(model)
    for letter in ("K", "Kv"):
      heads = getattr(dims, letter)
      if heads < 1 or dims.N % heads:
        raise ValueError(
          f"family {self.name!r}: {dims.N} query heads are not a multiple of "
          f"{heads} {'key' if letter == 'K' else 'value'} heads (from the model's N={model.N}, "
          f"K={model.K} and knobs {dict(model.knobs)}); choose head counts that divide N"
        )
    if min(dims.N, dims.H, dims.V) < 1:
      raise ValueError(f"family {self.name!r}: layer layout {dims} has an empty axis")
    return dims

  def init_arrays(self, key, dims: Dims, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Fresh values of every declared param and state array, by keyword name (for functional
    use: tests, benchmarks, notebooks; the NNX layer creates the same from the same specs)."""
    specs = {**self.params, **self.state}
    keys = jax.random.split(key, max(len(specs), 1))
    arrays = {
      name: spec.create(k, dims, dtype)
      for (name, spec), k in zip(specs.items(), keys, strict=False)
    }
    return {name: a for name, a in arrays.items() if a is not None}


def current_mesh_axis(name: str) -> int:
  """Size of axis `name` of the mesh set with `jax.set_mesh` (1 when absent or no mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or name not in mesh.axis_names:
    return 1
  return int(mesh.shape[name])


def resolve_implementation(
  requested: str | None,
  available: Mapping[str, Callable[..., Any]],
  *,
  family: str,
) -> str:
  """Picks an implementation name; `None` means the best for the current platform and mesh.

  Raises ValueError for an unknown name. Automatic choice: "ring" when the current mesh
  (`jax.set_mesh`) splits the "sequence" axis, else the Pallas kernel on GPU/TPU and the
  chunked jnp path on CPU; every step away from the first preference is logged.
  """
  if requested is not None:
    if requested not in available:
      raise ValueError(
        f"implementation={requested!r} is not one of {sorted(available)} for the "
        f"{family!r} family; pass one of those or None to choose automatically"
      )
    return requested
  platform = jax.default_backend()
  preference = ("pallas", "chunked", "xla") if platform in ("gpu", "tpu") else ("chunked", "xla")
  if current_mesh_axis("sequence") > 1:
    preference = ("ring", *preference)
  for name in preference:
    if name in available:
      if name != preference[0]:
        logging.log_first_n(
          logging.INFO,
          "%s: no %r implementation (%s), using %r",
          8,
          family,
          preference[0],
          "sequence-sharded mesh" if preference[0] == "ring" else platform,
          name,
        )
      return name
  name = next(iter(available))
  logging.log_first_n(
    logging.INFO, "%s: none of %s available, using %r", 8, family, preference, name
  )
  return name


def log_fallback(family: str, requested: str, used: str, reason: str) -> None:
  """The one way an implementation hands a call to another: logged, never silent."""
  logging.log_first_n(
    logging.WARNING,
    "%s: implementation %r cannot run this call (%s); using %r",
    8,
    family,
    requested,
    reason,
    used,
  )
