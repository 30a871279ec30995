"""MFA / MFA-KR's own invariants (arXiv 2412.19255, Step-3 arXiv 2507.19427; spec:
shared/papers/architecture.md §3).

The conformance suite covers the attention step (it is softmax attention); here: the layer the
family's `heads` and `projection` build — MQA equivalence without the query norm, the bilinear
form of each head's scores and value-output circuit, MFA-KR's v == k at init, the cache size
the Step-3 accounting predicts, and bad knobs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import accounting, nn
from attnzoo.attention import registry
from attnzoo.attention.heads import mfa
from attnzoo.models import ModelConfig, Transformer
from tests.tolerances import assert_close

B, T, D, N = 2, 7, 32, 4


def make(family="mfa", *, position="rope", is_causal=True, seed=0, d=D, n=N, **knobs):
  """An MFA layer of the model layout (n heads of dim 8 = MHA) changed by the knobs."""
  knobs.setdefault("q_rank", 8)
  knobs.setdefault("implementation", "xla")  # eager calls: the readable path compiles fastest
  return nn.Attention(
    d,
    num_heads=n,
    num_kv_heads=n,
    head_dim=8,
    family=family,
    knobs=knobs,
    position=position,
    is_causal=is_causal,
    rngs=nnx.Rngs(seed),
  )


@nnx.jit
def call(attn, x):
  return attn(x)


def x_input(seed=1, d=D):
  return jax.random.normal(jax.random.key(seed), (B, T, d))


def projection_params(attn):
  names = [k for k in attn.family.projection.params if k in attn.projection_params]
  return {k: attn.projection_params[k][...] for k in names}


# ------------------------------------------------------------------ layout


@pytest.mark.parametrize("family", ["mfa", "mfa_kr"])
def test_layer_layout_follows_the_knobs(family):
  attn = make(family, head_dim=16, kv_heads=2, q_rank=8)
  assert (attn.dims.N, attn.dims.K, attn.dims.Kv, attn.dims.H, attn.dims.V) == (N, 2, 2, 16, 16)
  assert attn.query is None and attn.key.kernel.shape == (D, 2, 16)
  assert (attn.value is None) == (family == "mfa_kr")
  assert attn.out.kernel.shape == (N, 16, D)
  p = projection_params(attn)
  assert p["w_qa"].shape == (D, 8) and p["q_norm_scale"].shape == (8,)
  assert p["w_qb"].shape == (8, N, 16)
  assert call(attn, x_input()).shape == (B, T, D)
  assert "q_norm_scale" not in projection_params(make(family, q_rank=8, q_norm=False))
  default = make(family, q_rank=None)  # kv_heads 1, the model's head dim, q_rank D // 4
  assert (default.dims.K, default.dims.H) == (1, 8)
  assert projection_params(default)["w_qa"].shape == (D, D // 4)


# ------------------------------------------------------------------ MQA / bilinear form


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_without_query_norm_mfa_is_mqa_with_the_product_query_kernel(kv_heads):
  attn = make(head_dim=16, kv_heads=kv_heads, q_norm=False)
  mqa = nn.Attention(
    D,
    num_heads=N,
    num_kv_heads=kv_heads,
    head_dim=16,
    knobs={"implementation": "xla"},
    position="rope",
    is_causal=True,
    rngs=nnx.Rngs(5),
  )
  p = projection_params(attn)
  mqa.query.kernel[...] = jnp.einsum("dr,rnh->dnh", p["w_qa"], p["w_qb"])
  for name in ("key", "value", "out"):
    getattr(mqa, name).kernel[...] = getattr(attn, name).kernel[...]
  x = x_input()
  assert_close(call(attn, x), call(mqa, x))
  # The RMSNorm between the two query projections breaks the equivalence (Step-3's q_norm).
  normed = make(head_dim=16, kv_heads=kv_heads, q_norm=True)
  for name in ("key", "value", "out"):
    getattr(normed, name).kernel[...] = getattr(attn, name).kernel[...]
  for name in ("w_qa", "w_qb"):
    normed.projection_params[name][...] = p[name]
  assert np.abs(np.asarray(call(normed, x) - call(mqa, x))).max() > 1e-3


@pytest.mark.parametrize("family", ["mfa", "mfa_kr"])
def test_each_head_is_the_bilinear_qk_and_vo_circuit_of_explicit_d_by_d_matrices(family):
  d, n, h, r = 6, 3, 4, 2
  attn = make(
    family, position="none", is_causal=False, d=d, n=n, head_dim=h, q_rank=r, q_norm=False
  )
  if family == "mfa_kr":  # a non-trivial value map: v = k (I + M diag(α))
    attn.projection_params["kr_alpha"][...] = jnp.linspace(-1.0, 1.0, h)
  p = {k: np.asarray(a, np.float64) for k, a in projection_params(attn).items()}
  w_k = np.asarray(attn.key.kernel[...], np.float64)[:, 0]
  if family == "mfa_kr":
    w_v = w_k @ (np.eye(h) + p["kr_mix"] * p["kr_alpha"][None, :])
  else:
    w_v = np.asarray(attn.value.kernel[...], np.float64)[:, 0]
  w_o = np.asarray(attn.out.kernel[...], np.float64)
  x = np.asarray(jax.random.normal(jax.random.key(3), (1, 5, d))[0], np.float64)
  want = 0.0
  for c in range(n):
    qk_dd = p["w_qa"] @ p["w_qb"][:, c] @ w_k.T  # W_c = W_qa W_qb^c W_kᵀ  [D, D]
    vo_dd = w_v @ w_o[c]  # U_c = W_v W_o^c  [D, D]
    scores = x @ qk_dd @ x.T / np.sqrt(h)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    want = want + (weights / weights.sum(-1, keepdims=True)) @ x @ vo_dd
  assert_close(call(attn, jnp.asarray(x[None], jnp.float32))[0], want)


def test_query_norm_makes_the_query_invariant_to_the_down_projection_scale():
  x = x_input()
  for q_norm, invariant in ((True, True), (False, False)):
    attn = make(q_norm=q_norm)
    before = call(attn, x)
    attn.projection_params["w_qa"][...] = 7.0 * attn.projection_params["w_qa"][...]
    after = call(attn, x)
    if invariant:
      assert_close(after, before)
    else:
      assert np.abs(np.asarray(after - before)).max() > 1e-3


# ------------------------------------------------------------------ MFA-KR


def test_key_reuse_value_is_the_key_at_init_and_the_formula_after():
  attn = make("mfa_kr", head_dim=16, kv_heads=2)
  p = projection_params(attn)
  np.testing.assert_array_equal(np.asarray(p["kr_alpha"]), 0.0)
  x = x_input()
  k = attn.key(x)
  q, k_out, v = attn.family.projection.apply(p, x, None, k, None, attn.dims)
  np.testing.assert_array_equal(np.asarray(v), np.asarray(k))
  np.testing.assert_array_equal(np.asarray(k_out), np.asarray(k))
  assert q.shape == (B, T, N, 16)
  alpha = jax.random.normal(jax.random.key(4), (16,))
  v = mfa.key_reuse_value(k, p["kr_mix"], alpha)
  want = np.asarray(k) + np.asarray(alpha) * np.einsum("bskh,hg->bskg", k, p["kr_mix"])
  assert_close(v, want)


def test_key_reuse_layer_at_init_is_mfa_with_tied_key_and_value_and_can_leave_it():
  kr = make("mfa_kr", head_dim=16)
  tied = make("mfa", head_dim=16)
  for name in ("w_qa", "q_norm_scale", "w_qb"):
    tied.projection_params[name][...] = kr.projection_params[name][...]
  for name in ("key", "out"):
    getattr(tied, name).kernel[...] = getattr(kr, name).kernel[...]
  tied.value.kernel[...] = kr.key.kernel[...]
  x = x_input()
  np.testing.assert_array_equal(np.asarray(call(kr, x)), np.asarray(call(tied, x)))
  # α = 0 with a random M: α receives a gradient, so training can untie v from k.
  graphdef, state = nnx.split(kr)

  def loss(state):
    return jnp.sum(nnx.merge(graphdef, state)(x) ** 2)

  grads = jax.jit(jax.grad(loss))(state)
  assert np.abs(np.asarray(grads["projection_params"]["kr_alpha"][...])).max() > 0


# ------------------------------------------------------------------ decode cost


@pytest.mark.parametrize("family", ["mfa", "mfa_kr"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_built_cache_size_is_what_the_step3_accounting_predicts(family, kv_heads):
  # The Step-3 preset (61 L, 64 q heads, one K and one V head of 256) shrunk to CPU size.
  spec = dataclasses.replace(
    accounting.STEP3,
    num_layers=3,
    num_q_heads=8,
    num_kv_heads=kv_heads,
    qk_head_dim=32,
    v_head_dim=32,
  )
  if family == "mfa_kr":
    spec = dataclasses.replace(spec, shared_kv_dim=spec.qk_head_dim)
  knobs = (("head_dim", spec.qk_head_dim), ("q_rank", 16), ("kv_heads", spec.num_kv_heads))
  cfg = ModelConfig(
    task="lm",
    vocab_size=16,
    input_len=8,
    dim=64,
    num_layers=spec.num_layers,
    num_heads=spec.num_q_heads,
    attention=(family,),
    knobs=((family, knobs),),
  )
  assert cfg.head_dim == 8  # the model's own head dim; the knob widens the layers' heads
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  cached = []
  for block in model.blocks:
    attn = block.attn
    _, kv, h = attn.key.kernel.shape
    per_token = kv * h
    if attn.value is not None:  # MFA caches V too; MFA-KR derives it from the cached K
      per_token += attn.value.kernel.shape[1] * attn.value.kernel.shape[2]
    cached.append(per_token)
    assert attn.out.kernel.shape[0] == spec.num_q_heads
  assert cached == [spec.cached_elements_per_token] * spec.num_layers
  cost = accounting.decode_cost(spec, 8192)
  assert cost.kv_cache_bytes == sum(cached) * 8192 * spec.bytes_per_element


# ------------------------------------------------------------------ bad knobs


@pytest.mark.parametrize(
  "knobs,match",
  [
    (dict(kv_heads=0), "kv_heads=0"),
    (dict(kv_heads=3), "not a multiple of 3"),
    (dict(q_rank=0), "q_rank=0"),
    (dict(head_dim=-4), "head_dim=-4"),
    (dict(q_norm="rms"), "q_norm='rms'"),
  ],
)
@pytest.mark.parametrize("family", ["mfa", "mfa_kr"])
def test_bad_knobs_raise_naming_the_value(family, knobs, match):
  with pytest.raises(ValueError, match=match):
    make(family, **knobs)


def test_the_function_checks_its_knobs_too():
  q = jnp.ones((1, 3, 2, 4))
  k = jnp.ones((1, 3, 1, 4))
  with pytest.raises(ValueError, match="q_rank=2.5"):
    mfa.attention(q, k, k, q_rank=2.5)
  dims = registry.Dims(D=8, N=2, K=2, H=4, V=4, knobs={"q_rank": None})
  assert mfa.q_rank_of(dims) == 2
