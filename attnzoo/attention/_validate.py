"""Input checks shared by all families: one place for the layout contract's errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_qkv(
  q: jax.Array, k: jax.Array, v: jax.Array, *, separate_kv_heads: bool = False
) -> tuple[int, int, int, int, int, int, int]:
  """Checks q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv]; returns (B, T, S, N, K, H, Hv).

  `separate_kv_heads=True` (softmax attention) also accepts v [B,S,Kv,Hv] with Kv != K, each
  dividing N (Sigma's DiffQKV, arXiv 2501.13629 Eq. 3); the returned K is the key head count.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      shape = getattr(x, "shape", type(x).__name__)
      raise ValueError(
        f"{name} must have rank 4 ({'[B, T, N, H]' if name == 'q' else '[B, S, K, H]'}), "
        f"got shape {shape}"
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
  B, T, N, H = q.shape
  Bk, S, K, Hk = k.shape
  Bv, Sv, Kv, Hv = v.shape
  if not (B == Bk == Bv):
    raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {Bv}; they must be equal")
  if S != Sv:
    raise ValueError(f"k has S={S} positions but v has {Sv}; they must be equal")
  if K != Kv and not separate_kv_heads:
    raise ValueError(
      f"k has K={K} heads but v has {Kv}; they must be equal here (softmax attention, "
      "`dot_product_attention`, takes different key and value head counts)"
    )
  if H != Hk:
    raise ValueError(f"q head dim H={H} differs from k head dim {Hk}; they must be equal")
  check_heads(N, K)
  if Kv != K:
    check_heads(N, Kv, what="value")
  return B, T, S, N, K, H, Hv


def check_layer_input(x, B: int, T: int) -> int:
  """Checks the layer input x [B, T, D] a family reads (a router, a gate); returns D."""
  if getattr(x, "ndim", None) != 3 or x.shape[:2] != (B, T):
    raise ValueError(
      f"x (the layer input) has shape {getattr(x, 'shape', None)}; expected [B, T, D] with "
      f"(B, T) = {(B, T)} as q: pass the layer input the queries were projected from"
    )
  return x.shape[-1]


def check_shape(name: str, array, want: tuple[int, ...], fix: str) -> None:
  """Checks a learned / carried array's shape; `fix` says how to build it right."""
  if tuple(array.shape) != tuple(want):
    raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {tuple(want)}; {fix}")


def check_valid(valid, B: int, T: int):
  """The `valid` layer input as bool [B, T] (all True when None), checked."""
  if valid is None:
    return jnp.ones((B, T), jnp.bool_)
  if valid.shape != (B, T) or valid.dtype != jnp.bool_:
    raise ValueError(
      f"valid must be bool [B, T] = {(B, T)}, got {valid.dtype}{valid.shape}; pass False at "
      "padding tokens"
    )
  return valid


def check_heads(N: int, K: int, *, what: str = "kv") -> int:
  """Checks grouped-query heads (N % K == 0); returns G = N // K."""
  if K == 0 or N % K:
    letter = "Kv" if what == "value" else "K"
    raise ValueError(
      f"query heads N={N} must be a multiple of {what} heads {letter}={K} (grouped-query "
      f"attention); choose {letter} among the divisors of N"
    )
  return N // K


def broadcast_to_bnts(x: jax.Array, name: str, shape_bnts: tuple[int, int, int, int]) -> jax.Array:
  """Left-pads `x` to rank 4 and checks it broadcasts to [B, N, T, S] (no copy)."""
  if x.ndim > 4:
    raise ValueError(
      f"{name} has rank {x.ndim} > 4; it must broadcast to [B, N, T, S]={shape_bnts}"
    )
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  for size, want, letter in zip(x.shape, shape_bnts, "BNTS", strict=True):
    if size not in (1, want):
      raise ValueError(
        f"{name} of shape {x.shape} does not broadcast to [B, N, T, S]={shape_bnts} "
        f"(axis {letter} has size {size}, expected 1 or {want})"
      )
  return x


def split_segment_ids(segment_ids, B: int, T: int, S: int):
  """Returns (q_ids [B,T], kv_ids [B,S]) from an array (self-attention) or a pair."""
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(
        "segment_ids must be an int array [B, T] or a pair (q_ids [B, T], "
        f"kv_ids [B, S]); got a sequence of length {len(segment_ids)}"
      )
    q_ids, kv_ids = (jnp.asarray(x) for x in segment_ids)
  else:
    q_ids = kv_ids = jnp.asarray(segment_ids)
    if T != S:
      raise ValueError(
        f"a single segment_ids array needs T == S (got T={T}, S={S}); "
        "pass a pair (q_ids, kv_ids) for cross-attention"
      )
  for name, ids, length in (("q segment_ids", q_ids, T), ("kv segment_ids", kv_ids, S)):
    if ids.shape != (B, length):
      raise ValueError(f"{name} must have shape {(B, length)}, got {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"{name} must be integers, got dtype {ids.dtype}")
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
