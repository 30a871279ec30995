"""BAM's soft Mixture of Attention: E attention experts mixed by a dense, per-token router.

"BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts"
(Zhang et al.; arXiv 2408.08274), §3 (parallel attention, MoA) and §4.2 (soft routing, KV
experts vs KV sharing); spec: shared/papers/architecture.md §12.

    g(x_t) = softmax(x_t W_r)                        [E]   over ALL experts (soft, no top-k)
    MoA(x_t) = Σ_e g_e(x_t) · MHA_e(x_t),    MHA_e(x_t) = Σ_{h ∈ e} O_h W_O^h

Because MHA_e is a sum over its heads of (head output) × (its slice of W_O), MoA is one
multi-head attention over the E·N stacked heads in which every head of expert e is scaled by
g_e before the layer's shared output projection. That is how the family is built: its `heads`
rule stacks the experts on the head axis of the layer, the pure function attends with
`dot_product_attention` and multiplies each head by its expert's gate; the layer's W_O
[E·N, V, D] holds every expert's output projection.

Head layouts (`Family.heads`, from the model's N query and K kv heads):
- share_kv=False ("KV experts", every expert its own W_q, W_k, W_v, W_o): N·E query heads and
  K·E kv heads, both expert-major ([E, N] and [E, K] flattened), so the layer's GQA grouping
  (query head i reads kv head i // (N/K)) sends expert e's query heads to expert e's kv heads.
- share_kv=True ("KV sharing", one W_k, W_v shared by the experts): K kv heads and N·E query
  heads head-major ([N, E] flattened): query head n·E + e reads kv head n // (N/K), the kv head
  of head n in every expert.
The pure function only needs the query head -> expert map: expert-major e = i // (Nq/E),
head-major e = i % E (`expert_of_head`); `stack_heads` builds the stacked arrays from
per-expert ones (upcycling, tests).

Router z-loss (aux "attn_router_z", default weight 0.001):
    L_z = (1/T_valid) Σ_t (logsumexp_e x_t W_r)²     over valid tokens.

Shapes: q [B,T,Nq,H] (Nq = N·E), k [B,S,Kk,H], v [B,S,Kk,Hv] -> [B,T,Nq,Hv] (gated per-head
outputs, the layer's W_O follows); x [B,T,D]; w_router [D,E]; valid bool [B,T].

Differences from the paper:
- The expert outputs are summed through one stacked W_O (Σ_e g_e O_e W_O^e as one
  contraction over E·N heads) instead of E separate attention modules and a weighted sum:
  the same function, one kernel call, one checkpoint array per projection.
- An output bias of the layer (`use_bias`, off in every model here) is shared by the experts
  and added once; the paper's per-expert biases would be Σ_e g_e b_e.

Choices where the paper is silent:
- Aux losses: the paper's objective is NLL + Σ_layers(α L_LB + β L_z). A soft router has no
  dispatch, hence no load to balance, so the attention router gets the z-loss only, under its
  own name "attn_router_z" (β = 0.001, the usual ST-MoE value, as the FFN router's `router_z`;
  set both to the same value for the paper's single β).
- Router init normal(std 0.02) (the paper: "router layers are initialized randomly"); the
  upcycling utility (`attnzoo.compress.upcycle`) can zero it (uniform gates 1/E).
- num_experts = 2 by default (the smallest mixture; the paper's small scale uses 4: three
  domain experts + the seed).
- Router logits, softmax and gates in fp32; out is cast back to q's dtype after gating.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from attnzoo.attention import registry
from attnzoo.attention.dense.softmax import dot_product_attention
from pallas_kernels.block_sparse import BlockSizes

Z_LOSS_WEIGHT = 0.001  # β, ST-MoE's router z-loss coefficient (arXiv 2202.08906 §3.1)


def _check_experts(num_experts) -> int:
  if not isinstance(num_experts, int) or num_experts < 1:
    raise ValueError(
      f"num_experts={num_experts!r} must be an int >= 1 (the number of attention experts); "
      "set knobs.bam.num_experts"
    )
  return num_experts


def heads(dims: registry.Dims) -> registry.Dims:
  """The layer's layout from the model's: N·E query heads; K·E (KV experts) or K (KV sharing)
  key/value heads."""
  E = _check_experts(dims.knobs.get("num_experts", 2))
  if dims.knobs.get("share_kv", False):
    return dims.replace(N=dims.N * E)
  return dims.replace(N=dims.N * E, K=dims.K * E, Kv=dims.Kv * E)


def expert_of_head(num_heads: int, num_experts: int, *, share_kv: bool) -> jax.Array:
  """int [Nq]: the expert of each stacked query head (expert-major, or head-major when
  share_kv)."""
  if num_heads % num_experts:
    raise ValueError(
      f"{num_heads} query heads are not a multiple of num_experts={num_experts}; the layer "
      "stacks N heads per expert (Family.heads), pass q with N·E heads"
    )
  heads_ = jnp.arange(num_heads)
  return heads_ % num_experts if share_kv else heads_ // (num_heads // num_experts)


def stack_heads(per_expert: list[jax.Array], axis: int, *, role: str, share_kv: bool) -> jax.Array:
  """Stacks E per-expert arrays along their head `axis` in the layer's layout.

  role "q" (query kernel [D,N,H], out kernel [N,V,D]): expert-major, or head-major when
  share_kv. role "kv" (key/value kernels [D,K,H]): expert-major; with share_kv the layer has
  one shared set, so the experts' arrays are averaged (they are non-expert parameters then).
  """
  if role not in ("q", "kv"):
    raise ValueError(f"role={role!r} must be 'q' (query/out heads) or 'kv' (key/value heads)")
  if role == "kv" and share_kv:
    return sum(per_expert[1:], per_expert[0]) / len(per_expert)
  if role == "q" and share_kv:
    stacked = jnp.stack(per_expert, axis=axis + 1)  # [..., N, E, ...]
    shape = list(per_expert[0].shape)
    shape[axis] *= len(per_expert)
    return stacked.reshape(shape)
  return jnp.concatenate(per_expert, axis=axis)


def router_gates(
  x: Float[Array, "B T D"], w_router: Float[Array, "D E"]
) -> tuple[Float[Array, "B T E"], Float[Array, "B T"]]:
  """(g = softmax(x W_r) [B,T,E], logsumexp of the logits [B,T]), both fp32."""
  logits_BTE = jnp.einsum("btd,de->bte", x.astype(jnp.float32), w_router.astype(jnp.float32))
  return jax.nn.softmax(logits_BTE, axis=-1), jax.nn.logsumexp(logits_BTE, axis=-1)


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  mask=None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  num_experts: int = 2,
  share_kv: bool = False,
  w_router: Float[Array, "D E"],
  x: Float[Array, "B T D"],
  valid: Bool[Array, "B T"] | None = None,
  implementation: str | None = None,
  block_sizes: BlockSizes | None = None,
) -> tuple[Float[Array, "B T N V"], registry.Aux]:
  """Soft mixture of attention experts; see the module docstring.

  Args:
    q, k, v: [B,T,Nq,H], [B,S,Kk,H], [B,S,Kk,Hv] in the stacked layout (Nq = N·E).
    mask, bias, is_causal: as `dot_product_attention`.
    num_experts: E, attention experts stacked on the head axis.
    share_kv: False = "KV experts" (expert-major heads), True = "KV sharing" (head-major
      query heads over shared kv heads).
    w_router: [D,E] the attention router.
    x: [B,T,D] the layer input (the token state the router reads).
    valid: bool [B,T], False at padding (excluded from the z-loss); None = all.
    implementation: "xla" or "chunked" (softmax attention's); None = automatic.
    block_sizes: tiles of the "chunked" implementation.

  Returns:
    (out [B,T,Nq,Hv] = gated per-head outputs in q's dtype, Aux with loss "attn_router_z" and
    metric "bam_gate_max" (mean over valid tokens of the largest gate; 1/E = uniform)).
  """
  B, T, Nq, _ = q.shape
  E = _check_experts(num_experts)
  expert_N = expert_of_head(Nq, E, share_kv=share_kv)
  if x.ndim != 3 or x.shape[:2] != (B, T):
    raise ValueError(f"x has shape {x.shape}; expected [B, T, D] with (B, T) = {(B, T)} as q")
  D = x.shape[-1]
  if tuple(w_router.shape) != (D, E):
    raise ValueError(
      f"w_router has shape {tuple(w_router.shape)}, expected (D, E) = ({D}, {E}); declare it "
      "as ParamSpec shape (D, num_experts)"
    )
  valid = jnp.ones((B, T), jnp.bool_) if valid is None else valid
  if valid.shape != (B, T):
    raise ValueError(f"valid has shape {valid.shape}; pass a bool [B, T] = {(B, T)} array")

  impl = registry.resolve_implementation(
    implementation, {"xla": None, "chunked": None}, family="bam"
  )
  heads_BTNV = dot_product_attention(
    q, k, v, mask=mask, bias=bias, is_causal=is_causal, implementation=impl, block_sizes=block_sizes
  )
  gates_BTE, lse_BT = router_gates(x, w_router)
  gates_BTN = jnp.take(gates_BTE, expert_N, axis=-1)
  out = (heads_BTNV.astype(jnp.float32) * gates_BTN[..., None]).astype(q.dtype)

  w_BT = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w_BT), 1.0)
  z_loss = jnp.sum(w_BT * jnp.square(lse_BT)) / count
  gate_max = jax.lax.stop_gradient(jnp.sum(w_BT * jnp.max(gates_BTE, axis=-1)) / count)
  return out, registry.Aux(losses={"attn_router_z": z_loss}, metrics={"bam_gate_max": gate_max})


FAMILY = registry.Family(
  name="bam",
  attention=attention,
  implementations=("xla", "chunked"),
  paper="BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts "
  "(arXiv 2408.08274)",
  returns_aux=True,
  params={
    "w_router": registry.ParamSpec(
      lambda d: (d.D, _check_experts(d.knobs.get("num_experts", 2))),
      jax.nn.initializers.normal(0.02),
      "BAM soft attention router W_r [D, E]",
    ),
  },
  aux_losses={"attn_router_z": Z_LOSS_WEIGHT},
  layer_inputs=("x", "valid"),
  heads=heads,
  conformance=registry.Conformance(
    cases={
      "default": registry.ConformanceCase(),
      "kv_sharing": registry.ConformanceCase(options={"share_kv": True}),
    },
    # Tiles smaller than the suite's lengths, so ragged tiles and skipping are exercised.
    implementation_options={"chunked": {"block_sizes": BlockSizes(16, 8)}},
  ),
)
