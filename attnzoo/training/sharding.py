"""Device mesh and logical axis rules: how params, optimizer state and batches are laid out.

Every array dimension gets a *logical* name ("batch", "embed", "heads", ...). Rules map
logical names to mesh axes (`data`, `fsdp`, `tensor`, `sequence`), so changing the
parallelism is a config edit: data parallel = `data=-1`; FSDP = `fsdp=-1` (params and
optimizer state split over "embed"); tensor parallel = `tensor=n` (heads / mlp / vocab);
sequence parallel = `sequence=n` (ring attention over "length").

Params are matched by their path (e.g. `blocks/0/attn/query/kernel`) against
`PARAM_AXES`; the optimizer's moment trees repeat those paths, so they get the same
layout. A dimension a rule cannot split evenly stays replicated (logged once).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import compat

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical axis -> mesh axis (or axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", "sequence"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
)

# Activations: batch over (data, fsdp), length over sequence, features replicated
# (FSDP shards params over "embed", never activations).
ACTIVATION_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", "sequence"),
)

# regex searched in the "/"-joined param path -> logical axes of the array
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
  (r"(^|/)embed/embedding$", ("vocab", "embed")),
  (r"(^|/)embed/kernel$", (None, "embed")),
  (r"(^|/)pos_embed$", (None, "embed")),
  (r"attn/query/kernel$", ("embed", "heads", None)),
  (r"attn/(key|value)/kernel$", ("embed", "kv_heads", None)),
  (r"attn/out/kernel$", ("heads", None, "embed")),
  (r"mlp/(up|gate)/kernel$", ("embed", "mlp")),
  (r"mlp/down/kernel$", ("mlp", "embed")),
  (r"(^|/)head/kernel$", ("embed", "vocab")),
)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of MESH_AXES from `axes`; one axis may be -1 (takes the remaining devices)."""
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes: {MESH_AXES}")
  sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(axes)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(
      f"mesh {dict(axes)} does not fit {num_devices} devices; sizes must be "
      f"positive (or one -1) and their product must divide {num_devices}"
    )
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} uses {math.prod(sizes)} devices but "
      f"{num_devices} are present; set one axis to -1 to use them all"
    )
  return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The 4-axis mesh (data, fsdp, tensor, sequence) over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  return compat.make_mesh(mesh_shape(axes, len(devices)), MESH_AXES, devices=devices)


def logical_to_spec(
  logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
) -> P:
  """PartitionSpec of an array with `logical` axis names; unsplittable dims are replicated."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(logical, shape, strict=True):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes):
      logging.log_first_n(
        logging.INFO, "dim %s=%d not divisible by mesh axes %s; replicated", 8, name, size, axes
      )
      axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def _path_str(path) -> str:
  """'0/blocks/1/attn/query/kernel' from a jax key path (attribute keys such as a
  Variable's `.value` are not part of the param path)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
  return "/".join(parts)


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, path) and len(axes) == ndim:
      return axes
  return (None,) * ndim


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of a (possibly abstract) nnx state, by param path."""

  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    logical = param_logical_axes(_path_str(path), len(shape))
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))

  return jax.tree_util.tree_map_with_path(one, state)


def batch_shardings(batch: Mapping[str, jax.Array], mesh: Mesh, rules=DEFAULT_RULES):
  """Inputs/targets/weights: batch over (data, fsdp), [B, L] arrays' length over sequence."""
  return {
    name: NamedSharding(mesh, logical_to_spec(("batch", "length")[: x.ndim], x.shape, mesh, rules))
    for name, x in batch.items()
  }


def activation_constraint(mesh: Mesh, rules=ACTIVATION_RULES):
  """`constrain(x, logical_axes)` for the model: a sharding constraint on activations,
  or None on a single device (nothing to constrain)."""
  if mesh.size == 1:
    return None

  def constrain(x, logical_axes):
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return constrain


def maybe_initialize_distributed(
  *,
  enabled: bool,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """`jax.distributed.initialize` for multi-host runs (no-op unless `enabled`).

  Call it first, before anything touches a device (jax.devices(), an array, a jit).
  With no arguments JAX auto-detects the cluster (TPU pods, SLURM, GKE); pass them
  explicitly elsewhere: every process gets the same `coordinator_address` (host:port
  of process 0) and `num_processes`, and its own `process_id`. After it, `jax.devices()`
  lists every process's devices and the mesh spans them all.

  CPU processes exchange collectives through gloo (`jax_cpu_collectives_implementation`);
  it is the default in recent JAX and set here where it is not (older JAX defaults to
  none, and cross-process CPU collectives then fail). It must be set before the CPU
  backend starts, hence here; it does not affect GPU/TPU backends.
  """
  if not enabled:
    return
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
  )
