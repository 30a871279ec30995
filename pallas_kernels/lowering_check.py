"""Compile-only checks of the block-sparse kernels for real hardware, runnable on a CPU box.

- `tpu_export(fn, *args)`: Mosaic lowering through `jax.export(..., platforms=["tpu"])`;
  returns the number of `tpu_custom_call`s. Catches primitives without a Pallas-TPU lowering
  and illegal block shapes, which interpret mode hides. The Mosaic compiler in libtpu is
  not run.
- `triton_ttir(fn, *args)`: the Pallas Triton lowering for `cuda` (no GPU needed); returns
  the Triton-dialect (TTIR) text of every kernel in `fn`.
- `triton_compile(ttir)`: TTIR -> PTX/cubin for sm_90 with the `triton` package (the
  `triton` extra); raises `ImportError` where it is not installed.

The TTIR is captured by wrapping Pallas's private `lower_jaxpr_to_triton_module`; that is
the only private API used, and only here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import jax

SM90 = ("cuda", 90, 32)  # backend, compute capability, warp size


def tpu_export(fn, *args) -> int:
  """Exports `jax.jit(fn)` for TPU; returns how many Mosaic kernels the module calls."""
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  return exported.mlir_module().count("tpu_custom_call")


@contextlib.contextmanager
def _capture_ttir():
  from jax._src.pallas.triton import lowering  # noqa: PLC0415 (private, compile checks only)

  captured = []
  original = lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  lowering.lower_jaxpr_to_triton_module = capture
  try:
    yield captured
  finally:
    lowering.lower_jaxpr_to_triton_module = original


def triton_ttir(fn, *args) -> list[str]:
  """Lowers `jax.jit(fn)` for CUDA through the Pallas Triton backend; returns each TTIR."""
  with _capture_ttir() as captured:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  return list(captured)


def triton_compile(ttir: str, *, num_warps: int = 4, num_stages: int = 2) -> dict:
  """Compiles one TTIR module to PTX and cubin for sm_90; returns sizes and shared memory."""
  import triton  # noqa: PLC0415 (optional extra)
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415

  # A failed `import jax_triton` leaves TRITON_CACHE_DIR="" behind, which breaks compile.
  if not os.environ.get("TRITON_CACHE_DIR"):
    os.environ["TRITON_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "triton_cache")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ttir)
    compiled = triton.compile(
      path, target=GPUTarget(*SM90), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
  return dict(
    ptx_chars=len(compiled.asm["ptx"]),
    cubin_bytes=len(compiled.asm["cubin"]),
    shared_bytes=compiled.metadata.shared,
  )
