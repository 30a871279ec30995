"""Ring attention: sequence-parallel softmax attention over a device mesh axis.

Paper: "Ring Attention with Blockwise Transformers for Near-Infinite Context", Liu, Zaharia and
Abbeel, arXiv 2310.01889 (Sec. 3, Algorithm 1).

The sequence axis of q, k and v is split into P contiguous shards, one per device of the mesh axis
`axis_name`. Device p keeps its query shard Q_p and passes key/value shards around the ring: at
step i it holds (K_j, V_j) with j = (p - i) mod P, folds them into an online softmax, and sends
them to device p + 1 while computing. After P steps every query has seen every key:

    out_p = sum_j exp(S_pj - lse_p) V_j,   S_pj = soft_cap(scale * Q_p K_j^T) + mask,
    lse_p = log sum_j sum_s exp(S_pj)      (running max m, sum l and accumulator in float32).

The backward pass is a second ring (custom_vjp). With D_p = rowsum(dO_p * O_p) and
P_pj = exp(S_pj - lse_p), the block of (p, j) contributes

    dV_j += P_pj^T dO_p,   dS_pj = P_pj * (dO_p V_j^T - D_p),
    dQ_p += scale * dS_pj K_j,   dK_j += scale * dS_pj^T Q_p     (dS times soft_cap' if capped),

where dQ_p stays at home and the fp32 accumulators (dK_j, dV_j) travel around the ring with
(K_j, V_j); one extra hop after the last step brings them back to the device that owns shard j.
Residuals are q, k, v, out and lse — O(T/P) per device; logits are recomputed block by block, so no
[T, S] array is ever stored. (Autodiff through the forward ring would instead save, per device,
every step's K/V shard and [T/P, S/P] probabilities: P times the K/V of a shard plus a [T/P, S]
array per head — the memory that ring attention exists to avoid.)

The per-block math (soft cap, online-softmax update, finalisation, P and dS of the backward) is
`pallas_kernels.block_sparse.tiles`, the functions the flash kernels and the chunked path run;
a block here is a whole [T/P, S/P] shard pair, and only the P @ V product is spelt for its layout.

Differences from the paper:
- The paper composes ring communication with blockwise (chunked) attention inside each device.
  Here each step computes one dense [T/P, S/P] block with einsums; the block sizes are set by P.
- Causal masking uses the contiguous layout, so work is unbalanced (device p computes p + 1 of the
  P blocks; blocks entirely in the future are skipped with `lax.cond`, not computed and masked).
  Striped / zig-zag layouts (Brandon et al., arXiv 2311.09431) would balance it; not done here.
- dK/dV accumulators travel in float32 (twice the bytes of bf16 K/V) to keep fp32 accumulation.
- GQA without repeating kv heads, segment ids (packed sequences) and a logit soft cap
  (`cap * tanh(logits / cap)`, Gemma 2) are additions.

Choices where the spec was silent:
- Causal masking is top-left aligned, as in `jax.nn.dot_product_attention`: query t sees keys
  s <= t (global positions); this is the usual convention when T == S.
- Batch is sharded over whichever of ("data", "fsdp") exist in the mesh and heads over "tensor";
  every other mesh axis (if any) is treated as replicated.
- A query row whose keys are all masked returns zeros and zero gradients.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from attnzoo.attention import _validate
from pallas_kernels import compat
from pallas_kernels.block_sparse.tiles import (
  finalize,
  online_softmax_init,
  online_softmax_step,
  probs_and_dlogits,
  soft_cap,
  soft_cap_vjp,
)

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) settings of one ring-attention call."""

  mesh: Mesh
  axis_name: str
  is_causal: bool
  scale: float
  logits_soft_cap: float | None
  has_segments: bool

  @property
  def ring_size(self) -> int:
    return self.mesh.shape[self.axis_name]

  @property
  def batch_axes(self) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in self.mesh.axis_names and a != self.axis_name)

  @property
  def sharded_axes(self) -> tuple[str, ...]:
    return (*self.batch_axes, self.axis_name) + ((self.head_axis,) if self.head_axis else ())

  @property
  def head_axis(self) -> str | None:
    names = self.mesh.axis_names
    return HEAD_AXIS if HEAD_AXIS in names and self.axis_name != HEAD_AXIS else None


def ring_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  *,
  mesh: Mesh,
  axis_name: str = "sequence",
  is_causal: bool = False,
  scale: float | None = None,
  segment_ids: Int[Array, "B T"] | tuple[Int[Array, "B T"], Int[Array, "B S"]] | None = None,
  logits_soft_cap: float | None = None,
) -> Float[Array, "B T N Hv"]:
  """Softmax attention with the sequence axis sharded over `mesh.shape[axis_name]` devices.

  Args:
    q: queries [B, T, N, H].
    k: keys [B, S, K, H], N % K == 0 (grouped-query attention, kv heads are not repeated).
    v: values [B, S, K, Hv].
    mesh: the device mesh. `axis_name` shards T and S; "data"/"fsdp" (when present) shard B and
      "tensor" (when present) shards N and K. Inputs may arrive with any sharding; they are
      resharded to this layout, and the output has it.
    axis_name: the mesh axis of the ring.
    is_causal: query t attends to keys s <= t (top-left aligned).
    scale: logit scale; default 1 / sqrt(H).
    segment_ids: int [B, T] (self-attention) or a pair (q_ids [B, T], kv_ids [B, S]); a query
      attends only to keys with the same id.
    logits_soft_cap: if set, logits become `cap * tanh(logits / cap)` before masking.

  Returns:
    [B, T, N, Hv] in q's dtype.

  Differentiable in q, k, v through a custom_vjp whose backward is a second ring pass.
  """
  B, T, S, N, K, H, _ = _validate.check_qkv(q, k, v)
  if axis_name not in mesh.axis_names:
    raise ValueError(
      f"axis_name={axis_name!r} is not an axis of the mesh {dict(mesh.shape)}; "
      "pass the name of the sequence-parallel axis"
    )
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap={logits_soft_cap} must be positive (or None)")
  config = _Config(
    mesh=mesh,
    axis_name=axis_name,
    is_causal=bool(is_causal),
    scale=float(H**-0.5 if scale is None else scale),
    logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
    has_segments=segment_ids is not None,
  )
  _check_divisibility(config, B=B, T=T, S=S, K=K)
  ids = _validate.split_segment_ids(segment_ids, B, T, S)
  q_ids, kv_ids = ids if ids is not None else (None, None)
  spec = _specs(config)
  q, k, v = (_to_layout(config, x, spec["qkv"]) for x in (q, k, v))
  q_ids, kv_ids = (_to_layout(config, x, spec["ids"]) for x in (q_ids, kv_ids))
  return _ring(config, q, k, v, q_ids, kv_ids)


def _to_layout(config: _Config, x, spec):
  """Reshards `x` to `spec` on meshes with Explicit axes (shard_map reshards Auto ones itself)."""
  explicit = jax.sharding.AxisType.Explicit in config.mesh.axis_types
  if x is None or not explicit:
    return x
  return jax.sharding.reshard(x, NamedSharding(config.mesh, spec))


def _check_divisibility(config: _Config, *, B: int, T: int, S: int, K: int) -> None:
  P_ = config.ring_size
  for letter, size in (("T", T), ("S", S)):
    if size % P_:
      raise ValueError(
        f"{letter}={size} is not divisible by the {config.axis_name!r} mesh axis size {P_}; "
        f"pad the sequence to a multiple of {P_} (and mask the padding with segment_ids)"
      )
  batch_size = 1
  for a in config.batch_axes:
    batch_size *= config.mesh.shape[a]
  if B % batch_size:
    raise ValueError(
      f"B={B} is not divisible by the batch mesh axes {config.batch_axes} "
      f"(total size {batch_size}); use a batch size that is a multiple of it"
    )
  if config.head_axis is not None and K % config.mesh.shape[config.head_axis]:
    raise ValueError(
      f"kv heads K={K} are not divisible by the {config.head_axis!r} mesh axis size "
      f"{config.mesh.shape[config.head_axis]}; choose K as a multiple of it"
    )


# ---------------------------------------------------------------------------------------------
# custom_vjp over the whole sharded computation
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(config, q, k, v, q_ids, kv_ids):
  return _ring_fwd(config, q, k, v, q_ids, kv_ids)[0]


def _specs(config: _Config):
  batch = config.batch_axes or None
  seq, heads = config.axis_name, config.head_axis
  return dict(
    qkv=P(batch, seq, heads, None),  # [B, T|S, N|K, H]
    ids=P(batch, seq) if config.has_segments else None,  # [B, T|S]
    lse=P(batch, heads, None, seq),  # [B, K, G, T]
  )


def _ring_fwd(config, q, k, v, q_ids, kv_ids):
  spec = _specs(config)
  fwd = compat.shard_map(
    functools.partial(_forward_shard, config),
    mesh=config.mesh,
    in_specs=(spec["qkv"],) * 3 + (spec["ids"],) * 2,
    out_specs=(spec["qkv"], spec["lse"]),
  )
  out, lse = fwd(q, k, v, q_ids, kv_ids)
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _ring_bwd(config, residuals, d_out):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  spec = _specs(config)
  bwd = compat.shard_map(
    functools.partial(_backward_shard, config),
    mesh=config.mesh,
    in_specs=(spec["qkv"],) * 3 + (spec["ids"],) * 2 + (spec["qkv"], spec["lse"], spec["qkv"]),
    out_specs=(spec["qkv"],) * 3,
  )
  dq, dk, dv = bwd(q, k, v, q_ids, kv_ids, out, lse, d_out)
  return dq, dk, dv, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---------------------------------------------------------------------------------------------
# Per-device code (inside shard_map): local shards, one ring step at a time
# ---------------------------------------------------------------------------------------------


def _rotate(config: _Config, *xs):
  """Sends each array to the next device of the ring (p -> p + 1)."""
  n = config.ring_size
  perm = [(p, (p + 1) % n) for p in range(n)]
  return tuple(None if x is None else lax.ppermute(x, config.axis_name, perm) for x in xs)


def _varying(config: _Config, x: jax.Array) -> jax.Array:
  """Marks a freshly created loop carry as varying over the mesh axes that shard q, k and v.

  shard_map's check_vma requires a loop carry to keep its type; a constant starts invariant and
  becomes varying once it absorbs sharded data.
  """
  return lax.pcast(x, config.sharded_axes, to="varying")


def _logits(config: _Config, q_BTKGH, k_BSKH):
  """fp32 logits [B, K, G, T, S] after scale and soft cap, and tanh(x / cap) for the backward."""
  x = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  return soft_cap(x * config.scale, config.logits_soft_cap)


def _pv(p_BKGTS, v_BSKV):
  """P @ V of a whole shard pair: [B, K, G, T, S] x [B, S, K, Hv] -> [B, K, G, T, Hv] fp32."""
  return jnp.einsum(
    "bkgts,bskv->bkgtv", p_BKGTS.astype(v_BSKV.dtype), v_BSKV, preferred_element_type=jnp.float32
  )


def _block_mask(config: _Config, q_block, kv_block, q_len, kv_len, q_ids, kv_ids):
  """bool [B|1, 1, 1, T, S] (True = keep) for query shard `q_block` vs kv shard `kv_block`."""
  keep = jnp.ones((1, 1, 1, q_len, kv_len), bool)
  if config.is_causal:
    q_pos = q_block * q_len + jnp.arange(q_len)
    kv_pos = kv_block * kv_len + jnp.arange(kv_len)
    keep = keep & (q_pos[:, None] >= kv_pos[None, :])[None, None, None]
  if config.has_segments:
    keep = keep & (q_ids[:, :, None] == kv_ids[:, None, :])[:, None, None]
  return keep


def _unless_hidden(config: _Config, q_block, kv_block, q_len, kv_len, update, carry):
  """`update(carry)`, skipped at run time when causal masking hides the whole kv shard."""
  if not config.is_causal:
    return update(carry)
  # Live iff the shard's first key position <= the query shard's last position.
  live = kv_block * kv_len <= q_block * q_len + q_len - 1
  return lax.cond(live, update, lambda c: c, carry)


def _forward_shard(config: _Config, q, k, v, q_ids, kv_ids):
  B, T, N, H = q.shape
  _, S, K, Hv = v.shape
  G = N // K
  n = config.ring_size
  me = lax.axis_index(config.axis_name)
  q_BTKGH = q.reshape(B, T, K, G, H)

  def fold_block(step, carry, k, v, kv_ids):
    """Online-softmax update with the kv shard held at `step` (skipped if entirely masked)."""
    kv_block = (me - step) % n

    def update(carry):
      s_BKGTS, _ = _logits(config, q_BTKGH, k)
      keep = _block_mask(config, me, kv_block, T, S, q_ids, kv_ids)
      return online_softmax_step(jnp.where(keep, s_BKGTS, -jnp.inf), v, *carry, dot=_pv)

    return _unless_hidden(config, me, kv_block, T, S, update, carry)

  # (m, l, acc): [B, K, G, T, 1] twice and [B, K, G, T, Hv], fp32.
  carry = tuple(_varying(config, x) for x in online_softmax_init((B, K, G, T), Hv))

  def ring_step(step, state):
    carry, k, v, kv_ids = state
    # Send the held shard onward before using it, so XLA may overlap transfer and compute.
    k_next, v_next, ids_next = _rotate(config, k, v, kv_ids)
    return fold_block(step, carry, k, v, kv_ids), k_next, v_next, ids_next

  carry, k, v, kv_ids = lax.fori_loop(0, n - 1, ring_step, (carry, k, v, kv_ids))
  # Key-less rows: out = 0 and lse = +inf, which makes exp(s - lse) = 0 in the backward pass.
  out_BKGTV, lse_BKGT1 = finalize(*fold_block(n - 1, carry, k, v, kv_ids))
  out = out_BKGTV.transpose(0, 3, 1, 2, 4).reshape(B, T, N, Hv).astype(q.dtype)
  return out, lse_BKGT1[..., 0]


def _backward_shard(config: _Config, q, k, v, q_ids, kv_ids, out, lse_BKGT, d_out):
  B, T, N, H = q.shape
  _, S, K, Hv = v.shape
  G = N // K
  n = config.ring_size
  me = lax.axis_index(config.axis_name)
  q_BTKGH = q.reshape(B, T, K, G, H)
  do_BTKGV = d_out.reshape(B, T, K, G, Hv)
  delta_BKGT1 = jnp.einsum(
    "btkgv,btkgv->bkgt", do_BTKGV, out.reshape(B, T, K, G, Hv), preferred_element_type=jnp.float32
  )[..., None]
  lse_BKGT1 = lse_BKGT[..., None]

  def block_grads(step, dq_BTKGH, k, v, kv_ids, dk_BSKH, dv_BSKV):
    """Adds the (query shard, held kv shard) block's gradients to dQ and the travelling dK/dV."""
    kv_block = (me - step) % n

    def update(grads):
      dq_BTKGH, dk_BSKH, dv_BSKV = grads
      s_BKGTS, tanh_BKGTS = _logits(config, q_BTKGH, k)
      keep = _block_mask(config, me, kv_block, T, S, q_ids, kv_ids)
      dp_BKGTS = jnp.einsum("btkgv,bskv->bkgts", do_BTKGV, v, preferred_element_type=jnp.float32)
      p_BKGTS, ds_BKGTS = probs_and_dlogits(
        jnp.where(keep, s_BKGTS, -jnp.inf), lse_BKGT1, dp_BKGTS, delta_BKGT1
      )
      dv_BSKV = dv_BSKV + jnp.einsum(
        "bkgts,btkgv->bskv",
        p_BKGTS.astype(d_out.dtype),
        do_BTKGV,
        preferred_element_type=jnp.float32,
      )
      ds_BKGTS = soft_cap_vjp(ds_BKGTS, tanh_BKGTS) * config.scale
      dq_BTKGH = dq_BTKGH + jnp.einsum(
        "bkgts,bskh->btkgh", ds_BKGTS.astype(k.dtype), k, preferred_element_type=jnp.float32
      )
      dk_BSKH = dk_BSKH + jnp.einsum(
        "bkgts,btkgh->bskh", ds_BKGTS.astype(q.dtype), q_BTKGH, preferred_element_type=jnp.float32
      )
      return dq_BTKGH, dk_BSKH, dv_BSKV

    return _unless_hidden(config, me, kv_block, T, S, update, (dq_BTKGH, dk_BSKH, dv_BSKV))

  dq = _varying(config, jnp.zeros((B, T, K, G, H), jnp.float32))
  dk = _varying(config, jnp.zeros((B, S, K, H), jnp.float32))
  dv = _varying(config, jnp.zeros((B, S, K, Hv), jnp.float32))

  def ring_step(step, state):
    dq, k, v, kv_ids, dk, dv = state
    k_next, v_next, ids_next = _rotate(config, k, v, kv_ids)
    dq, dk, dv = block_grads(step, dq, k, v, kv_ids, dk, dv)
    dk, dv = _rotate(config, dk, dv)  # the accumulators follow their shard
    return dq, k_next, v_next, ids_next, dk, dv

  dq, k, v, kv_ids, dk, dv = lax.fori_loop(0, n - 1, ring_step, (dq, k, v, kv_ids, dk, dv))
  dq, dk, dv = block_grads(n - 1, dq, k, v, kv_ids, dk, dv)
  dk, dv = _rotate(config, dk, dv)  # the last hop brings shard j's dK/dV home to device j
  return (dq.reshape(B, T, N, H).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
