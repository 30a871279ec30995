"""Every difference between the jax versions attnzoo supports lives here.

CI runs jax 0.10.x (Python 3.11); the GPU machine runs jax 0.11.x (Python 3.12).
Import version-dependent names from this module, never from jax directly.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def triton_compiler_params(num_warps: int = 4, num_stages: int = 2):
  """Explicit Triton-backend params: without them jax>=0.10 routes GPU kernels to Mosaic GPU."""
  from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415 (GPU-only module)

  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_compiler_params(dimension_semantics: tuple[str, ...]):
  return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


def make_mesh(axis_shapes, axis_names, *, devices=None):
  """`jax.make_mesh` with Auto axis types (ordinary jnp code works on sharded inputs).

  The first argument's keyword name changed across versions, so it is positional.
  """
  axis_type = jax.sharding.AxisType.Auto
  kwargs = {} if devices is None else dict(devices=devices)
  return jax.make_mesh(
    tuple(axis_shapes), tuple(axis_names), axis_types=(axis_type,) * len(axis_names), **kwargs
  )


shard_map = jax.shard_map
__all__ = [
  "JAX_VERSION",
  "make_mesh",
  "pl",
  "pltpu",
  "shard_map",
  "tpu_compiler_params",
  "triton_compiler_params",
]
