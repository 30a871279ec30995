"""What every kernel's public entry decides the same way: the layout, the lowering, and whether to
interpret.

- `check_qkv`: the primitive layout q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], N % K == 0.

- `backend` ("gpu" | "tpu") picks the lowering: "gpu" = Pallas on the Triton backend, "tpu" =
  Mosaic. None takes it from `jax.default_backend()`; a host without either gets "gpu" (the
  GPU-style kernel is the faster one to interpret).
- `interpret` (bool | None): None runs the Pallas interpreter iff `jax.default_backend()` is
  neither "gpu" nor "tpu", and says so (a `logging` warning, once per call site: the interpreter
  is orders of magnitude slower, so never silently). True and False are honoured; False on a host
  without an accelerator needs an explicit `backend` (then the call can only be lowered for that
  platform, e.g. by `jax.export` or the checks in `lowering_check`), else it raises.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import jax.numpy as jnp

BACKENDS = ("gpu", "tpu")

_logger = logging.getLogger("pallas_kernels")
# Frames in these directories are not call sites: the kernel packages and jax's transformations
# (a kernel called through jax.vjp / jax.jit is attributed to the user's line).
_SKIPPED_DIRS = tuple(
  os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], jax)
)
_logged_call_sites: set[tuple[str, str, int]] = set()


def default_backend() -> str:
  """The lowering for the current default platform: "tpu" on TPU, "gpu" everywhere else."""
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def resolve_backend(backend: str | None) -> str:
  """`backend`, or `default_backend()` for None; raises for anything but "gpu" / "tpu"."""
  if backend is None:
    return default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} must be one of {list(BACKENDS)} or None")
  return backend


def resolve_interpret(interpret: bool | None, *, op: str, backend: str | None) -> bool:
  """The interpret flag a kernel call runs with (see the module docstring).

  `backend` is the caller's argument *before* defaulting: an explicit one lets
  `interpret=False` through on a host without an accelerator (lowering-only use).
  """
  platform = jax.default_backend()
  has_kernel = platform in BACKENDS
  if interpret is None:
    if not has_kernel:
      _log_once(
        op,
        "%s: jax.default_backend()=%r has no compiled Pallas kernel; running it in the Pallas "
        "interpreter (slow; pass interpret=True to ask for it explicitly)",
        op,
        platform,
      )
    return not has_kernel
  if interpret not in (True, False):
    raise TypeError(f"interpret={interpret!r} must be True, False or None")
  if not interpret and not has_kernel and backend is None:
    raise ValueError(
      f"{op}(interpret=False) needs a GPU or TPU, but jax.default_backend()={platform!r}: pass "
      "interpret=None (or True) to run the kernel in the Pallas interpreter, or "
      "backend='gpu'/'tpu' to lower it for that platform only (jax.export, compile checks)"
    )
  return bool(interpret)


def check_qkv(q, k, v) -> tuple[int, int, int, int, int, int, int]:
  """Checks q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] (floating, N % K == 0); returns
  (B, T, S, N, K, H, Hv)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(
        f"{name} must be 4-D [B, T|S, heads, dim], got shape {getattr(x, 'shape', None)}"
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name}.dtype={x.dtype} must be floating")
  B, T, N, H = q.shape
  Bk, S, K, Hk = k.shape
  if (Bk, Hk) != (B, H) or v.shape[:3] != k.shape[:3]:
    raise ValueError(
      f"shapes q {q.shape}, k {k.shape}, v {v.shape} do not match "
      "q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv]"
    )
  if N % K:
    raise ValueError(f"N={N} query heads is not divisible by K={K} kv heads; use N = K * G")
  return B, T, S, N, K, H, v.shape[3]


def _log_once(op: str, message: str, *args) -> None:
  """Logs `message` the first time it is reached from a given caller line (outside this
  package); later calls from the same place stay quiet."""
  frame = sys._getframe(1)
  while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_SKIPPED_DIRS):
    frame = frame.f_back
  site = (op, frame.f_code.co_filename, frame.f_lineno) if frame else (op, "?", 0)
  if site in _logged_call_sites:
    return
  _logged_call_sites.add(site)
  _logger.warning(message + " [call site %s:%d]", *args, site[1], site[2])
