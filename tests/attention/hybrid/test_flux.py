"""Flux attention (arXiv 2604.07394): the paper's invariants on top of the conformance suite.

Eval routing is hard and the output is exactly the chosen branch per row; training's forward is
the hard choice while the router's gradient is the soft (Gumbel-softmax) path's; SA equals a
dense sink + window reference; causal routing pools prefixes only (causality by gradient);
chunked = xla under mixed routing, forward and gradients, in both modes; the model passes
train / rng (noise per step, reproducible for a step) and the trainer logs the aux loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnzoo import nn
from attnzoo.attention import dot_product_attention, registry
from attnzoo.attention.hybrid import flux
from attnzoo.masks import Causal, DenseMask, SlidingWindow
from attnzoo.models import ModelConfig, Transformer
from attnzoo.training import steps
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

B, T, N, K, H, V, D = 2, 24, 4, 2, 8, 8, 32
KNOBS = dict(num_sink=2, window=5, block_q=8, block_k=8)
DIMS = registry.Dims(D=D, N=N, K=K, H=H, V=V, knobs=flux.FAMILY.knob_values(KNOBS))
ROUTER_SEED = 2  # with it the router's choices differ between rows and between sequences


def _inputs(seed=0, batch=B):
  q, k, v = random_qkv(seed, batch, T, T, N, K, H, V)
  x = jax.random.normal(jax.random.key(50), (B, T, D))[:batch]
  return q, k, v, x


def _router(fa_bias=None):
  """Fresh router arrays; `fa_bias` None: a router whose choices vary with the input; else
  the last layer is zero and its bias (SA, FA) = (0, fa_bias) decides every row."""
  arrays = flux.FAMILY.init_arrays(jax.random.key(ROUTER_SEED), DIMS)
  if fa_bias is None:
    w = 3.0 * jax.random.normal(jax.random.key(100 + ROUTER_SEED), arrays["w_head3"].shape)
    return {**arrays, "w_head3": w, "b_head3": jnp.zeros(2)}
  return {**arrays, "b_head3": jnp.array([0.0, fa_bias])}


def _flux(q, k, v, x, router, **kw):
  return flux.attention(q, k, v, x=x, **{**KNOBS, "implementation": "xla", **kw}, **router)


def _branches(q, k, v, *, causal, implementation="xla"):
  sa = flux.sink_window_mask(KNOBS["num_sink"], KNOBS["window"], causal=causal)
  run = functools.partial(dot_product_attention, q, k, v, is_causal=causal)
  return run(implementation=implementation), run(mask=sa, implementation=implementation)


def _decisions(x, router, *, causal, **kw):
  pooled = flux.pooled_state(x, jnp.ones(x.shape[:2], bool), causal=causal)
  z, soft_sa = flux.decide(flux.router_logits(pooled, router), **kw)
  return jnp.broadcast_to(z, x.shape[:2]), soft_sa


def _dense_reference(q, k, v, keep):
  """Masked softmax attention written out: logits, -inf outside `keep` [T, S], softmax, P V."""
  G = N // K
  k_, v_ = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k_) / np.sqrt(H)
  logits = jnp.where(keep[None, None], logits, -jnp.inf)
  return jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(logits, axis=-1), v_)


# ------------------------------------------------------------------ eval: hard, exact


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("branch", ["fa", "sa"])
def test_eval_output_is_exactly_the_forced_branch(branch, causal):
  q, k, v, x = _inputs()
  out, aux = _flux(q, k, v, x, _router(10.0 if branch == "fa" else -10.0), is_causal=causal)
  fa, sa = _branches(q, k, v, causal=causal)
  # The same computation as the branch alone, bit for bit: no blend of the other branch.
  np.testing.assert_array_equal(np.asarray(out), np.asarray(fa if branch == "fa" else sa))
  assert float(aux.metrics["flux_sa_fraction"]) == (1.0 if branch == "sa" else 0.0)


@pytest.mark.parametrize("causal", [True, False])
def test_eval_gives_every_row_exactly_one_branch(causal):
  q, k, v, x = _inputs()
  router = _router()
  out, aux = _flux(q, k, v, x, router, is_causal=causal, implementation="xla")
  z, _ = _decisions(x, router, causal=causal, train=False)
  assert set(np.unique(np.asarray(z))) == {0.0, 1.0}  # mixed, and hard
  fa, sa = _branches(q, k, v, causal=causal)
  want = jnp.where(z[:, :, None, None] > 0.5, fa, sa)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  np.testing.assert_allclose(float(aux.metrics["flux_sa_fraction"]), 1.0 - float(jnp.mean(z)))


# ------------------------------------------------------------------ training: STE


def test_train_forward_is_the_hard_choice_and_router_gradient_the_soft_paths():
  q, k, v, x = _inputs()
  router, key = _router(), jax.random.key(1)  # a key under which both branches are chosen
  cot = jax.random.normal(jax.random.key(8), (B, T, N, V))
  fa, sa = _branches(q, k, v, causal=True)

  def loss(router):
    out, _ = _flux(q, k, v, x, router, is_causal=True, train=True, rng=key, implementation="xla")
    return jnp.sum(out * cot), out

  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(router)
  z, _ = _decisions(x, router, causal=True, train=True, rng=key)
  assert set(np.unique(np.asarray(z))) == {0.0, 1.0}
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.where(z[..., None, None], fa, sa)))

  # d loss / d z_t = Σ cot_t (FA_t − SA_t); the STE passes it to the soft probability.
  dz_BT = jnp.sum(cot * (fa - sa), axis=(2, 3))

  def surrogate(router):
    pooled = flux.pooled_state(x, jnp.ones((B, T), bool), causal=True)
    noisy = flux.router_logits(pooled, router) + jax.random.gumbel(key, (B, 1, 2))
    return jnp.sum(dz_BT * jax.nn.softmax(noisy, axis=-1)[..., flux.FA])  # tau = 1

  want = jax.grad(surrogate)(router)
  assert float(jnp.max(jnp.abs(want["w_feat1"]))) > 0.0
  for name in flux.ROUTER_PARAMS:
    assert_close(grads[name], want[name], grad=True, err_msg=name)


def test_sparsity_loss_reaches_the_router_through_the_ste():
  q, k, v, x = _inputs()
  router, key, target = _router(), jax.random.key(3), 0.9
  kw = dict(is_causal=True, train=True, rng=key, s_target=target, implementation="xla")
  loss = lambda r: _flux(q, k, v, x, r, **kw)[1].losses["flux_sparsity"]
  z, _ = _decisions(x, router, causal=True, train=True, rng=key)
  s = 1.0 - float(jnp.mean(z))
  np.testing.assert_allclose(float(loss(router)), abs(s - target) + (s - target) ** 2, rtol=1e-6)

  def surrogate(router):  # d loss / d s · d mean(soft SA) / d θ, at the hard s
    pooled = flux.pooled_state(x, jnp.ones((B, T), bool), causal=True)
    noisy = flux.router_logits(pooled, router) + jax.random.gumbel(key, (B, 1, 2))
    s_soft = jnp.mean(jax.nn.softmax(noisy, axis=-1)[..., flux.SA])
    return (np.sign(s - target) + 2.0 * (s - target)) * s_soft

  grads, want = jax.grad(loss)(router), jax.grad(surrogate)(router)
  for name in flux.ROUTER_PARAMS:
    assert_close(grads[name], want[name], grad=True, err_msg=name)


def test_gumbel_noise_follows_the_key_and_is_absent_without_one():
  q, k, v, x = _inputs()
  prob = lambda **kw: float(
    _flux(q, k, v, x, _router(), is_causal=True, **kw)[1].metrics["flux_sa_prob"]
  )  # noqa: E501
  a, again, b = (prob(train=True, rng=jax.random.key(s)) for s in (1, 1, 2))
  assert a == again and a != b
  np.testing.assert_allclose(prob(train=True, rng=None), prob(train=False), rtol=1e-6)


# ------------------------------------------------------------------ the SA branch


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
@pytest.mark.parametrize("causal", [True, False])
def test_sink_window_branch_equals_dense_reference(causal, implementation):
  q, k, v, x = _inputs()
  out, _ = _flux(q, k, v, x, {}, route="sparse", is_causal=causal, implementation=implementation)
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  near = (t - s < KNOBS["window"]) & (t - s >= 0 if causal else s - t < KNOBS["window"])
  keep = ((s < KNOBS["num_sink"]) | near) & ((s <= t) | (not causal))
  assert_close(out, _dense_reference(q, k, v, jnp.asarray(keep)))
  # Keys outside the sinks and the window of row t have no influence on it.
  row = T - 1
  outside = jnp.asarray(~keep[row])[None, :, None, None]
  k2, v2 = jnp.where(outside, 5.0 * k, k), jnp.where(outside, -v, v)
  out2, _ = _flux(q, k2, v2, x, {}, route="sparse", is_causal=causal, implementation=implementation)
  np.testing.assert_array_equal(np.asarray(out2[:, row]), np.asarray(out[:, row]))


def test_rows_block_map_lists_only_tiles_with_a_marked_row():
  rows = jnp.zeros((2, T), bool).at[1, 9].set(True)
  bmap = flux.rows_block_map(rows, T, 8, 8)
  np.testing.assert_array_equal(np.asarray(bmap.kv_counts[0, 0]), [0, 3, 0])


# ------------------------------------------------------------------ causality


def test_causal_routing_reads_only_the_prefix():
  q, k, v, x = _inputs()
  router, t = _router(), T // 2

  def row(x, k, v, causal=True):
    kw = dict(is_causal=causal, train=True, rng=jax.random.key(1), implementation="xla")
    return jnp.sum(_flux(q, k, v, x, router, **kw)[0][:, t])

  dx, dk, dv = jax.grad(row, argnums=(0, 1, 2))(x, k, v)
  for name, g in (("x", dx), ("k", dk), ("v", dv)):
    np.testing.assert_array_equal(np.asarray(g[:, t + 1 :]), 0.0, err_msg=name)
  assert float(jnp.max(jnp.abs(dx[:, : t + 1]))) > 0.0  # the router learns from the prefix
  # Bidirectional: one decision per sequence from the mean over every token (the paper's).
  dx_all = jax.grad(functools.partial(row, causal=False))(x, k, v)
  assert float(jnp.max(jnp.abs(dx_all[:, t + 1 :]))) > 0.0


def test_causal_masks_route_causally():
  routes = lambda mask: flux.routes_causally(mask, False, T, T, 8, 8)
  assert routes(Causal()) and routes(SlidingWindow(left=3)) and routes(DenseMask(np.tri(T) > 0))
  assert not routes(None) and not routes(DenseMask(np.ones((T, T), bool)))
  assert not routes(SlidingWindow(left=3, right=1))
  assert flux.routes_causally(None, True, T, T, 8, 8)


# ------------------------------------------------------------------ chunked = xla


@pytest.mark.parametrize(
  ("batch", "causal", "train"),
  [
    (1, True, False),  # one sequence: whole q tiles skip FA at eval
    (B, True, False),
    (B, True, True),
    (B, False, False),
    (B, False, True),
  ],
)
def test_chunked_equals_xla_under_mixed_routing(batch, causal, train):
  q, k, v, x = _inputs(seed=1, batch=batch)
  cot = jax.random.normal(jax.random.key(9), (batch, T, N, V))
  kw = dict(is_causal=causal, train=train, rng=jax.random.key(4) if train else None)

  def loss(impl, q, k, v, x, router):
    out, aux = _flux(q, k, v, x, router, implementation=impl, **kw)
    return jnp.sum(out * cot) + aux.losses["flux_sparsity"]

  args = (q, k, v, x, _router())
  want = jax.value_and_grad(functools.partial(loss, "xla"), argnums=(0, 1, 2, 3, 4))(*args)
  got = jax.value_and_grad(functools.partial(loss, "chunked"), argnums=(0, 1, 2, 3, 4))(*args)
  assert_close(got[0], want[0])
  for name, g, w in zip(("q", "k", "v", "x", "router"), got[1], want[1], strict=True):
    for leaf_g, leaf_w in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
      assert_close(leaf_g, leaf_w, grad=True, err_msg=name)


# ------------------------------------------------------------------ the layer and the trainer


def _model():
  cfg = ModelConfig(
    task="lm", vocab_size=11, input_len=16, dim=D, num_layers=1, num_heads=2, mlp_dim=32,
    attention=("flux",),
    knobs=(("flux", (("implementation", "xla"), ("window", 4), ("s_target", 0.25))),),
  )  # fmt: skip
  model = Transformer(cfg, rngs=nnx.Rngs(params=0))
  # A router whose soft probabilities are not saturated, so the noise shows in the metrics.
  model.blocks[0].attn.family_params["b_head3"][...] = jnp.zeros(2)
  return model


@pytest.mark.slow  # a jitted train step (~10 s on 2 cores)
def test_model_passes_train_and_a_per_step_key_and_the_trainer_logs_the_aux_loss():
  model = _model()
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 11, jnp.int32)
  batch = dict(inputs=tokens, targets=tokens, weights=jnp.ones((2, 16), jnp.float32))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  step_fn = jax.jit(functools.partial(steps.train_step, graphdef, seed=0))
  metrics = [step_fn(state, batch, step)[1] for step in (3, 3, 4)]
  for m in metrics:
    assert {"aux_loss", "aux/flux_sparsity", "flux_sa_fraction", "flux_sa_prob"} <= set(m)
    assert float(m["aux_loss"]) > 0.0
  assert float(metrics[0]["flux_sa_prob"]) == float(metrics[1]["flux_sa_prob"])  # f(seed, step)
  assert float(metrics[0]["flux_sa_prob"]) != float(metrics[2]["flux_sa_prob"])  # new noise
  # Eval: no noise, the noise-free soft probability.
  _, totals = nn.run_with_aux(model, tokens, deterministic=True)
  _, noiseless = nn.run_with_aux(model, tokens, deterministic=False, rngs=None)
  assert float(totals.metrics["flux_sa_prob"]) == float(noiseless.metrics["flux_sa_prob"])
  assert float(totals.metrics["flux_sa_prob"]) != float(metrics[0]["flux_sa_prob"])


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
  ("kw", "match"),
  [
    (dict(s_target=1.5), "s_target"),
    (dict(tau=0.0), "tau"),
    (dict(window=0), "window"),
    (dict(num_sink=-1), "num_sink"),
    (dict(lambda1=-1.0), "lambda1"),
    (dict(route="dense"), "route"),
    (dict(x=None), "pass x"),
    (dict(x=jnp.zeros((B, T, D + 1))), "w_feat1"),
    (dict(train=1), "Python bool"),
  ],
)
def test_bad_input_raises_naming_the_value(kw, match):
  q, k, v, x = _inputs()
  kw = {"x": x, **kw}
  with pytest.raises((ValueError, TypeError), match=match):
    flux.attention(q, k, v, **{**KNOBS, **kw}, **_router(4.5))


def test_non_finite_router_logits_are_never_a_silent_choice():
  logits = jnp.array([[[jnp.nan, 1.0]]], jnp.float32)
  with pytest.raises(ValueError, match="router logits are non-finite"):
    flux.decide(logits, train=False)
  z, _ = jax.jit(lambda lg: flux.decide(lg, train=False))(logits)  # traced: NaN, not a branch
  assert np.isnan(np.asarray(z)).all()
