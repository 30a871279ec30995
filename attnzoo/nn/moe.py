"""Top-k mixture-of-experts feed-forward layer with load-balance and router z-losses.

Switch Transformer (Fedus et al., arXiv 2101.03961 §2.1-2.2: top-1 routing, L_LB), ST-MoE
(Zoph et al., arXiv 2202.08906 §3.1: router z-loss), as BAM uses them (Zhang et al., arXiv
2408.08274 §3-4; spec: shared/papers/architecture.md §12.1):

    p(x_t) = softmax(x_t W_router)                [E]  (fp32)
    T_t = topk(p(x_t), k)
    FFN_MoE(x_t) = Σ_{i ∈ T_t} p_i(x_t) · FFN_i(x_t)        (NOT renormalised over T_t:
                                                           top-1 gives p_max · FFN_i(x_t))
    FFN_i(x) = down_i(act(gate_i x) ⊙ up_i x)              (SwiGLU when act = silu)

    L_LB = E · Σ_i f_i P_i,  f_i = (1/k)·fraction of valid tokens that select expert i,
                             P_i = mean over valid tokens of p_i          ("moe_balance")
    L_z  = (1/T_valid) Σ_t (logsumexp_i x_t W_router)²                    ("router_z")

f carries no gradient (it counts selections); L_LB is 1 at perfectly uniform routing and E at
collapse. The losses are recorded as the attention layer's aux record (`sow_aux`,
`AttentionAux`: weighted loss, unweighted `aux/<loss>` metrics, no state), so `run_with_aux` and
the trainer add them to the objective with no further plumbing; weights come from
`config.model.aux_weights`.

Shapes: x [B,T,D] -> [B,T,D]; valid bool [B,T]. Params: `router` [D,E], `up`, `gate` [E,D,F],
`down` [E,F,D] (experts stacked on a leading axis: one array per projection).

Differences from the paper:
- Every expert runs on every token and unselected outputs are multiplied by zero (no capacity
  factor, no token dropping, no all-to-all): exact top-k semantics at E× the FFN FLOPs. The
  active-FLOP counts of the paper's tables are computed analytically
  (`experiments/tables/bam_params.py`).

Choices where the paper is silent:
- Default weights α = 0.01 (Switch Transformer) and β = 0.001 (ST-MoE); BAM does not print
  them. The trainer sums the weighted losses over layers (as the paper's Σ_layers).
- Statistics over valid (non-padding) tokens of the whole batch; f is divided by k so that
  L_LB = 1 at balance for every k.
- Ties in top-k go to the lower expert index (`lax.top_k`), so a zero router with k = 1 sends
  every token to expert 0 with p = 1/E.
- Router init normal(std 0.02); experts as the dense MLP (nnx.Linear's default lecun-normal
  kernels), no biases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from attnzoo.nn.attention_layer import sow_aux
from attnzoo.nn.layers import ACTIVATIONS

# Aux losses of the MoE FFN and their default weights (`config.model.aux_weights.<name>`).
AUX_LOSSES = {"moe_balance": 0.01, "router_z": 0.001}


def route(
  x: Float[Array, "B T D"], w_router: Float[Array, "D E"], top_k: int
) -> tuple[Float[Array, "B T E"], Float[Array, "B T E"], Float[Array, "B T"]]:
  """(p = softmax(x W) [B,T,E], selected 0/1 [B,T,E] (exactly top_k per token), logsumexp of
  the logits [B,T]); fp32."""
  logits_BTE = jnp.einsum("btd,de->bte", x.astype(jnp.float32), w_router.astype(jnp.float32))
  _, idx_BTk = jax.lax.top_k(jax.lax.stop_gradient(logits_BTE), top_k)
  selected_BTE = jnp.sum(jax.nn.one_hot(idx_BTk, logits_BTE.shape[-1], dtype=jnp.float32), -2)
  return jax.nn.softmax(logits_BTE, axis=-1), selected_BTE, jax.nn.logsumexp(logits_BTE, -1)


def aux_losses(
  p_BTE: Float[Array, "B T E"],
  selected_BTE: Float[Array, "B T E"],
  lse_BT: Float[Array, "B T"],
  valid_BT: Bool[Array, "B T"],
  top_k: int,
) -> tuple[dict[str, jax.Array], Float[Array, " E"]]:
  """({"moe_balance": L_LB, "router_z": L_z}, f [E]) over valid tokens (0 when none is)."""
  w_BT = valid_BT.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w_BT), 1.0)
  f_E = jax.lax.stop_gradient(jnp.einsum("bt,bte->e", w_BT, selected_BTE) / (count * top_k))
  P_E = jnp.einsum("bt,bte->e", w_BT, p_BTE) / count
  balance = p_BTE.shape[-1] * jnp.sum(f_E * P_E)
  z = jnp.sum(w_BT * jnp.square(lse_BT)) / count
  return {"moe_balance": balance, "router_z": z}, f_E


class MoEFFN(nnx.Module):
  """Top-k MoE of gated (or plain) feed-forward experts; see the module docstring.

  Args:
    dim: D. mlp_dim: F, each expert's hidden width. num_experts: E >= 1.
    top_k: experts per token, 1 <= k <= E.
    gated: experts are `down(act(gate x) * up x)` (True) or `down(act(up x))`.
    activation: a name in `ACTIVATIONS`.
    aux_weights: weights of "moe_balance" / "router_z" (default `AUX_LOSSES`); other names
      are ignored (they belong to attention families).
  """

  def __init__(
    self,
    dim: int,
    mlp_dim: int,
    num_experts: int,
    *,
    top_k: int = 1,
    gated: bool = True,
    activation: str = "silu",
    aux_weights: dict[str, float] | None = None,
    dtype=None,
    rngs: nnx.Rngs,
  ):
    if num_experts < 1:
      raise ValueError(f"num_experts={num_experts} must be >= 1; set model.num_experts")
    if not 1 <= top_k <= num_experts:
      raise ValueError(
        f"top_k={top_k} must be in [1, num_experts] = [1, {num_experts}]; set model.moe_top_k"
      )
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
    self.num_experts, self.top_k, self.activation, self.dtype = (
      num_experts,
      top_k,
      activation,
      dtype,
    )
    weights = dict(AUX_LOSSES)
    weights.update({k: float(v) for k, v in (aux_weights or {}).items() if k in weights})
    self.aux_weights = weights
    kernel = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    E, D, F = num_experts, dim, mlp_dim
    self.router = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (D, E)))
    self.up = nnx.Param(kernel(rngs.params(), (E, D, F)))
    self.gate = nnx.Param(kernel(rngs.params(), (E, D, F))) if gated else None
    self.down = nnx.Param(kernel(rngs.params(), (E, F, D)))

  def __call__(
    self, x_BTD: Float[Array, "B T D"], valid_BT: Bool[Array, "B T"] | None = None
  ) -> Float[Array, "B T D"]:
    B, T, _ = x_BTD.shape
    if valid_BT is None:
      valid_BT = jnp.ones((B, T), jnp.bool_)
    p_BTE, selected_BTE, lse_BT = route(x_BTD, self.router[...], self.top_k)
    dtype = x_BTD.dtype if self.dtype is None else self.dtype
    x = x_BTD.astype(dtype)
    act = ACTIVATIONS[self.activation]
    h_BTEF = jnp.einsum("btd,edf->btef", x, self.up[...].astype(dtype))
    if self.gate is not None:
      h_BTEF = act(jnp.einsum("btd,edf->btef", x, self.gate[...].astype(dtype))) * h_BTEF
    else:
      h_BTEF = act(h_BTEF)
    y_BTED = jnp.einsum("btef,efd->bted", h_BTEF, self.down[...].astype(dtype))
    combine_BTE = p_BTE * selected_BTE
    out_BTD = jnp.einsum("bte,bted->btd", combine_BTE, y_BTED.astype(jnp.float32))

    losses, f_E = aux_losses(p_BTE, selected_BTE, lse_BT, valid_BT, self.top_k)
    loss = sum(
      (self.aux_weights[k] * v for k, v in losses.items()), start=jnp.zeros((), jnp.float32)
    )
    metrics = {f"aux/{k}": v for k, v in losses.items()}
    # Busiest expert's share of selections ÷ 1/E: 1 = balanced, E = collapsed.
    metrics["moe_max_load"] = jax.lax.stop_gradient(jnp.max(f_E) * self.num_experts)
    sow_aux(self, "moe_aux", dict(loss=loss, metrics=metrics, state={}))
    return out_BTD.astype(dtype)
