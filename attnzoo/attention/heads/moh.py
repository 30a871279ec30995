"""MoH: Mixture-of-Head attention — per-token gates on shared and top-K routed heads.

"MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin, Zhu, Yuan, Yan; arXiv
2410.11842, ICML 2025), §3.2 (Eq. 4-6: shared heads, two-stage routing) and the official code
`SkyworkAI/MoH` (`MoH-ViT/attention.py`, `MoH-DiT/models.py`, `MoH-LLaMA3/.../modeling_llama.py`).

Multi-head attention is a sum over heads, `MHA(x_t) = Σ_i H_i W_O^i`; MoH weighs each head's
output by a per-token gate, `MoH(x_t) = Σ_i g_i(x_t) H_i W_O^i`. Heads 1..h_s are *shared*
(always on), heads h_s+1..h are *routed* (the top K of h_r = h - h_s per token):

    p = softmax(W_r x_t)              [h_r]    routed-head probabilities
    m = onehot(topK(p))               [h_r]    the K selected routed heads
    [α1, α2] = softmax(W_h x_t)                two-stage routing: shared vs routed
    gates="paper" (Eq. 5):  g_s = α1 softmax(W_s x_t),      g_r = α2 (p ⊙ m)
    gates="code" (official code, the default):
                            g_s = 2α1 · h_s softmax(W_s x_t),  g_r = 2α2 · K (p ⊙ m) / Σ(p ⊙ m)
    out_{t,i} = g_i(x_t) · softmax(q_i kᵀ / √H) v          (per head; the layer's W_O follows)

The code convention scales every softmax by its count, so zero router weights with K = h_r give
every gate exactly 1 (plain MHA); under the paper's normalisation the gates sum to ≤ 1. With
α1 = α2 = ½ the code gates sum to h_s + K.

Load balance (aux loss "moh_balance", code units; default weight β = 0.01 as the paper):
    L_b = h_r · Σ_i f_i P_i,  f_i = fraction of valid tokens selecting routed head i,
                              P_i = mean over valid tokens of p_i
(the code's `mean(P ⊙ f) · h_r²`); it is K at perfectly uniform routing, h_r at collapse.

router="qnorm" is MoH-LLaMA3's parameter-free router (continue-tuning a pretrained model):
logits_i = ‖q_i‖₂ of routed head i divided by their (unbiased) std over the routed heads,
p = softmax, top-K, and *hard* gates: 1 on every shared head and on the K selected routed
heads, 0 elsewhere. The learned router arrays are still declared (the registry creates them
from shapes alone) but unused; its balance value is reported with no gradient (the code
returns no balance loss).

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv] (gated per-head outputs);
x [B,T,D] (the layer input the router reads), valid bool [B,T]; learned w_router [D,N],
w_mix [D,2]. GQA as `dot_product_attention` (gates are per *query* head).

Differences from the paper:
- The router is one array `w_router` [D,N]: columns [:h_s] are W_s, [h_s:] are W_r. The same
  D·N weights as the paper's separate W_s [D,h_s] and W_r [D,h_r]; one array because a
  registered array's shape depends on the layer's sizes only, not on the `num_shared` knob.
- Like the official code, every head is computed and unselected ones are multiplied by zero:
  no FLOPs are saved (a per-token head gather needs dynamic shapes).
- The trainer *sums* weighted aux losses over layers; the code averages l_aux over layers before
  ×0.01. To match it exactly set `aux_weights.moh_balance = 0.01 / num_layers`.

Choices where the paper is silent:
- Router init: normal(std 0.02), as MoH-ViT (TransNeXt's `trunc_normal_(std=.02)` on every
  Linear): the router starts near uniform (code gates ≈ 1, i.e. near MHA) yet random, so top-K
  ties are broken per token instead of always selecting the first heads (zero init would give
  unselected heads no task gradient).
- Defaults from N: num_shared = N // 2 and top_k = max(1, (N - num_shared) // 2), MoH-LLaMA3's
  50 % shared + 25 % routed-active = 75 % heads (valid for any N ≥ 1; N = 1 has no shared head).
- num_shared = 0 (the ablation without shared heads): g = g_r with no α, as the code.
- Statistics f, P over valid tokens of the whole batch (the code flattens B·T), so padding
  never counts; gates are still computed at padding tokens (their outputs are discarded anyway).
- Router logits, softmaxes and gates are fp32; out is cast back to q's dtype after gating.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from pallas_kernels.block_sparse import BlockSizes

GATES = ("code", "paper")
ROUTERS = ("linear", "qnorm")
BALANCE_WEIGHT = 0.01  # β of the paper's LLM table and MoH-DiT's --moh-loss-coeff
_EPS = float(jnp.finfo(jnp.float32).eps)  # the code's clamp of the top-K renormaliser


def resolve_heads(num_heads: int, num_shared: int | None, top_k: int | None) -> tuple[int, int]:
  """(num_shared, top_k) with the defaults filled in from N; ValueError when out of range."""
  if num_shared is None:
    num_shared = num_heads // 2
  if not 0 <= num_shared < num_heads:
    raise ValueError(
      f"num_shared={num_shared} must be in [0, N-1] = [0, {num_heads - 1}] for N={num_heads} "
      "query heads (at least one head must be routed); lower num_shared"
    )
  routed = num_heads - num_shared
  if top_k is None:
    top_k = max(1, routed // 2)
  if not 1 <= top_k <= routed:
    raise ValueError(
      f"top_k={top_k} must be in [1, h_r] = [1, {routed}]: it counts the active routed heads "
      f"among the h_r = N - num_shared = {num_heads} - {num_shared} routed ones"
    )
  return num_shared, top_k


def _top_k_mask(logits: Float[Array, "B T R"], top_k: int) -> Float[Array, "B T R"]:
  """1.0 on the top_k largest entries of each row (exactly top_k, ties by lower index)."""
  _, idx_BTk = jax.lax.top_k(jax.lax.stop_gradient(logits), top_k)
  return jnp.sum(jax.nn.one_hot(idx_BTk, logits.shape[-1], dtype=jnp.float32), axis=-2)


def head_gates(
  q: Float[Array, "B T N H"],
  x: Float[Array, "B T D"],
  w_router: Float[Array, "D N"],
  w_mix: Float[Array, "D 2"],
  *,
  num_shared: int,
  top_k: int,
  gates: str = "code",
  router: str = "linear",
  two_stage: bool = True,
) -> tuple[Float[Array, "B T N"], Float[Array, "B T R"], Float[Array, "B T R"], Array | None]:
  """The per-token head gates (fp32) and the routing quantities the balance loss reads.

  Returns (gates_BTN, p_BTR routed-head probabilities, mask_BTR selected routed heads,
  alpha_BT2 two-stage mix weights or None when there is none).
  """
  B, T, N, _ = q.shape
  h_s = num_shared
  if router == "qnorm":
    # ‖q_i‖ is invariant to the layer's RoPE (a rotation), so post-RoPE q routes as the code's
    # pre-RoPE q. Hard gates: nothing to differentiate.
    norms_BTR = jnp.linalg.norm(jax.lax.stop_gradient(q[:, :, h_s:]).astype(jnp.float32), axis=-1)
    std_BT1 = (
      jnp.std(norms_BTR, axis=-1, ddof=1, keepdims=True)
      if N - h_s > 1
      else jnp.ones((B, T, 1), jnp.float32)
    )
    p_BTR = jax.nn.softmax(norms_BTR / jnp.maximum(std_BT1, _EPS), axis=-1)
    mask_BTR = _top_k_mask(norms_BTR, top_k)
    return jnp.concatenate([jnp.ones((B, T, h_s)), mask_BTR], axis=-1), p_BTR, mask_BTR, None

  x_f = x.astype(jnp.float32)
  logits_BTN = jnp.einsum("btd,dn->btn", x_f, w_router.astype(jnp.float32))
  p_BTR = jax.nn.softmax(logits_BTN[..., h_s:], axis=-1)
  mask_BTR = _top_k_mask(logits_BTN[..., h_s:], top_k)
  selected_BTR = p_BTR * mask_BTR
  if gates == "code":
    denom_BT1 = jnp.maximum(jnp.sum(selected_BTR, axis=-1, keepdims=True), _EPS)
    g_r_BTR = top_k * selected_BTR / denom_BT1
  else:
    g_r_BTR = selected_BTR
  if h_s == 0:
    return g_r_BTR, p_BTR, mask_BTR, None
  g_s_BTS = jax.nn.softmax(logits_BTN[..., :h_s], axis=-1)
  if two_stage:
    logits_BT2 = jnp.einsum("btd,dm->btm", x_f, w_mix.astype(jnp.float32))
  else:  # Table 6's "+shared heads" row: a fixed, equal mix (what W_h = 0 gives)
    logits_BT2 = jnp.zeros((B, T, 2), jnp.float32)
  alpha_BT2 = jax.nn.softmax(logits_BT2, axis=-1)
  if gates == "code":
    g_s_BTS = h_s * g_s_BTS
    alpha_BT2 = 2.0 * alpha_BT2
  gates_BTN = jnp.concatenate([alpha_BT2[..., :1] * g_s_BTS, alpha_BT2[..., 1:] * g_r_BTR], axis=-1)
  return gates_BTN, p_BTR, mask_BTR, alpha_BT2


def balance_loss(
  p_BTR: Float[Array, "B T R"], mask_BTR: Float[Array, "B T R"], valid: Bool[Array, "B T"]
) -> tuple[Float[Array, ""], Float[Array, " R"]]:
  """(L_b = h_r Σ_i f_i P_i over valid tokens, f [h_r]); both 0 when no token is valid."""
  w_BT1 = valid.astype(jnp.float32)[..., None]
  count = jnp.maximum(jnp.sum(w_BT1), 1.0)
  f_R = jax.lax.stop_gradient(jnp.sum(w_BT1 * mask_BTR, axis=(0, 1)) / count)
  P_R = jnp.sum(w_BT1 * p_BTR, axis=(0, 1)) / count
  return p_BTR.shape[-1] * jnp.sum(f_R * P_R), f_R


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  mask=None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  num_shared: int | None = None,
  top_k: int | None = None,
  gates: str = "code",
  router: str = "linear",
  two_stage: bool = True,
  w_router: Float[Array, "D N"],
  w_mix: Float[Array, "D 2"],
  x: Float[Array, "B T D"],
  valid: Bool[Array, "B T"] | None = None,
  implementation: str | None = None,
  block_sizes: BlockSizes | None = None,
) -> tuple[Float[Array, "B T N V"], registry.Aux]:
  """MoH attention; see the module docstring for the equations and conventions.

  Args:
    q, k, v: [B,T,N,H], [B,S,K,H], [B,S,K,Hv]; N % K == 0.
    mask, bias, is_causal: as `dot_product_attention`.
    num_shared: h_s, the always-on heads (the first h_s query heads); None = N // 2.
    top_k: K, active routed heads per token, 1 ≤ K ≤ N - h_s; None = max(1, (N - h_s) // 2).
    gates: "code" (count-scaled, the official code) or "paper" (Eq. 5, normalised).
    router: "linear" (learned W_s, W_r, W_h) or "qnorm" (MoH-LLaMA3, parameter-free).
    w_router: [D,N] router weights, columns [:h_s] = W_s, [h_s:] = W_r.
    two_stage: learn the shared/routed mix α = softmax(W_h x_t) (Eq. 6); False fixes it at
      α1 = α2 = ½ (×2 in code units, i.e. W_h = 0: Table 6's "+shared heads" ablation row;
      w_mix is then unused).
    w_mix: [D,2] W_h of the two-stage routing.
    x: [B,T,D] the layer input (the token state the router reads).
    valid: bool [B,T], False at padding (excluded from the balance statistics); None = all.
    implementation: "xla" or "chunked" (softmax attention's); None = automatic.
    block_sizes: tiles of the "chunked" implementation.

  Returns:
    (out [B,T,N,Hv] = per-head gated outputs in q's dtype, Aux with loss "moh_balance" and
    metrics "moh_max_load" (busiest routed head's token fraction ÷ K/h_r; 1 = balanced) and,
    with a two-stage mix, "moh_shared_mix" (mean α1 / (α1 + α2))).
  """
  B, T, N, _ = q.shape
  if gates not in GATES:
    raise ValueError(f"gates={gates!r} must be one of {GATES}")
  if router not in ROUTERS:
    raise ValueError(f"router={router!r} must be one of {ROUTERS}")
  if router == "qnorm" and gates != "code":
    raise ValueError(
      f"gates={gates!r} has no meaning for router='qnorm' (its gates are a hard 0/1 mask); "
      "leave gates='code'"
    )
  num_shared, top_k = resolve_heads(N, num_shared, top_k)
  D = _validate.check_layer_input(x, B, T)
  _check = _validate.check_shape
  _check("w_router", w_router, (D, N), f"declare it as ParamSpec shape (D, N) = ({D}, {N})")
  _check("w_mix", w_mix, (D, 2), f"declare it as ParamSpec shape (D, 2) = ({D}, 2)")
  valid = jnp.ones((B, T), jnp.bool_) if valid is None else valid
  _check("valid", valid, (B, T), "pass a bool [B, T] array, False at padding tokens")

  impl = registry.resolve_implementation(
    implementation, {"xla": None, "chunked": None}, family="moh"
  )
  heads_BTNV = dot_product_attention(
    q,
    k,
    v,
    mask=mask,
    bias=bias,
    is_causal=is_causal,
    implementation=impl,
    block_sizes=block_sizes,
  )
  gates_BTN, p_BTR, mask_BTR, alpha_BT2 = head_gates(
    q,
    x,
    w_router,
    w_mix,
    num_shared=num_shared,
    top_k=top_k,
    gates=gates,
    router=router,
    two_stage=two_stage,
  )
  out = (heads_BTNV.astype(jnp.float32) * gates_BTN[..., None]).astype(q.dtype)

  loss, f_R = balance_loss(p_BTR, mask_BTR, valid)
  if router == "qnorm":
    loss = jax.lax.stop_gradient(loss)
  routed = N - num_shared
  metrics = {"moh_max_load": jnp.max(f_R) * routed / top_k}
  if alpha_BT2 is not None:
    w_BT = valid.astype(jnp.float32)
    share_BT = alpha_BT2[..., 0] / jnp.sum(alpha_BT2, axis=-1)
    metrics["moh_shared_mix"] = jnp.sum(w_BT * share_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)
  metrics = {k_: jax.lax.stop_gradient(m) for k_, m in metrics.items()}
  return out, registry.Aux(losses={"moh_balance": loss}, metrics=metrics)


_ROUTER_INIT = jax.nn.initializers.normal(0.02)

FAMILY = registry.Family(
  name="moh",
  attention=attention,
  implementations=("xla", "chunked"),
  paper="MoH: Multi-Head Attention as Mixture-of-Head Attention (arXiv 2410.11842)",
  returns_aux=True,
  params={
    "w_router": registry.ParamSpec(
      lambda d: (d.D, d.N), _ROUTER_INIT, "MoH head router: columns [:h_s] W_s, [h_s:] W_r"
    ),
    "w_mix": registry.ParamSpec(
      lambda d: (d.D, 2), _ROUTER_INIT, "MoH two-stage routing W_h (shared vs routed)"
    ),
  },
  aux_losses={"moh_balance": BALANCE_WEIGHT},
  layer_inputs=("x", "valid"),
  conformance=registry.Conformance(
    # Tiles smaller than the suite's lengths, so ragged tiles and skipping are exercised.
    implementation_options={"chunked": {"block_sizes": BlockSizes(16, 8)}},
  ),
)
