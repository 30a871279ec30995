"""LAMA: low-rank factorised multi-head attention pooling.

"Low Rank Factorization for Compact Multi-Head Self-Attention" (Mehta, Rangwala, Ramakrishnan;
arXiv 1912.00835; v2 "Compact Multi-Head Self-Attention for Learning Supervised Text
Representations"). Over encoder states h_t ∈ R^D (the paper: BiGRU states) and one global
context vector c ∈ R^{D_c}, head j of M scores each token by a bilinear form whose M matrices
W_j = U diag(P_j) Vᵀ share the low-rank factors U [D,k] and V [D_c,k] (Kim et al.'s low-rank
bilinear pooling, with tanh on each side):

    s_{t,j} = P_jᵀ ( tanh(Uᵀ h_t) ⊙ tanh(Vᵀ c) )              P [k, M], P_j its column j
    α_{:,j} = softmax_t(s_{:,j})       (over the valid tokens only)
    O = αᵀ H ∈ R^{M×D}  ->  flattened, F = M·D, the classifier's input

Learned elements: D·k + D_c·k + k·M (U, V, P), against Lin et al.'s structured self-attention
(arXiv 1703.03130) D·d_a + d_a·M and a Transformer MHSA layer's 4·D²
(`python -m experiments.reproduce --tables=pool_params`).

Shapes: x [B,T,D], valid bool [B,T] -> pooled [B, M·D] (x's dtype; head j's D values are the
j-th block of the row), weights α [B, M, T] fp32. Knobs: `num_heads` M, `rank` k (None: D // 2).
Scores and the softmax are fp32.

Differences from the paper:
- The orthogonality penalty ‖αᵀα − I‖²_F the paper may add (after Lin et al.) is not computed:
  the pooling returns no aux loss. It can be computed from the returned weights.
- Here the states come from this package's transformer encoder, not a BiGRU.

Choices where the paper is silent (its method section could not be retrieved; the v2 abstract
says the scores come from "querying a global context vector instead of densely querying all the
words in the sentence"):
- c is the masked mean of the token states, c = (1/|valid|) Σ_{t valid} h_t (D_c = D): a
  parameter-free global context computed from the sentence, so the parameter count is exactly
  the paper's D·k + D_c·k + k·M (a learned c would add D_c). Gradients flow through c.
- Initialisation: U and V LeCun-normal, P zeros, so a fresh pooling gives uniform weights over
  the valid tokens and every head equals mean pooling; the heads separate as P trains (the
  classifier weights differ per head, so P's gradient does too).
- No biases inside the tanh (the bilinear form as written has none).
- Padding tokens get weight exactly 0; an example with no valid token pools to zeros with finite
  gradients (`common.masked_softmax`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from attnzoo.attention.pooling import common
from attnzoo.attention.pooling.registry import Pooling
from attnzoo.attention.registry import Dims, ParamSpec


def resolve_sizes(D: int, num_heads: int, rank: int | None) -> tuple[int, int]:
  """(M, k) from the knobs; ValueError naming a bad value and the fix."""
  k = rank if rank is not None else max(D // 2, 1)
  if int(num_heads) < 1:
    raise ValueError(f"LAMA num_heads={num_heads} must be >= 1 (pool_knobs.num_heads)")
  if int(k) < 1:
    raise ValueError(f"LAMA rank={rank} must be >= 1 (pool_knobs.rank), or None for D // 2")
  return int(num_heads), int(k)


def lama_scores(
  x_BTD: Float[Array, "B T D"],
  valid_BT: Bool[Array, "B T"],
  *,
  w_u: Float[Array, "D k"],
  w_v: Float[Array, "Dc k"],
  w_p: Float[Array, "k M"],
) -> Float[Array, "B M T"]:
  """fp32 scores s_{t,j} = P_jᵀ(tanh(Uᵀh_t) ⊙ tanh(Vᵀc)), c = masked mean of h; [B, M, T]."""
  h_BTD = x_BTD.astype(jnp.float32)
  c_BD = common.masked_mean(h_BTD, valid_BT)
  f32 = lambda w: jnp.asarray(w, jnp.float32)
  token_BTK = jnp.tanh(jnp.einsum("btd,dk->btk", h_BTD, f32(w_u)))
  context_BK = jnp.tanh(jnp.einsum("bd,dk->bk", c_BD, f32(w_v)))
  return jnp.einsum("btk,bk,km->bmt", token_BTK, context_BK, f32(w_p))


def lama_pool(
  x_BTD: Float[Array, "B T D"],
  valid_BT: Bool[Array, "B T"],
  *,
  w_u: Float[Array, "D k"],
  w_v: Float[Array, "Dc k"],
  w_p: Float[Array, "k M"],
  num_heads: int = 4,
  rank: int | None = None,
) -> tuple[Float[Array, "B F"], Float[Array, "B M T"]]:
  """LAMA pooling (module docstring): -> (pooled [B, M·D] in x's dtype, α [B, M, T] fp32)."""
  common.check_tokens(x_BTD, valid_BT)
  B, _, D = x_BTD.shape
  M, k = resolve_sizes(D, num_heads, rank)
  expected = {"w_u": (D, k), "w_v": (D, k), "w_p": (k, M)}
  for name, w in (("w_u", w_u), ("w_v", w_v), ("w_p", w_p)):
    if tuple(w.shape) != expected[name]:
      raise ValueError(
        f"LAMA {name} has shape {tuple(w.shape)}; expected {expected[name]} for D={D}, "
        f"rank={k}, num_heads={M} (build the arrays from POOLING.params with the same knobs)"
      )
  weights_BMT = common.masked_softmax(
    lama_scores(x_BTD, valid_BT, w_u=w_u, w_v=w_v, w_p=w_p), valid_BT
  )
  pooled_BMD = jnp.einsum("bmt,btd->bmd", weights_BMT, x_BTD.astype(jnp.float32))
  return pooled_BMD.reshape(B, M * D).astype(x_BTD.dtype), weights_BMT


def _sizes(d: Dims) -> tuple[int, int]:
  return resolve_sizes(d.D, d.knobs["num_heads"], d.knobs["rank"])


_LECUN = jax.nn.initializers.lecun_normal()

POOLING = Pooling(
  name="lama",
  pool=lama_pool,
  out_dim=lambda d: _sizes(d)[0] * d.D,
  params={
    "w_u": ParamSpec(
      shape=lambda d: (d.D, _sizes(d)[1]), init=_LECUN, doc="U [D, k]: token factor"
    ),
    "w_v": ParamSpec(
      shape=lambda d: (d.D, _sizes(d)[1]), init=_LECUN, doc="V [D_c, k]: context factor"
    ),
    "w_p": ParamSpec(
      shape=lambda d: (_sizes(d)[1], _sizes(d)[0]), doc="P [k, M]: per-head mixing (zeros)"
    ),
  },
  paper="Low Rank Factorization for Compact Multi-Head Self-Attention (arXiv 1912.00835)",
)
