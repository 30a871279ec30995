"""Pallas kernels for attnzoo, each beside its pure-jnp reference.

This package depends on jax only; it knows nothing of attnzoo. Every kernel package
(`block_sparse/`, `linear/`) has the same files: `ops.py` (public entry, checks, custom VJP),
`config.py` (`BlockSizes`, `KernelConfig`), `tiles.py` (the tile math, once),
`kernel_gpu.py` / `kernel_tpu.py` (the two lowerings) and `reference.py` (the fp32 oracle).
Shared here: `_common.py` (layout checks, the `backend` and `interpret` policy of every public
entry), `compat.py` (jax version differences) and `lowering_check.py` (compile-only checks).
"""
