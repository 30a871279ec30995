"""Public entry of the tiled linear-attention kernels: layout, padding and the custom VJP.

`linear_attention(q, k, v, *, log_decay, initial_state, block_sizes, interpret, backend)` computes
causal decayed linear attention (Lightning Attention-2, arXiv 2401.04658, Eq. 3 / Algorithm 1)
with a Pallas kernel and differentiates it with Algorithm 2's backward kernels:

  o_t = Σ_{s<=t} λ^{t-s} (q_t·k_s) v_s + λ^{t+1} q_t S₀,      S_T = λ^T S₀ + Σ_s λ^{T-1-s} k_sᵀ v_s

Shapes: q [B,T,N,H], k [B,T,K,H], v [B,T,K,V], log_decay [N] (log λ <= 0), S₀ [B,N,H,V].
Returns (out [B,T,N,V] in q.dtype, S_T [B,N,H,V] fp32). Gradients flow to q, k, v, log_decay and
S₀. The decay gradient uses the identity ∂L/∂cum_t = q_t·dq_t - k_t·dk_t for the cumulative
log-decay cum_t = s·(t+1) (plus T·<S_T, dS_T> from the final state), so it costs one reduction
after the backward kernel.

Choices where the paper is silent: T that is not a multiple of the block is zero-padded at the
end (exact, see tiles.py); dK/dV of grouped-query heads are produced per query head and summed
over each group here; feature maps are applied by the caller, outside the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels import _common
from pallas_kernels.linear import kernel_gpu, kernel_tpu
from pallas_kernels.linear.config import BlockSizes, KernelConfig

_KERNELS = {"gpu": kernel_gpu, "tpu": kernel_tpu}


def _kernel(config: KernelConfig):
  return _KERNELS[config.backend]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q, k, v, log_decay, state0, config: KernelConfig):
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


def linear_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B T K H"],
  v: Float[Array, "B T K Hv"],
  *,
  log_decay: Float[Array, " N"] | None = None,
  initial_state: Float[Array, "B N H Hv"] | None = None,
  block_sizes: BlockSizes | None = None,
  interpret: bool | None = None,
  backend: str | None = None,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B N H Hv"]]:
  """Causal decayed linear attention with the tiled Pallas kernel (see module docstring).

  Args:
    q: [B,T,N,H] (already feature-mapped).  k: [B,T,K,H].  v: [B,T,K,V]; N % K == 0.
    log_decay: [N] log λ <= 0, or None for λ = 1.
    initial_state: [B,N,H,V] state carried in from a previous segment, or None for zeros.
    block_sizes: tile sizes; default `BlockSizes()`.
    interpret: run the kernel in the Pallas interpreter. None (default): exactly when
      `jax.default_backend()` is neither "gpu" nor "tpu", with a logged warning (once per
      call site); False there raises unless `backend` is given (lowering-only use).
    backend: "gpu" (Triton) or "tpu" (Mosaic) kernel; None picks from `jax.default_backend()`
      ("gpu" on CPU).

  Returns:
    (out [B,T,N,V] in q.dtype, final state [B,N,H,V] fp32).
  """
  b, t, s, n, _, h, vd = _common.check_qkv(q, k, v)
  if s != t:
    raise ValueError(f"causal linear attention needs S == T, got T={t}, S={s}")
  interpret = _common.resolve_interpret(interpret, op="linear_attention", backend=backend)
  backend = _common.resolve_backend(backend)
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
  block_sizes = BlockSizes() if block_sizes is None else block_sizes
  block = block_sizes.block
  if backend == "gpu" and not interpret:
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

  config = KernelConfig(seq_len=t, block_sizes=block_sizes, interpret=interpret, backend=backend)
  out, state = _core(to_kernel(q), to_kernel(k), to_kernel(v), log_decay, state0, config)
  return jnp.moveaxis(out, 2, 1)[:, :t], state


__all__ = ["linear_attention"]
