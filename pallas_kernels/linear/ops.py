"""Public entry of the tiled linear-attention kernels: layout, padding and the custom VJP.

`linear_attention(q, k, v, *, log_decay, initial_state, block_sizes, interpret, platform)` computes
causal decayed linear attention (Lightning Attention-2, arXiv 2401.04658, Eq. 3 / Algorithm 1)
with a Pallas kernel and differentiates it with Algorithm 2's backward kernels:

  o_t = Σ_{s<=t} λ^{t-s} (q_t·k_s) v_s + λ^{t+1} q_t S₀,      S_T = λ^T S₀ + Σ_s λ^{T-1-s} k_sᵀ v_s

Shapes: q [B,T,N,H], k [B,T,K,H], v [B,T,K,V], log_decay [N] (log λ <= 0), S₀ [B,N,H,V].
Returns (out [B,T,N,V] in q.dtype, S_T [B,N,H,V] fp32). Gradients flow to q, k, v, log_decay and
S₀. The decay gradient uses the identity ∂L/∂cum_t = q_t·dq_t - k_t·dk_t for the cumulative
log-decay cum_t = s·(t+1) (plus T·<S_T, dS_T> from the final state), so it costs one reduction
after the backward kernel.

Choices where the paper is silent: T that is not a multiple of the block is zero-padded at the
end (exact, see blocks.py); dK/dV of grouped-query heads are produced per query head and summed
over each group here; feature maps are applied by the caller, outside the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.linear import kernel_gpu, kernel_tpu
from pallas_kernels.linear.reference import split_heads

_KERNELS = {"gpu": kernel_gpu, "tpu": kernel_tpu}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and GPU launch knobs.

  block: rows per tile (LA-2 uses a block ≈ H; a power of two >= 16 for Triton).
  block_v: GPU forward only: value columns per program (None = 64 if V is a larger multiple
    of 64, else all of V); 32-64 keeps the [H, block_v] fp32 state in registers for H = 128.
  num_warps, num_stages: Triton launch parameters (ignored on TPU).
  """

  block: int = 64
  block_v: int | None = None
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    if self.block < 8 or self.block % 8:
      raise ValueError(f"block={self.block} must be a positive multiple of 8 (e.g. 64)")
    if self.block_v is not None and (self.block_v < 8 or self.block_v % 8):
      raise ValueError(f"block_v={self.block_v} must be None or a positive multiple of 8")


@dataclasses.dataclass(frozen=True)
class _Config:
  seq_len: int
  block_sizes: BlockSizes
  interpret: bool
  platform: str

  def kernel_kwargs(self):
    bs = self.block_sizes
    return dict(
      block=bs.block,
      seq_len=self.seq_len,
      block_v=bs.block_v,
      interpret=self.interpret,
      num_warps=bs.num_warps,
      num_stages=bs.num_stages,
    )


def _kernel(config: _Config):
  return _KERNELS[config.platform]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q, k, v, log_decay, state0, config: _Config):
  return _kernel(config).forward(q, k, v, log_decay, state0, **config.kernel_kwargs())


def _core_fwd(q, k, v, log_decay, state0, config):
  out, state = _core(q, k, v, log_decay, state0, config)
  return (out, state), (q, k, v, log_decay, state0, state)


def _core_bwd(config, residuals, cotangents):
  q, k, v, log_decay, state0, state = residuals
  do, d_state = cotangents
  dq, dk_n, dv_n, d_state0 = _kernel(config).backward(
    q,
    k,
    v,
    do.astype(q.dtype),
    log_decay,
    state0,
    d_state.astype(jnp.float32),
    **config.kernel_kwargs(),
  )
  b, n, t, h = q.shape
  kh = k.shape[1]
  g = n // kh
  dk_bkgth = dk_n.reshape(b, kh, g, t, h)
  dv_bkgtv = dv_n.reshape(b, kh, g, t, v.shape[3])
  # ∂L/∂s_n = Σ_t (t+1)(q_t·dq_t - k_t·dk_t) + T <S_T, dS_T>; padded rows are zero.
  pos_t = jnp.arange(1, t + 1, dtype=jnp.float32)
  q_dq_bnt = jnp.einsum("bnth,bnth->bnt", q.astype(jnp.float32), dq)
  k_dk_bkgt = jnp.einsum("bkth,bkgth->bkgt", k.astype(jnp.float32), dk_bkgth)
  d_log_decay = jnp.einsum(
    "bnt,t->n", q_dq_bnt - k_dk_bkgt.reshape(b, n, t), pos_t
  ) + config.seq_len * jnp.einsum("bnhv,bnhv->n", state, d_state)
  return (
    dq.astype(q.dtype),
    dk_bkgth.sum(2).astype(k.dtype),
    dv_bkgtv.sum(2).astype(v.dtype),
    d_log_decay.astype(log_decay.dtype),
    d_state0.astype(state0.dtype),
  )


_core.defvjp(_core_fwd, _core_bwd)


def default_platform() -> str:
  """The kernel flavour for the current backend; CPU interprets the GPU-style kernel (faster)."""
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def linear_attention(
  q,
  k,
  v,
  *,
  log_decay=None,
  initial_state=None,
  block_sizes: BlockSizes = BlockSizes(),
  interpret: bool = False,
  platform: str | None = None,
):
  """Causal decayed linear attention with the tiled Pallas kernel (see module docstring).

  Args:
    q: [B,T,N,H] (already feature-mapped).  k: [B,T,K,H].  v: [B,T,K,V]; N % K == 0.
    log_decay: [N] log λ <= 0, or None for λ = 1.
    initial_state: [B,N,H,V] state carried in from a previous segment, or None for zeros.
    block_sizes: tile sizes.
    interpret: run the kernel in the Pallas interpreter (CPU tests).
    platform: "gpu" (Triton) or "tpu" (Mosaic) kernel; None picks from the default backend.

  Returns:
    (out [B,T,N,V] in q.dtype, final state [B,N,H,V] fp32).
  """
  platform = platform or default_platform()
  if platform not in _KERNELS:
    raise ValueError(f"platform={platform!r} must be one of {sorted(_KERNELS)}")
  b, t, n, h = q.shape
  split_heads(q, k)
  if k.shape[:2] != (b, t) or v.shape[:3] != k.shape[:3] or k.shape[3] != h:
    raise ValueError(
      f"shapes q={q.shape}, k={k.shape}, v={v.shape} do not match the layout "
      "q [B,T,N,H], k [B,T,K,H], v [B,T,K,V] (causal: S == T)"
    )
  vd = v.shape[3]
  log_decay = (
    jnp.zeros((n,), jnp.float32) if log_decay is None else jnp.asarray(log_decay, jnp.float32)
  )
  if log_decay.shape != (n,):
    raise ValueError(f"log_decay has shape {log_decay.shape}; expected ({n},)")
  state0 = (
    jnp.zeros((b, n, h, vd), jnp.float32)
    if initial_state is None
    else initial_state.astype(jnp.float32)
  )
  if state0.shape != (b, n, h, vd):
    raise ValueError(f"initial_state has shape {state0.shape}; expected {(b, n, h, vd)}")
  block = block_sizes.block
  if platform == "gpu" and not interpret:
    dims = dict(block=block, H=h, block_v=block_sizes.block_v or vd)
    bad = {name: d for name, d in dims.items() if d < 16 or d & (d - 1)}
    if bad:
      raise ValueError(
        f"the Triton kernel needs powers of two >= 16 for {bad}; pick another "
        "block_sizes, or pad the head dims"
      )
  pad = -t % block

  def to_kernel(x):
    return jnp.moveaxis(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))), 1, 2)

  config = _Config(seq_len=t, block_sizes=block_sizes, interpret=bool(interpret), platform=platform)
  out, state = _core(to_kernel(q), to_kernel(k), to_kernel(v), log_decay, state0, config)
  return jnp.moveaxis(out, 2, 1)[:, :t], state
