"""Linear attention with a per-head scalar decay: Lightning Attention-1/2, TransNormerLLM, 1+elu.

Papers: "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large
Language Models" (Qin et al., arXiv 2401.04658), Eq. 3 and Algorithms 1-2; "Various Lengths,
Constant Speed: Efficient Language Modeling with Lightning Attention" (arXiv 2405.17381);
"Transformers are RNNs" (Katharopoulos et al., arXiv 2006.16236) for the elu+1 feature map.

Causal, with φ the feature map and λ_n = exp(decay_n) <= 1 per query head:

  S_t = λ S_{t-1} + φ(k_t)ᵀ v_t,    o_t = φ(q_t) S_t,    S_{-1} = initial_state   (fp32 [B,N,H,V])
      ⇔ o_t = Σ_{s<=t} λ^{t-s} (φ(q_t)·φ(k_s)) v_s + λ^{t+1} φ(q_t) S_{-1}

Non-causal (decay must be None): o_t = φ(q_t) (S_{-1} + Σ_s φ(k_s)ᵀ v_s), and T may differ from S.

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> out [B,T,N,Hv]; N % K == 0 (query head n reads
kv head n // G), kv heads are never repeated in memory.

Implementations (`implementation=`; None = "pallas" on GPU/TPU, "chunked" on CPU):
  "xla"        the quadratic masked form O = ((φ(Q)φ(K)ᵀ) ⊙ D) V, D[t,s] = λ^{t-s}[t>=s]: readable,
               O(T²) memory (pallas_kernels/linear/reference.py);
  "recurrent"  the token recurrence above with `lax.scan` (the decoding form; slow for training);
  "chunked"    Algorithm 1 as a `lax.scan` over blocks of `block_size` rows: quadratic inside a
               block, the fp32 state across blocks; decays in log space, λ^{-n} never formed.
               Each step runs the kernels' per-block functions (pallas_kernels/linear/tiles.py),
               so Algorithm 1 is written once; gradients by autodiff through the scan;
  "pallas"     the tiled kernel with Algorithm 2's backward (pallas_kernels/linear). Off GPU/TPU
               it runs in the Pallas interpreter (the kernel package's `interpret=None` policy,
               logged once per call site).

Differences from the papers:
  * The decay is given in log space (`decay = log λ <= 0`, shape [N]); `tnl.tnl_slopes` builds
    the schedule of the official TNL code. Gradients flow to it (the papers keep it fixed).
  * Lightning/TNL use the identity feature map on already-activated q, k (TNL applies SiLU in the
    projection; `feature_map="silu"` does the same here). Katharopoulos et al. divide by
    φ(q_t)·Σφ(k_s); this family returns the unnormalised numerator, as Lightning does (TNL puts
    `tnl.norm_attention_output` after it). For the normalised form append a ones column to v and
    divide by the last output column.
  * `scale` multiplies q (default 1, not 1/sqrt(H): there is no softmax temperature).
  * Eq. 9 of LA-2 prints Λ = diag(λ⁰..λ^{B-1}); Algorithm 1 (followed here) uses diag(λ¹..λ^B).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jaxtyping import Array, Float

from attnzoo.attention import _validate, registry
from attnzoo.attention.linear import tnl
from pallas_kernels import linear as linear_kernels
from pallas_kernels.linear import tiles as linear_tiles
from pallas_kernels.linear.reference import (
  linear_attention_recurrent,
  linear_attention_reference,
  split_heads,
)

FAMILY_NAME = "linear"


# ---------------------------------------------------------------------------------------------
# Feature maps
# ---------------------------------------------------------------------------------------------


def elu1(x):
  """elu(x) + 1 written without expm1 (which has no Pallas-TPU lowering)."""
  return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))


FEATURE_MAPS: dict[str, Callable[[Array], Array]] = {
  "identity": lambda x: x,
  "elu1": elu1,
  "silu": jax.nn.silu,
}


def _feature_map(feature_map) -> Callable[[Array], Array]:
  if feature_map is None:
    return FEATURE_MAPS["identity"]
  if callable(feature_map):
    return feature_map
  if feature_map not in FEATURE_MAPS:
    raise ValueError(
      f"feature_map={feature_map!r} is not one of {sorted(FEATURE_MAPS)}, None or a callable"
    )
  return FEATURE_MAPS[feature_map]


def _apply_feature_map(phi, x):
  return phi(x.astype(jnp.float32)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Implementations: (q, k, v, log_decay | None, state0 | None, block_size) -> (out, state)
# ---------------------------------------------------------------------------------------------


def _chunked(q, k, v, log_decay, state0, block_size):
  """Algorithm 1 of LA-2 as a `lax.scan` over blocks. Each step is the kernels' own per-block
  math (`pallas_kernels.linear.tiles`: `decay_factors`, `forward_block`), vmapped over batch,
  kv heads and the query heads of each group (k, v are shared across a group, not repeated).
  Blocks are laid out head-major before the scan, so every product in a step is a batched
  matmul with no transpose. A ragged tail block is zero-padded; its clamped positions keep the
  final state exact."""
  b, t, n, h = q.shape
  kh, vd = k.shape[2], v.shape[3]
  g = n // kh
  c = block_size
  nc = -(-t // c)

  def blocks_of(x, *heads):  # [B, T, heads..., D] -> [nc, B, heads..., c, D] fp32
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nc * c - t), (0, 0), (0, 0)))
    return jnp.moveaxis(x.reshape(b, nc, c, *heads, x.shape[-1]), (1, 2), (0, -2))

  q_nbkgch = blocks_of(q, kh, g)
  k_nbkch, v_nbkcv = blocks_of(k, kh), blocks_of(v, kh)
  s_kg = (
    jnp.zeros((kh, g), jnp.float32)
    if log_decay is None
    else log_decay.astype(jnp.float32).reshape(kh, g)
  )
  state_bkghv = (
    jnp.zeros((b, kh, g, h, vd), jnp.float32)
    if state0 is None
    else state0.astype(jnp.float32).reshape(b, kh, g, h, vd)
  )
  # factors(s [K, G], block index) -> per-head (q_decay, k_decay, M, λ^{n_i}); the block step
  # maps over (g: q, state, factors), then (k: all), then (b: all but the factors).
  factors = functools.partial(linear_tiles.decay_factors, block=c, seq_len=t)
  factors = jax.vmap(jax.vmap(factors, in_axes=(0, None)), in_axes=(0, None))
  forward = jax.vmap(linear_tiles.forward_block, in_axes=(0, None, None, 0, 0))
  forward = jax.vmap(jax.vmap(forward), in_axes=(0, 0, 0, 0, None))

  def step(state_bkghv, xs):
    q_bkgch, k_bkch, v_bkcv, i = xs
    out_bkgcv, state_bkghv = forward(q_bkgch, k_bkch, v_bkcv, state_bkghv, factors(s_kg, i))
    return state_bkghv, out_bkgcv

  final, out_nbkgcv = lax.scan(step, state_bkghv, (q_nbkgch, k_nbkch, v_nbkcv, jnp.arange(nc)))
  out = jnp.moveaxis(out_nbkgcv, (0, -2), (1, 2)).reshape(b, nc * c, n, vd)[:, :t]
  return out.astype(q.dtype), final.reshape(b, n, h, vd)


def _xla(q, k, v, log_decay, state0, block_size):
  del block_size
  return linear_attention_reference(q, k, v, log_decay, state0)


def _recurrent(q, k, v, log_decay, state0, block_size):
  del block_size
  return linear_attention_recurrent(q, k, v, log_decay, state0)


def _pallas(q, k, v, log_decay, state0, block_size):
  # interpret=None: the kernel package runs its interpreter (and logs it) off GPU/TPU.
  return linear_kernels.linear_attention(
    q,
    k,
    v,
    log_decay=log_decay,
    initial_state=state0,
    block_sizes=linear_kernels.BlockSizes(block_size),
  )


_CAUSAL = {"pallas": _pallas, "chunked": _chunked, "xla": _xla, "recurrent": _recurrent}


def _non_causal(q, k, v, state0, implementation):
  """Right product φ(Q)(S₀ + φ(K)ᵀV); "xla" keeps the quadratic left product as the reference."""
  if implementation == "xla":
    return linear_attention_reference(q, k, v, None, state0, causal=False)
  if implementation == "pallas":
    logging.info("linear: no Pallas kernel for is_causal=False (two matmuls); using XLA einsums")
  b, t, n, h = q.shape
  g = split_heads(q, k)
  kh, vd = n // g, v.shape[3]
  kv_bkhv = jnp.einsum("bskh,bskv->bkhv", k.astype(jnp.float32), v.astype(jnp.float32))
  state = jnp.broadcast_to(kv_bkhv[:, :, None], (b, kh, g, h, vd))
  if state0 is not None:
    state = state + state0.astype(jnp.float32).reshape(b, kh, g, h, vd)
  out = jnp.einsum("btkgh,bkghv->btkgv", q.astype(jnp.float32).reshape(b, t, kh, g, h), state)
  return out.reshape(b, t, n, vd).astype(q.dtype), state.reshape(b, n, h, vd)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_decay(decay, num_heads):
  if decay is None:
    return None
  if isinstance(decay, str):
    raise ValueError(
      f"decay={decay!r} names a per-layer schedule, which a model resolves from the layer's "
      f"depth ({sorted(DECAY_SCHEDULES)}); called directly, pass the log-decays, e.g. "
      "tnl.tnl_slopes(N, layer, num_layers)"
    )
  decay = jnp.asarray(decay)
  if decay.shape != (num_heads,):
    raise ValueError(
      f"decay has shape {decay.shape}; expected ({num_heads},): one log-decay "
      "log(λ) <= 0 per query head (see tnl.tnl_slopes)"
    )
  try:  # concrete values are checked; traced ones (a learned decay under jit) cannot be
    values = np.asarray(decay, np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    values = None
  if values is not None:
    if not np.all(np.isfinite(values)) or np.any(values > 0):
      raise ValueError(
        f"decay={values} must be finite and <= 0 (it is log λ with 0 < λ <= 1; "
        "for λ -> 0 use a large negative value such as -30)"
      )
  return decay.astype(jnp.float32)


_SOFTMAX_ONLY = ("mask", "bias", "segment_ids", "logits_soft_cap")


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  *,
  mask=None,
  bias=None,
  is_causal: bool = True,
  scale: float | None = None,
  segment_ids=None,
  logits_soft_cap=None,
  decay: Float[Array, " N"] | Sequence[float] | str | None = None,
  feature_map: str | Callable[[Array], Array] | None = None,
  block_size: int = 64,
  initial_state: Float[Array, "B N H Hv"] | None = None,
  return_final_state: bool = False,
  implementation: str | None = None,
):
  """Decayed linear attention (see the module docstring for the equations and paper).

  Args:
    q, k, v: [B,T,N,H], [B,S,K,H], [B,S,K,Hv]; causal needs S == T.
    mask, bias, segment_ids, logits_soft_cap: softmax-only options; passing one raises TypeError.
    is_causal: causal recurrence (default) or the non-causal right product.
    scale: multiplies q; None means 1.
    decay: [N] per-head log λ <= 0, or None for λ = 1 (no decay). In a model config it
      may also name a per-layer schedule ("tnl": `tnl.tnl_slopes(N, layer, num_layers)`),
      resolved by `FAMILY.layer_knobs` when the layer is built.
    feature_map: None/"identity" (Lightning, TNL with pre-activated q, k), "elu1"
      (Katharopoulos), "silu", or a callable applied elementwise to q and k.
    block_size: rows per tile of the "chunked" and "pallas" implementations.
    initial_state: [B,N,H,Hv] state carried in from an earlier segment (fp32), or None.
    return_final_state: also return the fp32 state [B,N,H,Hv] after the last token.
    implementation: "pallas", "chunked", "xla", "recurrent", or None (best for the platform).

  Returns:
    out [B,T,N,Hv] in q.dtype, or (out, final_state) when `return_final_state`.
  """
  passed = {
    name: val
    for name, val in zip(_SOFTMAX_ONLY, (mask, bias, segment_ids, logits_soft_cap), strict=True)
    if val is not None
  }
  if passed:
    raise TypeError(
      f"linear attention does not take {sorted(passed)}: it has no logits to mask "
      "or bias. Use is_causal=True/False, or a softmax family for masked attention"
    )
  b, t, s, n, _, h, vd = _validate.check_qkv(q, k, v)
  if block_size <= 0 or block_size % 8:
    raise ValueError(f"block_size={block_size} must be a positive multiple of 8 (e.g. 64)")
  if initial_state is not None and initial_state.shape != (b, n, h, vd):
    raise ValueError(
      f"initial_state has shape {initial_state.shape}; expected {(b, n, h, vd)} = [B,N,H,Hv]"
    )
  log_decay = _check_decay(decay, n)
  name = registry.resolve_implementation(implementation, _CAUSAL, family=FAMILY_NAME)
  phi = _feature_map(feature_map)
  q, k = _apply_feature_map(phi, q), _apply_feature_map(phi, k)
  if scale is not None:
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  if is_causal:
    if s != t:
      raise ValueError(f"causal linear attention needs S == T, got T={t}, S={s}")
    out, state = _CAUSAL[name](q, k, v, log_decay, initial_state, block_size)
  else:
    if log_decay is not None:
      raise ValueError(
        "decay is only defined for causal linear attention; pass decay=None with is_causal=False"
      )
    out, state = _non_causal(q, k, v, initial_state, name)
  return (out, state) if return_final_state else out


def init_state(batch: int, num_heads: int, head_dim: int, value_dim: int):
  """The zero fp32 state [B,N,H,Hv] that starts a decode."""
  return jnp.zeros((batch, num_heads, head_dim, value_dim), jnp.float32)


def decode_step(
  state: Float[Array, "B N H Hv"],
  q_t: Float[Array, "B N H"],
  k_t: Float[Array, "B K H"],
  v_t: Float[Array, "B K Hv"],
  *,
  decay: Float[Array, " N"] | Sequence[float] | str | None = None,
  feature_map: str | Callable[[Array], Array] | None = None,
  scale: float | None = None,
) -> tuple[Float[Array, "B N Hv"], Float[Array, "B N H Hv"]]:
  """One causal token: S ← λ S + φ(k_t)ᵀ v_t, o_t = φ(q_t) S. Returns (o_t in q_t.dtype, S fp32).

  Equal to `attention(..., is_causal=True)` run token by token with the state carried.
  """
  b, n, h = q_t.shape
  kh, vd = k_t.shape[1], v_t.shape[2]
  _validate.check_heads(n, kh)
  if state.shape != (b, n, h, vd):
    raise ValueError(f"state has shape {state.shape}; expected {(b, n, h, vd)} = [B,N,H,Hv]")
  g = n // kh
  log_decay = _check_decay(decay, n)
  phi = _feature_map(feature_map)
  q32, k32 = phi(q_t.astype(jnp.float32)), phi(k_t.astype(jnp.float32))
  if scale is not None:
    q32 = q32 * scale
  kv_bkhv = jnp.einsum("bkh,bkv->bkhv", k32, v_t.astype(jnp.float32))
  state_bkghv = state.astype(jnp.float32).reshape(b, kh, g, h, vd)
  if log_decay is not None:
    state_bkghv = jnp.exp(log_decay).reshape(1, kh, g, 1, 1) * state_bkghv
  state_bkghv = state_bkghv + kv_bkhv[:, :, None]
  out = jnp.einsum("bkgh,bkghv->bkgv", q32.reshape(b, kh, g, h), state_bkghv)
  return out.reshape(b, n, vd).astype(q_t.dtype), state_bkghv.reshape(b, n, h, vd)


# Per-layer decay schedules a config may name instead of an array: (num_heads, layer,
# num_layers) -> log λ [N].
DECAY_SCHEDULES = {"tnl": tnl.tnl_slopes}


def layer_knobs(knobs, *, layer: int, num_layers: int, num_heads: int):
  """Resolves `decay="<schedule>"` into this layer's log-decays (a tuple: static, hashable)."""
  decay = knobs.get("decay")
  if not isinstance(decay, str):
    return dict(knobs)
  if decay not in DECAY_SCHEDULES:
    raise ValueError(f"decay={decay!r} is not one of the schedules {sorted(DECAY_SCHEDULES)}")
  with jax.ensure_compile_time_eval():  # models are often built under jit
    values = DECAY_SCHEDULES[decay](num_heads, layer, num_layers)
  return {**knobs, "decay": tuple(float(x) for x in np.asarray(values))}


FAMILY = registry.Family(
  name=FAMILY_NAME,
  attention=attention,
  implementations=tuple(_CAUSAL),
  paper="Lightning Attention-2 (arXiv 2401.04658)",
  supports_mask=False,
  decode_step=decode_step,
  layer_knobs=layer_knobs,
  conformance=registry.Conformance(
    cases={
      # Per-head decays from λ = 0.99 (long memory) to 0.05 (almost local); a decayed
      # recurrence is only defined causally. No softmax normalisation: small q·k.
      "decay": registry.ConformanceCase(
        options=lambda d: dict(decay=jnp.log(jnp.linspace(0.99, 0.05, d.N, dtype=jnp.float32))),
        causal_only=True,
        input_scale=0.3,
      ),
      "elu1": registry.ConformanceCase(options=dict(feature_map="elu1", scale=0.25)),
    },
    # Blocks smaller than the suite's lengths, so block carries and ragged tails are exercised.
    implementation_options={"chunked": {"block_size": 16}, "pallas": {"block_size": 16}},
  ),
)
