"""The invariants of affine-scaled attention (arXiv 2602.23057, Eqs. 6-9; spec §9.3).

Conformance (shapes, jit, chunked vs xla, causality, GQA, masked rows) is generated from the
registry; here: α = α_ma = 1 is softmax attention exactly; the weights are [α·P + β·keep] built
by hand; rows sum to α_ma (visible N) or to α + N_vis (α_ma − α)/S (full N); weights can be
negative; the EMA update and its padding rule; gradients reach W_a and not the state; both
implementations agree under every kind of mask; bad input raises naming the value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import attention as attention_lib
from attnzoo import masks
from attnzoo.attention import dot_product_attention, registry
from attnzoo.attention.heads import affine_scaled
from pallas_kernels.block_sparse import BlockSizes
from tests.tolerances import assert_close

IMPLS = ("xla", "chunked")
TILES = {"xla": {}, "chunked": {"block_sizes": BlockSizes(8, 4)}}


def _inputs(seed=0, B=2, T=11, S=11, N=4, K=2, H=8, Hv=4, D=6):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, S, K, H))
  v = jax.random.normal(ks[2], (B, S, K, Hv))
  x = jax.random.normal(ks[3], (B, T, D))
  # Logits z = x W_a of a few units: α spans the linear part of the clip (and some clipping).
  w = 3.0 * jax.random.normal(ks[4], (D, N))
  return q, k, v, x, w


def _call(q, k, v, x, w, alpha_ma, impl, **kw):
  return affine_scaled.attention(
    q, k, v, w_alpha=w, alpha_ma=alpha_ma, x=x, implementation=impl, **TILES[impl], **kw
  )


def _alpha(x, w, phi="linear_clip"):
  z = np.einsum("btd,dn->btn", np.asarray(x, np.float64), np.asarray(w, np.float64))
  return np.clip(0.1 * z + 0.5, 0, 1) if phi == "linear_clip" else 1 / (1 + np.exp(-z))


def _softmax_weights(q, k, keep_TS):
  """P [B,N,T,S] by hand (MHA: K == N), rows with no key all zero."""
  logits = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64))
  logits = np.where(keep_TS, logits / np.sqrt(q.shape[-1]), -np.inf)
  m = np.max(logits, axis=-1, keepdims=True)
  p = np.where(keep_TS, np.exp(logits - np.where(np.isfinite(m), m, 0)), 0.0)
  return p / np.maximum(p.sum(-1, keepdims=True), 1e-300)


def test_family_is_registered_with_its_declarations():
  fam = attention_lib.get("affine_scaled")
  assert fam is affine_scaled.FAMILY
  assert fam.layer_inputs == ("x", "valid")
  arrays = fam.init_arrays(jax.random.key(0), registry.Dims(D=32, N=4, K=2, H=8, V=8))
  # ΔParams per layer = D·N (spec §9.3: L·D·H over the model); both start at zero.
  assert arrays["w_alpha"].shape == (32, 4) and arrays["alpha_ma"].shape == (4,)
  np.testing.assert_array_equal(arrays["w_alpha"], 0.0)
  np.testing.assert_array_equal(arrays["alpha_ma"], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_alpha_one_and_alpha_ma_one_is_softmax_attention_exactly(impl, causal):
  q, k, v, x, _ = _inputs()
  w = jnp.full((x.shape[-1], q.shape[2]), 100.0)
  x = jnp.abs(x) + 1.0  # z >= 600: α = clip(...) = 1 exactly, so β = (1 - 1)/N = 0
  keep = np.random.default_rng(0).random((11, 11)) < 0.6
  for mask in (None, masks.DenseMask(keep)):
    out, _ = _call(q, k, v, x, w, jnp.ones(4), impl, is_causal=causal, mask=mask)
    want = dot_product_attention(
      q, k, v, is_causal=causal, mask=mask, implementation=impl, **TILES[impl]
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_keys", ["visible", "full"])
def test_output_is_hand_built_weights_times_v(impl, n_keys):
  """out = [α P + β keep] V with β = (α_ma − α)/N_keys, on an irregular mask (MHA)."""
  q, k, v, x, w = _inputs(seed=1, T=9, S=13, N=2, K=2)
  rng = np.random.default_rng(1)
  keep = rng.random((9, 13)) < 0.5
  keep[4] = False  # a row with no key: zeros
  alpha_ma = jnp.array([0.3, 0.7])
  out, _ = _call(q, k, v, x, w, alpha_ma, impl, mask=masks.DenseMask(keep), n_keys=n_keys)

  alpha = _alpha(x, w)  # [B,T,N]
  n_vis = keep.sum(-1).astype(np.float64)  # [T]
  denom = np.maximum(n_vis, 1)[None, :, None] if n_keys == "visible" else 13.0
  beta = (np.asarray(alpha_ma, np.float64)[None, None, :] - alpha) / denom
  p = _softmax_weights(q, k, keep)
  weights = np.transpose(alpha, (0, 2, 1))[..., None] * p + np.transpose(beta, (0, 2, 1))[
    ..., None
  ] * keep.astype(np.float64)
  want = np.einsum("bnts,bsnv->btnv", weights, np.asarray(v, np.float64))
  assert_close(out, want)
  np.testing.assert_array_equal(np.asarray(out[:, 4]), 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_row_sums_equal_alpha_ma_with_visible_keys(impl):
  """v ≡ 1 reads off Σ_j w_ij = α + N_vis β = α_ma, whatever α and the mask (causal, T ≠ S)."""
  q, k, _, x, w = _inputs(seed=2, T=7, S=12)
  ones = jnp.ones((2, 12, 2, 1))
  alpha_ma = jnp.array([0.2, 0.9, 0.5, 0.0])
  for mask, causal in ((None, True), (masks.SlidingWindow(left=3), True), (None, False)):
    out, _ = _call(q, k, ones, x, w, alpha_ma, impl, mask=mask, is_causal=causal)
    assert_close(out[..., 0], np.broadcast_to(np.asarray(alpha_ma), (2, 7, 4)))


@pytest.mark.parametrize("impl", IMPLS)
def test_row_sums_with_full_length_depend_on_position_under_causality(impl):
  """N = S (the paper's Eq. 8 read literally): Σ_j w_ij = α + (i+1)(α_ma − α)/S."""
  q, k, _, x, w = _inputs(seed=3, T=9, S=9)
  alpha_ma = jnp.array([0.2, 0.9, 0.5, 0.0])
  out, _ = _call(q, k, jnp.ones((2, 9, 2, 1)), x, w, alpha_ma, impl, is_causal=True, n_keys="full")
  alpha = _alpha(x, w)
  i1 = np.arange(1, 10, dtype=np.float64)[None, :, None]
  assert_close(out[..., 0], alpha + i1 * (np.asarray(alpha_ma)[None, None, :] - alpha) / 9)


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_can_be_negative(impl):
  """Spec §9.3: N = 2, α = .8, α_ma = .4, P = (.1, .9) -> weights (−.12, .52)."""
  q = jnp.ones((1, 1, 1, 1))
  k = jnp.array([0.0, np.log(9.0)]).reshape(1, 2, 1, 1)  # scale 1/√1: P = (1/10, 9/10)
  v = jnp.eye(2).reshape(1, 2, 1, 2)  # out = the weights themselves
  x = jnp.full((1, 1, 1), 3.0)  # α = clip(0.1·3 + 0.5) = 0.8
  out, _ = _call(q, k, v, x, jnp.ones((1, 1)), jnp.array([0.4]), impl)
  assert_close(out[0, 0, 0], [-0.12, 0.52])


def test_ema_update_is_the_valid_token_mean_and_ignores_padding():
  q, k, v, x, w = _inputs(seed=4)
  valid = np.ones((2, 11), bool)
  valid[0, 8:] = False
  valid[1, 5:] = False
  alpha_ma = jnp.array([0.1, 0.4, 0.6, 0.9])
  _, aux = _call(q, k, v, x, w, alpha_ma, "xla", valid=jnp.asarray(valid), momentum=0.8)
  alpha = _alpha(x, w)
  mean = alpha[valid].mean(0)  # [N], over valid (b, t) only
  want = 0.8 * np.asarray(alpha_ma) + 0.2 * mean
  assert_close(aux.state["alpha_ma"], want)
  assert_close(aux.metrics["affine_alpha"], mean.mean())
  assert_close(aux.metrics["affine_alpha_ma"], np.mean(alpha_ma))
  # Padding tokens' inputs do not reach the new state.
  x_pad = jnp.where(jnp.asarray(valid)[..., None], x, 1e3)
  _, aux_pad = _call(q, k, v, x_pad, w, alpha_ma, "xla", valid=jnp.asarray(valid), momentum=0.8)
  np.testing.assert_array_equal(np.asarray(aux_pad.state["alpha_ma"]), aux.state["alpha_ma"])
  # No valid token: the EMA stays where it was.
  _, aux_none = _call(q, k, v, x, w, alpha_ma, "xla", valid=jnp.zeros((2, 11), bool))
  np.testing.assert_array_equal(np.asarray(aux_none.state["alpha_ma"]), alpha_ma)


def test_sigmoid_phi():
  q, k, v, x, w = _inputs(seed=5)
  _, aux = _call(q, k, v, x, w, jnp.zeros(4), "xla", phi="sigmoid", momentum=0.0)
  assert_close(aux.state["alpha_ma"], _alpha(x, w, "sigmoid").mean((0, 1)))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_reaches_w_alpha_analytically_and_not_the_state(impl):
  """dL/dW_a = Σ_bt x ⊗ [φ'(z) · <cot, softmax-attn − mean_visible(v)>] (visible N, causal)."""
  q, k, v, x, w = _inputs(seed=6, N=2, K=2)
  cot = jax.random.normal(jax.random.key(7), (2, 11, 2, 4))
  alpha_ma = jnp.array([0.3, 0.6])

  def loss(w, alpha_ma):
    out, _ = _call(q, k, v, x, w, alpha_ma, impl, is_causal=True)
    return jnp.sum(out * cot)

  g_w, g_ma = jax.grad(loss, argnums=(0, 1))(w, alpha_ma)
  np.testing.assert_array_equal(np.asarray(g_ma), 0.0)
  attn = np.asarray(dot_product_attention(q, k, v, is_causal=True, implementation="xla"))
  mean_v = np.cumsum(np.asarray(v, np.float64), axis=1) / np.arange(1, 12)[None, :, None, None]
  z = np.einsum("btd,dn->btn", np.asarray(x, np.float64), np.asarray(w, np.float64))
  dphi = np.where((z > -5) & (z < 5), 0.1, 0.0)
  d_alpha = np.sum(np.asarray(cot) * (attn - mean_v), axis=-1) * dphi
  want = np.einsum("btd,btn->dn", np.asarray(x, np.float64), d_alpha)
  assert np.abs(want).sum() > 0 and np.isfinite(np.asarray(g_w)).all()
  assert_close(g_w, want, grad=True)


@pytest.mark.parametrize(
  "setting", ["segments", "segments_causal", "window", "dense_bnts", "bias", "causal_t_gt_s"]
)
def test_chunked_matches_xla_under_every_mask(setting):
  T, S = (13, 5) if setting == "causal_t_gt_s" else (13, 13)
  q, k, v, x, w = _inputs(seed=8, T=T, S=S)
  ids = jnp.array([[0] * 5 + [1] * 6 + [2] * 2, [0] * 13])
  rng = np.random.default_rng(8)
  kw = {
    "segments": dict(segment_ids=ids),
    "segments_causal": dict(segment_ids=ids, is_causal=True),
    "window": dict(mask=masks.SlidingWindow(left=2, right=1)),
    "dense_bnts": dict(mask=jnp.asarray(rng.random((2, 4, 13, 13)) < 0.4), is_causal=True),
    "bias": dict(bias=jnp.asarray(rng.normal(size=(1, 4, 13, 13))), is_causal=True),
    "causal_t_gt_s": dict(is_causal=True),
  }[setting]
  alpha_ma = jnp.array([0.1, 0.4, 0.6, 0.9])
  cot = jax.random.normal(jax.random.key(9), (2, T, 4, 4))

  def loss(impl, n_keys, q, k, v, w):
    out = _call(q, k, v, x, w, alpha_ma, impl, n_keys=n_keys, **kw)[0]
    return jnp.sum(out * cot), out

  # Gradients under the default (the uniform-softmax mean); "full" only adds a constant count.
  grads = {
    impl: jax.jit(
      jax.grad(functools.partial(loss, impl, "visible"), argnums=(0, 1, 2, 3), has_aux=True)
    )(q, k, v, w)
    for impl in IMPLS
  }
  (got, out), (want, ref) = grads["chunked"], grads["xla"]
  assert_close(out, ref)
  for name, g, h in zip(("q", "k", "v", "w_alpha"), got, want, strict=True):
    assert_close(g, h, grad=True, err_msg=f"d{name}")
  full = {impl: loss(impl, "full", q, k, v, w)[1] for impl in IMPLS}
  assert_close(full["chunked"], full["xla"], err_msg="n_keys='full'")


@pytest.mark.parametrize(
  ("kw", "match"),
  [
    (dict(momentum=1.0), "momentum=1.0"),
    (dict(momentum=-0.1), "momentum=-0.1"),
    (dict(w_alpha=jnp.zeros((7, 4))), r"w_alpha has shape \(7, 4\)"),
    (dict(w_alpha=jnp.zeros((4, 6))), r"w_alpha has shape \(4, 6\)"),
    (dict(alpha_ma=jnp.zeros(())), r"alpha_ma has shape \(\)"),
    (dict(phi="relu"), "phi='relu'"),
    (dict(n_keys="all"), "n_keys='all'"),
    (dict(x=jnp.zeros((2, 10, 6))), r"\(2, 10, 6\)"),
    (dict(valid=jnp.ones((2, 11))), "valid must be bool"),
    (dict(implementation="pallas"), "implementation='pallas'"),
  ],
)
def test_bad_input_raises_naming_the_value(kw, match):
  q, k, v, x, w = _inputs()
  args = {**dict(w_alpha=w, alpha_ma=jnp.zeros(4), x=x), **kw}
  with pytest.raises(ValueError, match=match):
    affine_scaled.attention(q, k, v, **args)


def test_layer_carries_the_ema_through_the_seam():
  """Through `nn.Attention`: the state is a FamilyState, padding is excluded, the update is
  written by `apply_state_updates`, and the metrics arrive."""
  from flax import nnx  # noqa: PLC0415

  from attnzoo import nn  # noqa: PLC0415

  layer = nn.Attention(
    16,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    family="affine_scaled",
    is_causal=True,
    knobs={"momentum": 0.5},
    rngs=nnx.Rngs(0),
  )
  assert isinstance(layer.family_state["alpha_ma"], nn.FamilyState)
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  valid = jnp.array([[True] * 5, [True, True, False, False, False]])
  out, aux = nn.run_with_aux(layer, x, valid_BT=valid)
  assert out.shape == x.shape
  assert_close(aux.metrics["affine_alpha"], 0.5)  # W_a = 0 at init: α = φ(0) = 0.5
  nn.apply_state_updates(layer, aux.state)
  # α_ma: 0 -> 0.5·0 + 0.5·0.5.
  assert_close(layer.family_state["alpha_ma"][...], np.full(4, 0.25))
