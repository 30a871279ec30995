"""Readable fp32 oracles for decayed linear attention: the spec of the `linear` kernels.

Lightning Attention-2 (Qin et al., arXiv 2401.04658), Eq. 3 with a per-head scalar decay λ:

  kv_t = λ kv_{t-1} + k_tᵀ v_t,   o_t = q_t kv_t,   kv_{-1} = initial_state

so that o_t = Σ_{s<=t} λ^{t-s} (q_t·k_s) v_s + λ^{t+1} q_t kv_{-1}, and the final state is
kv_{T-1} = λ^T kv_{-1} + Σ_s λ^{T-1-s} k_sᵀ v_s.  Decays are given as `log_decay = log λ <= 0`
(shape [N]); `None` means λ = 1.

Two oracles that must agree with each other and with every fast path:
  * `linear_attention_reference`: the quadratic masked form O = ((Q Kᵀ) ⊙ D) V, D[t,s] =
    λ^{t-s}[t>=s] (the form of the official repo's torch reference), O(T²) memory;
  * `linear_attention_recurrent`: the token-by-token recurrence above (`lax.scan`), O(1) memory.

Layout: q [B,T,N,H], k [B,S,K,H], v [B,S,K,V], state [B,N,H,V] (fp32). Grouped-query heads
(N = K·G, query head n reads kv head n // G) are handled by reshaping q to [B,T,K,G,H]; kv heads
are never repeated. Feature maps are the caller's business: these functions see φ(q), φ(k).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def split_heads(q, k):
  """Returns G = N // K after checking the grouped-query layout."""
  n, kh = q.shape[2], k.shape[2]
  if n % kh:
    raise ValueError(f"N={n} query heads is not divisible by K={kh} kv heads; use N = K * G")
  return n // kh


def _log_decay_kg(log_decay, num_heads: int, groups: int):
  if log_decay is None:
    return jnp.zeros((num_heads // groups, groups), jnp.float32)
  log_decay = jnp.asarray(log_decay, jnp.float32)
  if log_decay.shape != (num_heads,):
    raise ValueError(
      f"log_decay has shape {log_decay.shape}; expected ({num_heads},), one per query head"
    )
  return log_decay.reshape(num_heads // groups, groups)


def _zero_state(q, v):
  return jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)


def linear_attention_reference(q, k, v, log_decay=None, initial_state=None, *, causal=True):
  """Quadratic masked form. Returns (out [B,T,N,V] in q.dtype, final state [B,N,H,V] fp32).

  Non-causal (`causal=False`, no decay): o_t = q_t (kv_{-1} + Σ_s k_sᵀ v_s), T and S may differ.
  """
  b, t, n, h = q.shape
  g = split_heads(q, k)
  kh = n // g
  s_len = k.shape[1]
  state = _zero_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)
  state_bkghv = state.reshape(b, kh, g, h, v.shape[3])
  q_btkgh = q.astype(jnp.float32).reshape(b, t, kh, g, h)
  k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
  scores_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k32)
  if causal:
    if t != s_len:
      raise ValueError(f"causal linear attention needs T == S, got T={t}, S={s_len}")
    s_kg = _log_decay_kg(log_decay, n, g)
    pos = jnp.arange(t, dtype=jnp.float32)
    diff_ts = pos[:, None] - pos[None, :]
    keep_ts = diff_ts >= 0
    # Clamp before exp: the masked upper triangle would otherwise overflow for strong decay.
    decay_kgts = jnp.where(
      keep_ts[None, None], jnp.exp(s_kg[..., None, None] * jnp.maximum(diff_ts, 0)[None, None]), 0.0
    )
    out = jnp.einsum("bkgts,bskv->btkgv", scores_bkgts * decay_kgts[None], v32)
    q_decay_kgt = jnp.exp(s_kg[..., None] * (pos + 1)[None, None])
    out += jnp.einsum("btkgh,kgt,bkghv->btkgv", q_btkgh, q_decay_kgt, state_bkghv)
    k_decay_kgs = jnp.exp(s_kg[..., None] * (t - 1 - pos)[None, None])
    final = jnp.exp(s_kg * t)[None, ..., None, None] * state_bkghv + jnp.einsum(
      "bskh,kgs,bskv->bkghv", k32, k_decay_kgs, v32
    )
  else:
    if log_decay is not None:
      raise ValueError(
        "decay is only defined for causal linear attention; pass decay=None with is_causal=False"
      )
    out = jnp.einsum("bkgts,bskv->btkgv", scores_bkgts, v32)
    out += jnp.einsum("btkgh,bkghv->btkgv", q_btkgh, state_bkghv)
    final = state_bkghv + jnp.einsum("bskh,bskv->bkhv", k32, v32)[:, :, None]
  return (out.reshape(b, t, n, v.shape[3]).astype(q.dtype), final.reshape(b, n, h, v.shape[3]))


def linear_attention_recurrent(q, k, v, log_decay=None, initial_state=None):
  """Token-by-token recurrence kv_t = λ kv_{t-1} + k_tᵀ v_t, o_t = q_t kv_t (causal only).

  Returns (out [B,T,N,V] in q.dtype, final state [B,N,H,V] fp32).
  """
  b, t, n, h = q.shape
  g = split_heads(q, k)
  kh = n // g
  vd = v.shape[3]
  if k.shape[1] != t:
    raise ValueError(f"causal linear attention needs T == S, got T={t}, S={k.shape[1]}")
  lam_kg = jnp.exp(_log_decay_kg(log_decay, n, g))
  state = _zero_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)

  def step(state_bkghv, xs):
    q_bkgh, k_bkh, v_bkv = xs
    state_bkghv = (
      lam_kg[None, :, :, None, None] * state_bkghv
      + jnp.einsum("bkh,bkv->bkhv", k_bkh, v_bkv)[:, :, None]
    )
    return state_bkghv, jnp.einsum("bkgh,bkghv->bkgv", q_bkgh, state_bkghv)

  xs = (
    jnp.moveaxis(q.astype(jnp.float32).reshape(b, t, kh, g, h), 1, 0),
    jnp.moveaxis(k.astype(jnp.float32), 1, 0),
    jnp.moveaxis(v.astype(jnp.float32), 1, 0),
  )
  final, out_tbkgv = lax.scan(step, state.reshape(b, kh, g, h, vd), xs)
  out = jnp.moveaxis(out_tbkgv, 0, 1).reshape(b, t, n, vd)
  return out.astype(q.dtype), final.reshape(b, n, h, vd)


__all__ = ["linear_attention_recurrent", "linear_attention_reference", "split_heads"]
