"""SHRP: every head an expert, top-1 routing of each token to one head, usage-driven pruning.

"SHRP: Specialized Head Routing and Pruning for Efficient Encoder Compression" (Su et al., arXiv
2512.20635). Only the abstract could be read (spec: shared/papers/architecture.md §2): "Expert
Attention" treats each head as an independent expert, a "unified Top-1 usage-driven mechanism"
routes tokens to heads during training, and the heads' usage decides a deterministic pruning at
deployment. Everything below the abstract level is inferred, and marked so.

    p_t   = softmax(x_t W_r)                       [N]   head probabilities (W_r [D,N])
    i_t   = argmax_i p_t,i                                (ties: the lower head index)
    g_t,i = 1 if i = i_t else 0                           (MoH "code" gates with top_k = 1)
    out_t,i = g_t,i · softmax(q_i kᵀ / √H)_t v            (per head; the layer's W_O follows)
    usage_i ← usage_i + #{valid tokens t : i_t = i}        (carried state, float32 counts)
    L_b   = N · Σ_i f_i P_i,  f_i = token fraction routed to head i, P_i = mean p_i  (valid tokens)

So each token's attention output is exactly one head's output, projected by that head's rows of
W_O. `attnzoo.compress.prune_heads` keeps each layer's most-used heads; a head no token selects
contributes nothing, so removing it leaves the function unchanged.

The gates and the balance loss are MoH's (`moh.head_gates` with num_shared=0, top_k=1, gates
"code"; `moh.balance_loss`), which for top-1 is the Switch Transformer's load-balance loss
(Fedus et al., arXiv 2101.03961, Eq. 4): 1 at uniform routing, N at collapse onto one head.

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; x [B,T,D] (the router reads the
layer input), valid bool [B,T]; learned w_router [D,N]; carried usage [N].

Differences from the paper:
- The "lightweight shared expander FFN" after the head outputs is not implemented: its form is
  unknown (the abstract only names it); the layer's W_O maps the selected head to D.
- All heads are computed and unselected ones multiplied by 0 (as MoH): routing saves no FLOPs
  during training; the saving comes from pruning.
- Everything beyond the abstract is inferred: the linear router on the layer input, the
  balance-loss form, the usage counters and the top-1 routing kept after pruning.

Choices where the paper is silent:
- Router gradient: MoH's top-1 code gate p_i / p_i is identically 1, so it carries no gradient.
  The gate is multiplied by p_i / stop_gradient(p_i) (value exactly 1, gradient ∂ log p_i), a
  straight-through estimator: the task loss raises the log-probability of a head in proportion to
  how much its output helps the token. The forward value stays exactly 0/1.
- Balance-loss weight 0.01 (aux loss "shrp_balance"): the paper's choice (and whether it uses a
  balance loss or usage-driven re-initialisation against collapse) is unknown; 0.01 is the
  Switch Transformer's α for this very loss under top-1 routing, and MoH's β. The trainer sums
  over layers.
- Usage counts valid tokens in every call whose `Aux.state` the trainer writes (training steps;
  evaluation drops it), from zero at init, never decayed. float32 counts are exact up to 2^24
  tokens per head and layer; beyond that they are approximate, which only matters for ties.
- Router init normal(std 0.02) (as MoH): near-uniform yet random, so ties are broken per token.
- Router logits, softmax and gates are fp32; out is cast back to q's dtype after gating.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.attention.heads import moh
from attnzoo.masks import Mask
from pallas_kernels.block_sparse import BlockSizes

BALANCE_WEIGHT = 0.01  # Switch Transformer's α for N·Σ f·P under top-1 routing (and MoH's β)
_IMPLEMENTATIONS = ("xla", "chunked")


def route(
  x: Float[Array, "B T D"], w_router: Float[Array, "D N"]
) -> tuple[Float[Array, "B T N"], Float[Array, "B T N"], Float[Array, "B T N"]]:
  """(gates_BTN: exactly one 1.0 per token, straight-through gradient; p_BTN head
  probabilities; mask_BTN the selected head, 0/1), all fp32."""
  B, T, _ = x.shape
  N = w_router.shape[1]
  placeholder_q = jnp.zeros((B, T, N, 1), jnp.float32)  # the linear router reads x only
  no_mix = jnp.zeros((x.shape[-1], 2), jnp.float32)  # no shared heads: no two-stage mix
  gates_BTN, p_BTN, mask_BTN, _ = moh.head_gates(
    placeholder_q, x, w_router, no_mix, num_shared=0, top_k=1, gates="code"
  )
  p_sel_BT1 = jnp.sum(p_BTN * mask_BTN, axis=-1, keepdims=True)
  gates_BTN = gates_BTN * (p_sel_BT1 / jax.lax.stop_gradient(p_sel_BT1))
  return gates_BTN, p_BTN, mask_BTN


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  w_router: Float[Array, "D N"],
  usage: Float[Array, " N"],
  x: Float[Array, "B T D"],
  valid: Bool[Array, "B T"] | None = None,
  mask: Mask | jax.Array | None = None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
  logits_soft_cap: float | None = None,
  implementation: str | None = None,
  block_sizes: BlockSizes | None = None,
) -> tuple[Float[Array, "B T N V"], registry.Aux]:
  """SHRP attention; see the module docstring for the equations and what is inferred.

  Args:
    q, k, v: [B,T,N,H], [B,S,K,H], [B,S,K,Hv]; N % K == 0.
    w_router: learned [D,N] router (one column per head).
    usage: carried [N] tokens routed to each head so far (never differentiated).
    x: [B,T,D] the layer input the router reads.
    valid: bool [B,T], False at padding (not counted, not in the balance loss); None = all.
    mask, bias, is_causal, scale, segment_ids, logits_soft_cap: as `dot_product_attention`.
    implementation: "xla" or "chunked" (softmax attention's); None = automatic.
    block_sizes: tiles of the "chunked" implementation.

  Returns:
    (out [B,T,N,Hv]: each token's selected head's output, the others 0, in q's dtype;
    Aux(losses={"shrp_balance"}, metrics={"shrp_max_load": busiest head's token fraction ·N
    (1 = balanced), "shrp_idle_heads": fraction of heads no valid token of the batch selected},
    state={"usage": usage + this call's counts})).
  """
  B, T, S, N, K, H, _ = _validate.check_qkv(q, k, v)
  D = _validate.check_layer_input(x, B, T)
  _validate.check_shape("w_router", w_router, (D, N), "[D, N]: create it from FAMILY.params")
  _validate.check_shape("usage", usage, (N,), "one count per head: create it from FAMILY.state")
  valid = _validate.check_valid(valid, B, T)
  name = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="shrp"
  )
  heads_BTNV = dot_product_attention(
    q,
    k,
    v,
    mask=mask,
    bias=bias,
    is_causal=is_causal,
    scale=scale,
    segment_ids=segment_ids,
    logits_soft_cap=logits_soft_cap,
    implementation=name,
    block_sizes=block_sizes,
  )
  gates_BTN, p_BTN, mask_BTN = route(x, w_router)
  out = (heads_BTNV.astype(jnp.float32) * gates_BTN[..., None]).astype(q.dtype)

  loss, f_N = moh.balance_loss(p_BTN, mask_BTN, valid)
  counts_N = jnp.sum(valid.astype(jnp.float32)[..., None] * mask_BTN, axis=(0, 1))
  new_usage = jax.lax.stop_gradient(usage.astype(jnp.float32) + counts_N)
  metrics = {
    "shrp_max_load": jnp.max(f_N) * N,
    "shrp_idle_heads": jnp.mean((counts_N == 0).astype(jnp.float32)),
  }
  metrics = {k_: jax.lax.stop_gradient(m) for k_, m in metrics.items()}
  return out, registry.Aux(
    losses={"shrp_balance": loss}, metrics=metrics, state={"usage": new_usage}
  )


FAMILY = registry.Family(
  name="shrp",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="SHRP: Specialized Head Routing and Pruning for Efficient Encoder Compression "
  "(arXiv 2512.20635)",
  returns_aux=True,
  params={
    "w_router": registry.ParamSpec(
      lambda d: (d.D, d.N),
      jax.nn.initializers.normal(0.02),
      "SHRP top-1 head router [D, N]",
      head_axis=1,
    )
  },
  state={
    "usage": registry.ParamSpec(
      lambda d: (d.N,), doc="tokens routed to each head so far (float32 counts)", head_axis=0
    )
  },
  aux_losses={"shrp_balance": BALANCE_WEIGHT},
  layer_inputs=("x", "valid"),
  conformance=registry.Conformance(
    # Tiles smaller than the suite's lengths, so ragged tiles and skipping are exercised.
    implementation_options={"chunked": {"block_sizes": BlockSizes(16, 8)}},
  ),
)
