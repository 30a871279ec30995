"""`block_sparse_attention`: the public entry, input checks, padding and the custom VJP.

Paper: FlashAttention-2 (Dao, arXiv:2307.08691), Algorithm 1 (forward: online softmax over
kv tiles, saving only O and the row log-sum-exp L) and Algorithm 2 (backward: recompute
P = exp(S - L), D = rowsum(dO * O), dS = P * (dP - D)), restricted to the tiles a `BlockMap`
lists, as in block-sparse FlashAttention (Dao et al., arXiv:2205.14135, section 3.3) and
splash attention's mask-info tables.

  out[b,t,n] = sum_s softmax_s(logits)[kept] v[b,s,n//G],
  logits = cap * tanh(scale * q[b,t,n] . k[b,s,n//G] / cap)  (plain scaled dot without cap)

Differences from the papers:
- Two backward passes (dQ over the kv tables; dK/dV over the transposed tables) instead of
  one pass with atomic dQ updates: deterministic, no atomics, works on GPU and TPU alike.
- The element predicate `mask_fn` runs only on PARTIAL tiles; FULL tiles skip it. Keys past
  S (ragged last tile) and unequal segment ids are dropped on every tile.
- A query with no kept key returns zeros (not NaN) and zero gradients.
- Masks that read arrays (segment ids of packed documents, a dense keep array, a random
  block pattern) pass them as `mask_tables`, kernel inputs rather than captured constants
  (Pallas cannot capture array constants). The GPU kernel evaluates
  `mask_fn(tables, q_pos, k_pos)` in the kernel, gathering from the tables by position; the
  TPU kernel, as Mosaic cannot gather, gets the predicate's values on the PARTIAL tiles,
  computed by XLA before the kernels (`table_masks` docstring).
Choices where the spec was silent: q/k/v are padded to tile multiples here (zeros), and
the padding is sliced off; `scale` defaults to H**-0.5; the soft cap is applied after the
scale (as in Gemma 2).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from pallas_kernels import _common
from pallas_kernels.block_sparse import kernel_gpu, kernel_tpu, table_masks
from pallas_kernels.block_sparse.block_map import BlockMap, num_blocks
from pallas_kernels.block_sparse.config import BlockSizes, KernelConfig
from pallas_kernels.block_sparse.table_masks import table_xp

_KERNELS = {"gpu": kernel_gpu, "tpu": kernel_tpu}


def block_sparse_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  block_map: BlockMap,
  *,
  mask_fn=None,
  mask_tables: tuple[jax.Array, ...] = (),
  scale: float | None = None,
  segment_ids: Int[Array, "B T"] | tuple[Int[Array, "B T"], Int[Array, "B S"]] | None = None,
  logits_soft_cap: float | None = None,
  block_sizes: BlockSizes | None = None,
  interpret: bool | None = None,
  backend: str | None = None,
  return_lse: bool = False,
) -> Float[Array, "B T N Hv"] | tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
  """Flash attention over the tiles of `block_map` (see the module docstring for the math).

  Args:
    q, k, v: [B, T, N, H], [B, S, K, H], [B, S, K, Hv]; N % K == 0 (query head n reads kv
      head n // (N // K); KV is never repeated in memory). Same float dtype.
    block_map: tiles to visit; its seq_q/seq_k must be T/S, its tile sizes those of
      `block_sizes`, its groups [Bm, Nm] with Bm in {1, B} and Nm in {1, N}. May be traced.
    mask_fn: traceable `(q_pos, k_pos) -> bool` over broadcasting absolute int32 positions
      (True = keep), evaluated on PARTIAL tiles; e.g. `attnzoo.masks.Causal().predicate`.
      With `mask_tables`: `(tables, q_pos, k_pos) -> bool`. It must not close over arrays
      (NotImplementedError): pass them as tables.
    mask_tables: arrays (ndim >= 1, any shape) that `mask_fn` reads by position, e.g.
      `mask.tables()` of an attnzoo mask. On GPU they arrive as `table_masks.TableView`s,
      indexable by integer arrays (`table[rows, cols]`, a gather; clip the indices) but not
      convertible to arrays; a predicate that calls `xp.asarray(table)` takes
      `xp=table_xp`. For an attnzoo mask pass `mask_fn=MaskPredicate(mask)`, which does
      that and is equal across calls for equal masks: an equal `mask_fn` (and shapes) lets
      repeated eager calls reuse the compiled kernels.
    scale: logit scale, default H**-0.5.
    segment_ids: int [B, T] (self-attention, T == S) or (q_ids [B, T], kv_ids [B, S]);
      a query keeps only keys with an equal id.
    logits_soft_cap: c > 0 gives logits = c * tanh(logits / c).
    block_sizes: tile sizes (and GPU warps/stages); default: the map's tiles.
    interpret: run the kernel in the Pallas interpreter. None (default): exactly when
      `jax.default_backend()` is neither "gpu" nor "tpu", with a logged warning (once per
      call site); False there raises unless `backend` is given (lowering-only use).
    backend: "gpu" (Triton lowering) or "tpu" (Mosaic lowering); default from
      `jax.default_backend()`, and "gpu" on CPU.
    return_lse: also return the per-row log-sum-exp of the kept logits (the kernel's own
      statistic), [B, T, N] fp32, -inf for rows with no kept key; differentiable.

  Returns:
    [B, T, N, Hv] in q.dtype (fp32 accumulation inside); with `return_lse`, (out, lse).
  """
  B, T, N, H = _check_inputs(q, k, v)
  S = k.shape[1]
  block_sizes = _check_block_sizes(block_map, block_sizes, T, S)
  block_map.broadcast_to_groups(B, N)
  interpret = _common.resolve_interpret(interpret, op="block_sparse_attention", backend=backend)
  backend = _common.resolve_backend(backend)
  mask_fn, mask_tables = _check_mask_fn(mask_fn, mask_tables, block_map)
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap={logits_soft_cap} must be a positive float or None")
  segments = _check_segments(segment_ids, B, T, S)
  if not interpret:
    _check_hardware_tiles(backend, block_sizes, H, v.shape[-1])

  bq, bk = block_sizes.block_q, block_sizes.block_k
  cfg = KernelConfig(
    mask_fn=mask_fn,
    scale=float(H**-0.5 if scale is None else scale),
    soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
    block_q=bq,
    block_k=bk,
    seq_q=T,
    seq_k=S,
    has_segments=segments is not None,
    interpret=interpret,
    num_warps=block_sizes.num_warps,
    num_stages=block_sizes.num_stages,
    table_dtypes=tuple(t.dtype.name for t in mask_tables),
  )
  kv_tables = (block_map.kv_indices, block_map.kv_counts, block_map.kv_partial)
  q_tables = (block_map.q_indices, block_map.q_counts, block_map.q_partial)
  # Host-side (concrete-map) preparation happens here, outside the jitted call.
  mask_inputs = table_masks.kernel_inputs(backend, mask_tables, block_map) if mask_tables else ()
  out, lse = _padded_attention(
    q, k, v, kv_tables, q_tables, segments, mask_inputs, cfg=cfg, backend=backend
  )
  return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class MaskPredicate:
  """`mask_fn` of a mask object with `tables()` and `predicate_with(tables, q, k, xp)`.

  Called as `(q_pos, k_pos)` when the mask has no tables, `(tables, q_pos, k_pos)` when it
  has (pass `mask_tables=mask.tables()`); evaluates with `xp=table_xp`. Equal for equal
  masks, so repeated calls with a rebuilt mask reuse the compiled kernels.
  """

  mask: Any

  def __call__(self, *args):
    tables, q_pos, k_pos = args if len(args) == 3 else ((), *args)
    return self.mask.predicate_with(tables, q_pos, k_pos, table_xp)


@functools.partial(jax.jit, static_argnames=("cfg", "backend"))
def _padded_attention(q, k, v, kv_tables, q_tables, segments, mask_inputs, *, cfg, backend):
  """Pads to whole tiles, runs the kernels, slices. Jitted: an eager call with an equal
  `cfg` (and input shapes) reuses the compiled kernels instead of re-tracing them."""
  T, S = q.shape[1], k.shape[1]
  Tp, Sp = num_blocks(T, cfg.block_q) * cfg.block_q, num_blocks(S, cfg.block_k) * cfg.block_k
  pad = lambda x, n, to: jnp.pad(x, [(0, to - n) if a == 1 else (0, 0) for a in range(x.ndim)])
  if segments is not None:
    segments = (pad(segments[0], T, Tp), pad(segments[1], S, Sp))
  kv_tables, q_tables = (
    tuple(jnp.asarray(a, jnp.int32) for a in tables) for tables in (kv_tables, q_tables)
  )
  out, lse = _attention(
    pad(q, T, Tp),
    pad(k, S, Sp),
    pad(v, S, Sp),
    kv_tables,
    q_tables,
    segments,
    mask_inputs,
    cfg,
    backend,
  )
  return out[:, :T], lse[:, :T]


# ------------------------------------------------------------------ custom VJP


def _public_lse(lse_bnt):
  """Kernel lse [B, N, Tp] (+inf for rows with no kept key) -> [B, Tp, N] fp32 (-inf there)."""
  lse = jnp.swapaxes(lse_bnt.astype(jnp.float32), 1, 2)
  return jnp.where(jnp.isposinf(lse), -jnp.inf, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention(q, k, v, kv_tables, q_tables, segments, mask_inputs, cfg, backend):
  """(out [B, Tp, N, Hv], lse [B, Tp, N] fp32), both differentiable."""
  out, lse = _KERNELS[backend].forward(q, k, v, kv_tables, segments, mask_inputs, cfg)
  return out, _public_lse(lse)


def _attention_fwd(q, k, v, kv_tables, q_tables, segments, mask_inputs, cfg, backend):
  out, lse = _KERNELS[backend].forward(q, k, v, kv_tables, segments, mask_inputs, cfg)
  residuals = (q, k, v, out, lse, kv_tables, q_tables, segments, mask_inputs)
  return (out, _public_lse(lse)), residuals


def _attention_bwd(cfg, backend, residuals, cotangents):
  d_out, d_lse = cotangents
  q, k, v, out, lse, kv_tables, q_tables, segments, mask_inputs = residuals
  # D = rowsum(dO * O) (FlashAttention-2, Algorithm 2 line 4), [B, N, Tp] like lse. An lse
  # cotangent g enters dS = P ⊙ (dP − D) as D − g (d lse_i / d s_ij = P_ij).
  delta = jnp.einsum("btnv,btnv->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))
  g = jnp.swapaxes(d_lse.astype(jnp.float32), 1, 2)
  delta = delta - jnp.where(jnp.isinf(lse), 0.0, g)
  dq, dk, dv = _KERNELS[backend].backward(
    q, k, v, d_out, lse, delta, kv_tables, q_tables, segments, mask_inputs, cfg
  )
  return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------ checks


def _check_inputs(q, k, v):
  B, T, _, N, _, H, _ = _common.check_qkv(q, k, v)
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
  return B, T, N, H


def _check_block_sizes(block_map, block_sizes, T, S):
  if not isinstance(block_map, BlockMap):
    raise TypeError(f"block_map must be a BlockMap, got {type(block_map).__name__}")
  if (block_map.seq_q, block_map.seq_k) != (T, S):
    raise ValueError(
      f"block_map was built for seq_q={block_map.seq_q}, seq_k={block_map.seq_k} "
      f"but the inputs have T={T}, S={S}: rebuild it for these lengths"
    )
  if block_sizes is None:
    return BlockSizes(block_q=block_map.block_q, block_k=block_map.block_k)
  if (block_sizes.block_q, block_sizes.block_k) != (block_map.block_q, block_map.block_k):
    raise ValueError(
      f"block_sizes ({block_sizes.block_q}, {block_sizes.block_k}) differ from the "
      f"block_map tiles ({block_map.block_q}, {block_map.block_k}): build the map "
      "with the kernel's tile sizes"
    )
  return block_sizes


def _check_segments(segment_ids, B, T, S):
  if segment_ids is None:
    return None
  if isinstance(segment_ids, tuple):
    if len(segment_ids) != 2:
      raise ValueError(
        f"segment_ids is a tuple of {len(segment_ids)}; pass an array [B, T] or a "
        "pair (q_ids [B, T], kv_ids [B, S])"
      )
    q_ids, kv_ids = segment_ids
  else:
    if T != S:
      raise ValueError(
        f"a single segment_ids array needs T == S (got T={T}, S={S}); pass "
        "(q_ids [B, T], kv_ids [B, S])"
      )
    q_ids = kv_ids = segment_ids
  for name, ids, n in (("q segment ids", q_ids, T), ("kv segment ids", kv_ids, S)):
    if ids.shape != (B, n):
      raise ValueError(f"{name} have shape {ids.shape}, expected {(B, n)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"{name} dtype {ids.dtype} must be an integer type")
  return jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)


def _check_mask_fn(mask_fn, mask_tables, block_map):
  """Drops a predicate no tile needs (and its tables); rejects one that closes over arrays.

  Returns (mask_fn, mask_tables as a tuple of jax arrays).
  """
  if not isinstance(mask_tables, (tuple, list)):
    raise TypeError(f"mask_tables must be a tuple of arrays, got {type(mask_tables).__name__}")
  if mask_tables and mask_fn is None:
    raise ValueError(
      f"mask_tables ({len(mask_tables)} arrays) were given without a mask_fn "
      "to read them; pass mask_fn=(tables, q_pos, k_pos) -> bool"
    )
  if mask_fn is None:
    return None, ()
  if not callable(mask_fn):
    raise TypeError(
      f"mask_fn={mask_fn!r} must be a callable (q_pos, k_pos) -> bool, or "
      "(tables, q_pos, k_pos) -> bool with mask_tables"
    )
  tables = []
  for i, table in enumerate(mask_tables):
    if np.ndim(table) < 1 or not hasattr(table, "dtype"):
      raise ValueError(
        f"mask_tables[{i}]={table!r} must be an array with ndim >= 1 "
        "(reshape a scalar to shape (1,))"
      )
    tables.append(jnp.asarray(table))
  try:  # a concrete map without PARTIAL tiles never evaluates the predicate
    if not (np.any(np.asarray(block_map.kv_partial)) or np.any(np.asarray(block_map.q_partial))):
      return None, ()
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    pass
  pos = jax.ShapeDtypeStruct((), jnp.int32)
  if tables:
    structs = tuple(jax.ShapeDtypeStruct(t.shape, t.dtype) for t in tables)
    consts = jax.make_jaxpr(lambda t, q, k: mask_fn(t, q, k))(structs, pos, pos).consts
  else:
    consts = jax.make_jaxpr(mask_fn)(pos, pos).consts
  if any(np.ndim(c) > 0 for c in consts):
    name = getattr(mask_fn, "__qualname__", type(mask_fn).__name__)
    raise NotImplementedError(
      f"mask_fn {name} closes over arrays of shapes {[np.shape(c) for c in consts]}; a "
      "Pallas kernel cannot capture them. Pass them as mask_tables= (and take them as "
      "mask_fn's first argument), segment ids as segment_ids=, or use a block map whose "
      "tiles are all FULL/EMPTY (then mask_fn is not needed)"
    )
  return mask_fn, tuple(tables)


def _check_hardware_tiles(backend, block_sizes, H, Hv):
  """Tile constraints of the compiled kernels (the interpreter accepts any tile)."""
  bq, bk = block_sizes.block_q, block_sizes.block_k
  if backend == "tpu" and (bq % 8 or bk % 128):
    raise ValueError(
      f"the TPU kernel needs block_q % 8 == 0 and block_k % 128 == 0 "
      f"(got block_q={bq}, block_k={bk}); pass BlockSizes(128, 128)"
    )
  if backend == "gpu":
    for name, size in (("block_q", bq), ("block_k", bk), ("H", H), ("Hv", Hv)):
      if size < 16 or size & (size - 1):
        raise ValueError(
          f"the Triton kernel needs {name}={size} to be a power of two >= 16 "
          "(pad the head dim, or pick power-of-two tiles)"
        )


__all__ = ["MaskPredicate", "block_sparse_attention", "table_xp"]
