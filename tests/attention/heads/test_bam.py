"""BAM soft Mixture of Attention invariants (arXiv 2408.08274; spec: architecture.md §12.3).

The conformance suite (generated from the registry, settings "default" = KV experts and
"kv_sharing") covers shapes, jit, causality, GQA, masked rows and chunked-vs-xla; here: the
mixture equals Σ_e g_e MHA_e(x) in both head layouts, identical experts equal one MHA for any
router, the z-loss, the heads rule and bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import nn
from attnzoo.attention import registry
from attnzoo.attention.heads import bam
from tests.tolerances import assert_close

B, T, D, N, K, H = 2, 7, 16, 4, 2, 8


def dense_layers(count, seed=0):
  return [
    nn.Attention(
      D,
      num_heads=N,
      num_kv_heads=K,
      head_dim=H,
      family="softmax",
      knobs={"implementation": "xla"},
      position="rope",
      is_causal=True,
      rngs=nnx.Rngs(seed + e),
    )
    for e in range(count)
  ]


def mixture_from(experts, *, share_kv, router_scale=1.0, seed=10):
  """A bam layer whose expert e is `experts[e]` (with share_kv their k/v must be equal)."""
  E = len(experts)
  layer = nn.Attention(
    D,
    num_heads=N,
    num_kv_heads=K,
    head_dim=H,
    family="bam",
    knobs={"num_experts": E, "share_kv": share_kv, "implementation": "xla"},
    position="rope",
    is_causal=True,
    rngs=nnx.Rngs(seed),
  )
  for name, axis, role in (
    ("query", 1, "q"),
    ("key", 1, "kv"),
    ("value", 1, "kv"),
    ("out", 0, "q"),
  ):
    arrays = [getattr(e, name).kernel[...] for e in experts]
    getattr(layer, name).kernel[...] = bam.stack_heads(arrays, axis, role=role, share_kv=share_kv)
  w = router_scale * jax.random.normal(jax.random.key(seed + 1), (D, E))
  layer.family_params["w_router"][...] = w
  return layer


def x_input(seed=3):
  return jax.random.normal(jax.random.key(seed), (B, T, D))


@pytest.mark.parametrize("share_kv", [False, True])
def test_identical_experts_equal_one_mha_for_any_router(share_kv):
  (dense,) = dense_layers(1)
  x = x_input()
  for scale in (0.0, 1.0, 30.0):  # uniform, mixed and nearly one-hot gates
    mixture = mixture_from([dense] * 3, share_kv=share_kv, router_scale=scale)
    assert_close(mixture(x), dense(x), err_msg=f"router scale {scale}")


@pytest.mark.parametrize("share_kv", [False, True])
def test_mixture_is_the_gate_weighted_sum_of_expert_mhas(share_kv):
  experts = dense_layers(3)
  if share_kv:  # KV sharing: one W_k, W_v for every expert
    for e in experts[1:]:
      e.key.kernel[...] = experts[0].key.kernel[...]
      e.value.kernel[...] = experts[0].value.kernel[...]
  mixture = mixture_from(experts, share_kv=share_kv)
  x = x_input(4)
  g_BTE = jax.nn.softmax(x @ mixture.family_params["w_router"][...], axis=-1)
  assert float(jnp.min(jnp.max(g_BTE, -1))) < 0.9  # the gates really mix
  want = sum(g_BTE[..., e, None] * experts[e](x) for e in range(3))
  assert_close(mixture(x), want)
  # A wrong layout (e.g. head-major heads read expert-major) gives another function.
  wrong = mixture_from(experts, share_kv=not share_kv) if not share_kv else None
  if wrong is not None:
    assert np.abs(np.asarray(wrong(x) - want)).max() > 1e-2


def test_heads_rule_stacks_experts():
  model = registry.Dims(D=D, N=N, K=K, H=H, V=H, knobs={"num_experts": 3, "share_kv": False})
  dims = bam.FAMILY.layer_dims(model)
  assert (dims.N, dims.K, dims.Kv) == (12, 6, 6)
  shared = bam.FAMILY.layer_dims(model.replace(knobs={"num_experts": 3, "share_kv": True}))
  assert (shared.N, shared.K, shared.Kv) == (12, 2, 2)
  np.testing.assert_array_equal(bam.expert_of_head(6, 3, share_kv=False), [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(bam.expert_of_head(6, 3, share_kv=True), [0, 1, 2, 0, 1, 2])


def test_z_loss_counts_valid_tokens_only():
  q = jax.random.normal(jax.random.key(0), (B, T, 2 * N, H))
  k = v = jax.random.normal(jax.random.key(1), (B, T, 2 * K, H))
  x = x_input()
  _, aux = bam.attention(q, k, v, x=x, w_router=jnp.zeros((D, 2)), implementation="xla")
  # Zero logits: logsumexp = log E at every token.
  np.testing.assert_allclose(aux.losses["attn_router_z"], np.log(2.0) ** 2, rtol=1e-6)
  np.testing.assert_allclose(aux.metrics["bam_gate_max"], 0.5, rtol=1e-6)
  w = jax.random.normal(jax.random.key(2), (D, 2))
  valid = jnp.arange(T)[None, :].repeat(B, 0) < 3
  _, aux = bam.attention(q, k, v, x=x, w_router=w, valid=valid, implementation="xla")
  lse = jax.nn.logsumexp(x[:, :3] @ w, axis=-1)
  np.testing.assert_allclose(aux.losses["attn_router_z"], jnp.mean(lse**2), rtol=1e-5)
  grad = jax.grad(
    lambda w: bam.attention(q, k, v, x=x, w_router=w, valid=valid, implementation="xla")[1].losses[
      "attn_router_z"
    ]
  )(w)
  assert float(jnp.abs(grad).sum()) > 0


def test_bad_input_names_the_value():
  q = jnp.zeros((B, T, 6, H))
  k = v = jnp.zeros((B, T, 2, H))
  x = jnp.zeros((B, T, D))
  with pytest.raises(ValueError, match="num_experts=0"):
    bam.attention(q, k, v, x=x, w_router=jnp.zeros((D, 1)), num_experts=0)
  with pytest.raises(ValueError, match="6 query heads are not a multiple of num_experts=4"):
    bam.attention(q, k, v, x=x, w_router=jnp.zeros((D, 4)), num_experts=4)
  with pytest.raises(ValueError, match=r"w_router has shape \(16, 3\), expected \(D, E\)"):
    bam.attention(q, k, v, x=x, w_router=jnp.zeros((D, 3)), num_experts=2)
