"""Flux attention: a per-layer router sends each input to full or to sink + window attention.

"Flux Attention: Context-Aware Hybrid Attention for Efficient LLMs Inference" (Qiu et al.,
arXiv 2604.07394), the method (layer router, Gumbel straight-through training, sparsity
constraint; the section numbers of the PDF were not retrieved: the equations below follow the
official code `qqtang-code/FluxAttention`, `fluxattn/training/modeling_flash_llama.py`,
`AttentionRouter` and `LlamaAttention.interpolated_attention`).

One router per layer decides, from the layer's pooled hidden state, between Full Attention (FA)
and Sparse Attention (SA, StreamingLLM-style sink + local window) for the whole layer:

    p      = pool(x)                                           x: the layer input [B,T,D]
    logits = MLP_head(MLP_feat(p))                             fp32, [.., 2] = (SA, FA)
             MLP_feat: D -> 8 d_f -> 2 d_f (SiLU between)
             MLP_head: 2 d_f -> 4 d_f -> d_f -> 2 (SiLU between); last bias (0, 4.5) favours FA
    train: y = logits + g, g ~ Gumbel(0, 1);  soft = softmax(y / τ),  τ clamped to [0.3, 1]
           z = onehot(argmax y) + soft − stop_gradient(soft)     (straight-through estimator)
    eval:  z = onehot(argmax logits)                             (hard, no noise)
    out    = z_FA · FA(q, k, v) + (1 − z_FA) · SA(q, k, v)
    FA     = softmax attention under the call's mask (and causality)
    SA     = the same under mask ∧ (AttentionSinks(num_sink) ∨ SlidingWindow(window))
    loss   "flux_sparsity" = λ1·|s − s_target| + λ2·(s − s_target)²,  s = mean(1 − z_FA)

s is the fraction of this layer's decisions that chose SA, taken through the STE so the router
learns from the constraint (its forward value is the hard fraction). Metrics: "flux_sa_fraction"
(s) and "flux_sa_prob" (the mean soft SA probability, noise included while training).

Pooling and causality. The paper pools over the whole prompt (prefill) and decides once per
sequence. In a causal LM trained on whole sequences that would leak: every row's output would
depend, through z, on future tokens. So:
- causal calls (`is_causal`, or a structured mask that keeps no key after its query) decide per
  query row t from the prefix mean p_t = mean(x_u : u <= t, valid): O_t = z_t·FA_t +
  (1 − z_t)·SA_t is causal, and at eval every row still gets exactly one of the two attentions;
- bidirectional calls (classifiers) decide once per sequence from the mean over valid tokens
  (the paper's rule). A dense-array mask cannot be inspected: pass `is_causal=True` with it.
The Gumbel noise is one draw per sequence (layer, step), shared by its rows, so a sequence's
rows differ only through their pooled states, as the paper's one decision per sequence.

Implementations (one semantics): "xla" — both branches as materialised masked softmax (the
reference); "chunked" — the runtime-map engine (`dot_product_attention`): SA's static mask is a
static `BlockMap`, so only sink and window tiles are visited, forward and backward. Training
runs both branches for every row (the STE needs both outputs, as the paper). At eval each branch
runs on a shared runtime map listing only the q tiles with a row that chose it, so a tile whose
rows all chose SA never computes FA (the paper's inference saving, at tile granularity);
`route="full"` / `"sparse"` run one branch only.

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; x [B,T,D]; valid bool [B,T];
router params w_feat1 [D, 8d_f], w_feat2 [8d_f, 2d_f], w_head1 [2d_f, 4d_f], w_head2 [4d_f, d_f],
w_head3 [d_f, 2] and their biases.

Differences from the paper:
- Per-row causal routing (above) instead of one prefill decision per sequence in causal use.
- The router reads the layer input x (the normed hidden state, width D), so MLP_feat's first
  matrix is D x 8 d_f; the code pools the projected queries and averages them over heads
  (d_f = head_dim, input width d_f) over the first and last 100 tokens of the context and
  question segments ("ctx_q"), which need segment labels this repository's data lacks.
- SA is element-exact: sinks are the first `num_sink` keys and the window the `window` latest
  keys (query included); the code's streaming kernel keeps whole 128-token sink / local blocks.
- The sparsity constraint is per layer (s = this layer's SA fraction, the trainer sums layers)
  with fixed λ1, λ2 (knobs, default 1); the paper constrains the model-level fraction
  1 − #FA layers / #layers with learnable Lagrangian λ (max over λ, min over the model). Neither
  a model-level aux reduction nor a maximised parameter exists in this trainer.
- Routers train with the whole model here; the paper freezes the pretrained LLM and trains
  routers only (freeze the rest with the optimizer if wanted).
- No XAttention retrieval branch (the code's alternative SA mode).

Choices where the paper is silent:
- d_f = `router_dim`, default 8 (small models here: the router then adds 8·D·d_f + 28·d_f²
  parameters, ~6k at D=64); MLP weights LeCun normal, biases 0, last weight 0 and last bias
  (SA, FA) = (0, 4.5) (the code's `reset_parameters`), so a fresh layer is full attention.
- τ default 1.0 (the code's `mask_temp` default; its router default 0.2 clamps to 0.3), clamped
  to [0.3, 1] as the code; no annealing schedule.
- train=True without a key (no rngs) uses the same STE with no noise.
- Defaults num_sink=8, window=64, 64-token tiles: the paper's 128 / 1024 at 32k contexts scaled
  to this repository's 128–2048-token tasks (same 1 : 8 ratio); knobs.
- Bidirectional SA uses a symmetric window (|k − q| < window) plus the sinks.
- Rows before the first valid token pool to 0; padding rows leave s and the metrics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.masks import AttentionSinks, Mask, SlidingWindow
from pallas_kernels.block_sparse import EMPTY, PARTIAL, BlockMap, BlockSizes, num_blocks

SA, FA = 0, 1  # router output order, as the code (its index 1 multiplies full attention)
FA_BIAS = 4.5  # the code's init of the FA logit's bias: softmax(0, 4.5)[FA] ≈ 0.989
TAU_RANGE = (0.3, 1.0)
ROUTES = ("learned", "full", "sparse")
_IMPLEMENTATIONS = ("xla", "chunked")
# name -> shape from (D, d_f): MLP_feat (two layers), then MLP_head (three layers).
_ROUTER_SHAPES = {
  "w_feat1": lambda D, f: (D, 8 * f),
  "b_feat1": lambda D, f: (8 * f,),
  "w_feat2": lambda D, f: (8 * f, 2 * f),
  "b_feat2": lambda D, f: (2 * f,),
  "w_head1": lambda D, f: (2 * f, 4 * f),
  "b_head1": lambda D, f: (4 * f,),
  "w_head2": lambda D, f: (4 * f, f),
  "b_head2": lambda D, f: (f,),
  "w_head3": lambda D, f: (f, 2),
  "b_head3": lambda D, f: (2,),
}
ROUTER_PARAMS = tuple(_ROUTER_SHAPES)


# ------------------------------------------------------------------ the router


def router_shapes(D: int, router_dim: int) -> dict[str, tuple[int, ...]]:
  """Shape of every router array for model width D and d_f = router_dim."""
  return {name: shape(D, router_dim) for name, shape in _ROUTER_SHAPES.items()}


def pooled_state(
  x: Float[Array, "B T D"], valid: Bool[Array, "B T"], *, causal: bool
) -> Float[Array, "B P D"]:
  """fp32 mean of x over valid tokens: per row over its prefix (P = T, causal) or over the whole
  sequence (P = 1). Rows with no valid token so far pool to 0."""
  w_BT1 = valid.astype(jnp.float32)[..., None]
  x_BTD = x.astype(jnp.float32) * w_BT1
  if causal:
    return jnp.cumsum(x_BTD, axis=1) / jnp.maximum(jnp.cumsum(w_BT1, axis=1), 1.0)
  total_B1D = jnp.sum(x_BTD, axis=1, keepdims=True)
  return total_B1D / jnp.maximum(jnp.sum(w_BT1, axis=1, keepdims=True), 1.0)


def router_logits(
  pooled: Float[Array, "B P D"], router: dict[str, Float[Array, "..."]]
) -> Float[Array, "B P 2"]:
  """MLP_head(MLP_feat(pooled)) in fp32: (SA, FA) logits."""
  w = {name: router[name].astype(jnp.float32) for name in ROUTER_PARAMS}
  dense = lambda h, i: jnp.einsum("bpi,io->bpo", h, w[f"w_{i}"]) + w[f"b_{i}"][None, None]
  feat_BPF = dense(jax.nn.silu(dense(pooled, "feat1")), "feat2")
  h_BPF = jax.nn.silu(dense(feat_BPF, "head1"))
  h_BPF = jax.nn.silu(dense(h_BPF, "head2"))
  return dense(h_BPF, "head3")


def decide(
  logits: Float[Array, "B P 2"],
  *,
  train: bool,
  rng: jax.Array | None = None,
  tau: float = 1.0,
) -> tuple[Float[Array, "B P"], Float[Array, "B P"]]:
  """(z_FA, soft SA probability). Training: hard Gumbel-argmax forward, softmax((logits+g)/τ)
  backward (straight-through), one noise draw per sequence (None: no noise); eval: the hard
  argmax of the logits, no gradient."""
  tau = min(max(float(tau), TAU_RANGE[0]), TAU_RANGE[1])
  logits = logits.astype(jnp.float32)
  _check_finite(logits)
  if train:
    noisy = logits
    if rng is not None:
      B = logits.shape[0]
      noisy = logits + jax.random.gumbel(rng, (B, 1, 2), jnp.float32)
    soft = jax.nn.softmax(noisy / tau, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(noisy, axis=-1), 2, dtype=jnp.float32)
    # soft − sg(soft) is exactly 0 forward, so z is exactly one-hot; (hard + soft) − soft is not.
    z = hard + (soft - lax.stop_gradient(soft))
  else:
    soft = jax.nn.softmax(logits / tau, axis=-1)
    z = lax.stop_gradient(jax.nn.one_hot(jnp.argmax(logits, axis=-1), 2, dtype=jnp.float32))
  # Non-finite router logits (a diverged router) would make argmax pick a branch silently:
  # the decision becomes NaN instead, so the output and the loss are NaN and the trainer stops
  # with its non-finite-metrics error (eager calls raise in `_check_finite`).
  ok = jnp.all(jnp.isfinite(logits), axis=-1)
  z_fa = jnp.where(ok, z[..., FA], jnp.nan)
  return z_fa, soft[..., SA]


def _check_finite(logits) -> None:
  """ValueError for concrete non-finite router logits (traced ones: see `decide`)."""
  if isinstance(logits, jax.core.Tracer):
    return
  bad = ~np.isfinite(np.asarray(logits))
  if bad.any():
    raise ValueError(
      f"flux router logits are non-finite at {int(bad.sum())} entries (e.g. index "
      f"{tuple(int(i) for i in np.argwhere(bad)[0])}): the router diverged or its input is "
      "NaN/inf; lower the learning rate or check the layer input"
    )


def sparsity_loss(
  s: Float[Array, ""], s_target: float, lambda1: float, lambda2: float
) -> Float[Array, ""]:
  """λ1·|s − s_target| + λ2·(s − s_target)²."""
  gap = s - s_target
  return lambda1 * jnp.abs(gap) + lambda2 * gap * gap


# ------------------------------------------------------------------ the two branches


def sink_window_mask(num_sink: int, window: int, *, causal: bool) -> Mask:
  """SA's keep pattern: the first `num_sink` keys, and the `window` latest keys (query included;
  bidirectional: |k − q| < window)."""
  local = SlidingWindow(left=window - 1, right=0 if causal else window - 1)
  return AttentionSinks(num_sink) | local if num_sink else local


def routes_causally(mask, is_causal: bool, T: int, S: int, block_q: int, block_k: int) -> bool:
  """Whether the call is causal: `is_causal`, or a structured mask keeping no key k > q (checked
  exactly on the host, tile by tile). Dense arrays are not inspected."""
  if is_causal:
    return True
  if not isinstance(mask, Mask):
    return False
  future = SlidingWindow(left=0, right=S, offset=1)  # keeps exactly k > q
  return not np.any((mask & future).block_mask(T, S, block_q, block_k) != EMPTY)


def _branch_masks(mask, sa: Mask, shape_bnts: tuple[int, int, int, int]):
  """(FA's mask, SA's mask): the call's mask, and it AND the sink + window pattern."""
  if mask is None:
    return None, sa
  if isinstance(mask, Mask):
    return mask, mask & sa
  dense = jnp.asarray(mask)
  if dense.dtype != jnp.bool_:
    raise TypeError(f"mask array must be boolean (True = keep), got dtype {dense.dtype}")
  dense = _validate.broadcast_to_bnts(dense, "mask", shape_bnts)
  return dense, dense & jnp.asarray(sa.dense(*shape_bnts[2:]))[None, None]


def rows_block_map(rows: Bool[Array, "B T"], S: int, block_q: int, block_k: int) -> BlockMap:
  """A runtime map shared by the batch and heads: every kv tile for the q tiles holding a row
  marked in `rows` (of any sequence), none for the others (`dot_product_attention` then keeps
  only what the static mask allows)."""
  B, T = rows.shape
  qb, kb = num_blocks(T, block_q), num_blocks(S, block_k)
  padded_BQ = jnp.pad(rows, ((0, 0), (0, qb * block_q - T)))
  tiles_Qb = jnp.any(padded_BQ.reshape(B, qb, block_q), axis=(0, 2))
  kinds = jnp.where(tiles_Qb[:, None], PARTIAL, EMPTY) * jnp.ones((1, kb), jnp.int32)
  return BlockMap.from_block_mask(
    kinds.astype(jnp.int32),
    block_q=block_q,
    block_k=block_k,
    seq_q=T,
    seq_k=S,
    max_kv_blocks=kb,
    max_q_blocks=qb,
  )


# ------------------------------------------------------------------ the family


def _check_knobs(s_target, tau, num_sink, window, router_dim, lambda1, lambda2, route_name):
  def number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
      raise ValueError(f"{name}={value!r} must be a number")
    return float(value)

  def integer(name, value, low, fix):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name}={value!r} must be an int >= {low}: {fix}")

  if not 0.0 <= number("s_target", s_target) <= 1.0:
    raise ValueError(f"s_target={s_target!r} must be in [0, 1]: the wanted fraction of SA choices")
  if number("tau", tau) <= 0.0:
    raise ValueError(f"tau={tau!r} must be > 0 (it is clamped to {TAU_RANGE} as the paper)")
  for name, lam in (("lambda1", lambda1), ("lambda2", lambda2)):
    if number(name, lam) < 0.0:
      raise ValueError(f"{name}={lam!r} must be >= 0: a weight of the sparsity constraint")
  integer("num_sink", num_sink, 0, "the number of leading sink keys SA keeps (0 for none)")
  integer("window", window, 1, "the number of latest keys SA keeps, the query included")
  integer("router_dim", router_dim, 1, "the router width d_f")
  if route_name not in ROUTES:
    raise ValueError(
      f"route={route_name!r} must be one of {ROUTES}: 'learned' (the router), or a fixed "
      "'full' / 'sparse' for every row (the all-FA and all-SA baselines)"
    )


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  mask: Mask | jax.Array | None = None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  s_target: float = 0.5,
  tau: float = 1.0,
  num_sink: int = 8,
  window: int = 64,
  router_dim: int = 8,
  lambda1: float = 1.0,
  lambda2: float = 1.0,
  route: str = "learned",
  block_q: int = 64,
  block_k: int = 64,
  x: Float[Array, "B T D"] | None = None,
  valid: Bool[Array, "B T"] | None = None,
  train: bool = False,
  rng: jax.Array | None = None,
  w_feat1: Float[Array, "D F8"] | None = None,
  b_feat1: Float[Array, " F8"] | None = None,
  w_feat2: Float[Array, "F8 F2"] | None = None,
  b_feat2: Float[Array, " F2"] | None = None,
  w_head1: Float[Array, "F2 F4"] | None = None,
  b_head1: Float[Array, " F4"] | None = None,
  w_head2: Float[Array, "F4 F"] | None = None,
  b_head2: Float[Array, " F"] | None = None,
  w_head3: Float[Array, "F 2"] | None = None,
  b_head3: Float[Array, " 2"] | None = None,
  implementation: str | None = None,
) -> tuple[Float[Array, "B T N V"], registry.Aux]:
  """Flux attention; see the module docstring for the equations and conventions.

  Args:
    q, k, v: [B,T,N,H], [B,S,K,H], [B,S,K,Hv]; N % K == 0.
    mask, bias, is_causal, scale: as `dot_product_attention` (both branches).
    s_target: the wanted SA fraction in [0, 1]. lambda1, lambda2: the constraint's weights.
    tau: Gumbel-softmax temperature, clamped to [0.3, 1].
    num_sink, window: SA's sink keys and local window (keys, query included).
    router_dim: d_f, sizes the router arrays.
    route: "learned" (the router), "full" or "sparse" (fixed for every row: the baselines).
    block_q, block_k: tiles of the "chunked" path (SA skips the tiles outside sinks + window).
    x: the layer input [B,T,D] the router pools (required with route="learned").
    valid: bool [B,T], False at padding (left out of pooling, s and metrics); None = all.
    train: the training step (Gumbel noise and the STE) vs eval (hard argmax).
    rng: key of the Gumbel noise while training (None: no noise).
    w_feat1 ... b_head3: the router's arrays (`router_shapes`).
    implementation: "xla" (dense reference) or "chunked"; None = automatic.

  Returns:
    (out [B,T,N,Hv] in q's dtype, Aux with loss "flux_sparsity" and metrics
    "flux_sa_fraction", "flux_sa_prob").
  """
  B, T, S, N, *_ = _validate.check_qkv(q, k, v)
  _check_knobs(s_target, tau, num_sink, window, router_dim, lambda1, lambda2, route)
  if not isinstance(train, bool):
    raise TypeError(f"train={train!r} must be a Python bool (the training step or not)")
  valid = _validate.check_valid(valid, B, T)
  impl = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="flux"
  )
  causal = routes_causally(mask, is_causal, T, S, block_q, block_k)
  sa_pattern = sink_window_mask(num_sink, window, causal=causal)
  fa_mask, sa_mask = _branch_masks(mask, sa_pattern, (B, N, T, S))

  if route == "learned":
    if x is None:
      raise ValueError("route='learned' pools the layer input: pass x [B, T, D]")
    D = _validate.check_layer_input(x, B, T)
    router = dict(
      w_feat1=w_feat1,
      b_feat1=b_feat1,
      w_feat2=w_feat2,
      b_feat2=b_feat2,
      w_head1=w_head1,
      b_head1=b_head1,
      w_head2=w_head2,
      b_head2=b_head2,
      w_head3=w_head3,
      b_head3=b_head3,
    )
    fix = f"create it from FAMILY.params with D={D} and router_dim={router_dim}"
    for name, want in router_shapes(D, router_dim).items():
      if router[name] is None:
        raise ValueError(f"route='learned' needs the router array {name}; {fix}")
      _validate.check_shape(name, router[name], want, fix)
    logits_BP2 = router_logits(pooled_state(x, valid, causal=causal), router)
    z_BP, p_sa_BP = decide(logits_BP2, train=train, rng=rng, tau=tau)
  else:
    z_BP = jnp.full((B, 1), 1.0 if route == "full" else 0.0, jnp.float32)
    p_sa_BP = 1.0 - z_BP

  run = functools.partial(
    dot_product_attention,
    q,
    k,
    v,
    bias=bias,
    is_causal=is_causal,
    scale=scale,
    implementation=impl,
    block_sizes=BlockSizes(block_q, block_k) if impl == "chunked" else None,
  )
  z_BT = jnp.broadcast_to(z_BP, (B, T))
  if route != "learned":
    out = run(mask=fa_mask if route == "full" else sa_mask)
  elif train:
    # Both branches for every row: the STE's gradient d out / d z = FA − SA needs both.
    z_BT11 = z_BT[:, :, None, None]
    fa = run(mask=fa_mask).astype(jnp.float32)
    sa = run(mask=sa_mask).astype(jnp.float32)
    out = (z_BT11 * fa + (1.0 - z_BT11) * sa).astype(q.dtype)
  else:
    chose_fa_BT = z_BT > 0.5
    maps = {}
    if impl == "chunked":  # skip the q tiles none of whose rows chose the branch
      maps["fa"] = rows_block_map(chose_fa_BT, S, block_q, block_k)
      maps["sa"] = rows_block_map(~chose_fa_BT, S, block_q, block_k)
    fa = run(mask=fa_mask, block_map=maps.get("fa"))
    sa = run(mask=sa_mask, block_map=maps.get("sa"))
    out = jnp.where(chose_fa_BT[:, :, None, None], fa, sa)
    out = jnp.where(jnp.isnan(z_BT)[:, :, None, None], jnp.nan, out).astype(q.dtype)  # `decide`

  # Decisions weighted by the tokens they serve: valid rows (causal) or non-empty sequences.
  if z_BP.shape[1] == T:
    w_BP = valid.astype(jnp.float32)
  else:
    w_BP = jnp.any(valid, axis=1, keepdims=True).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w_BP), 1.0)
  s = jnp.sum(w_BP * (1.0 - z_BP)) / n
  metrics = {
    "flux_sa_fraction": lax.stop_gradient(s),
    "flux_sa_prob": lax.stop_gradient(jnp.sum(w_BP * p_sa_BP) / n),
  }
  loss = sparsity_loss(s, s_target, lambda1, lambda2)
  return out, registry.Aux(losses={"flux_sparsity": loss}, metrics=metrics)


def _router_spec(name: str) -> registry.ParamSpec:
  shape = lambda d: _ROUTER_SHAPES[name](d.D, d.knobs.get("router_dim", 8))
  if name == "b_head3":
    init = lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype).at[FA].set(FA_BIAS)
  elif name == "w_head3" or name.startswith("b_"):
    init = registry.zeros_init
  else:
    init = jax.nn.initializers.lecun_normal()
  return registry.ParamSpec(shape, init, f"Flux router {name}")


FAMILY = registry.Family(
  name="flux",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="Flux Attention: Context-Aware Hybrid Attention for Efficient LLMs Inference "
  "(arXiv 2604.07394)",
  returns_aux=True,
  params={name: _router_spec(name) for name in ROUTER_PARAMS},
  aux_losses={"flux_sparsity": 1.0},
  layer_inputs=("x", "valid", "train", "rng"),
  conformance=registry.Conformance(
    # One setting, SA for every row (a fresh router picks FA everywhere at eval, which is plain
    # softmax attention, already covered): a short window so the suite's lengths keep SA
    # sparse, small chunked tiles so SA skips some. Learned/mixed routing, training mode and
    # chunked = xla under mixed routing are tested in test_flux.py.
    cases={"sparse": registry.ConformanceCase(options=dict(route="sparse", num_sink=4, window=16))},
    implementation_options={"chunked": dict(block_q=8, block_k=8)},
  ),
)
