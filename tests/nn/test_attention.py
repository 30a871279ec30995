"""The attention layer: head-count settings, positions, registry lookup, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import nn
from tests import tolerances

D, N, H, B, T = 16, 4, 8, 2, 12
XLA = dict(implementation="xla")  # eager tests: the readable path is the fast one


def _x(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_weights(num_kv_heads, is_causal):
  gqa = nn.Attention(
    D,
    num_heads=N,
    num_kv_heads=num_kv_heads,
    head_dim=H,
    position="rope",
    is_causal=is_causal,
    knobs=XLA,
    rngs=nnx.Rngs(0),
  )
  mha = nn.Attention(
    D,
    num_heads=N,
    num_kv_heads=N,
    head_dim=H,
    position="rope",
    is_causal=is_causal,
    knobs=XLA,
    rngs=nnx.Rngs(1),
  )
  group = N // num_kv_heads
  mha.query.kernel[...] = gqa.query.kernel[...]
  mha.out.kernel[...] = gqa.out.kernel[...]
  # kv head j serves query heads j*G .. j*G+G-1: repeat each kv head G times.
  mha.key.kernel[...] = jnp.repeat(gqa.key.kernel[...], group, axis=1)
  mha.value.kernel[...] = jnp.repeat(gqa.value.kernel[...], group, axis=1)
  tolerances.assert_close(gqa(_x()), mha(_x()))


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(1), (1, 1, 1, H))
  k = jax.random.normal(jax.random.key(2), (1, 1, 1, H))

  def score(m, n):
    qm = nn.rope(q, jnp.array([[m]]))
    kn = nn.rope(k, jnp.array([[n]]))
    return float(jnp.sum(qm * kn))

  for shift in (1, 7, 100):
    tolerances.assert_close(score(3 + shift, 1 + shift), score(3, 1))
    tolerances.assert_close(score(0 + shift, 5 + shift), score(0, 5))
  # ... and do depend on it (the test could fail):
  assert abs(score(3, 1) - score(3, 2)) > 1e-3
  # norms are preserved (a rotation)
  tolerances.assert_close(jnp.linalg.norm(nn.rope(q, jnp.array([[9]]))), jnp.linalg.norm(q))


def test_alibi_slopes_match_the_paper():
  # Press et al. §3: 8 heads -> 1/2, 1/4, ..., 1/256.
  np.testing.assert_allclose(nn.alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-6)
  # 6 heads: the 4-head slopes, then every other slope of the 8-head sequence.
  expected = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
  np.testing.assert_allclose(nn.alibi_slopes(6), expected, rtol=1e-6)


def test_alibi_bias_penalises_distance():
  pos = jnp.arange(5)[None]
  bias = nn.alibi_bias(2, pos, pos)
  assert bias.shape == (1, 2, 5, 5)
  np.testing.assert_allclose(bias[0, 0, 2], -0.0625 * np.abs(np.arange(5) - 2), rtol=1e-6)


def test_alibi_layer_runs_and_differs_from_no_position():
  kw = dict(num_heads=N, num_kv_heads=N, head_dim=H, is_causal=True, knobs=XLA)
  plain = nn.Attention(D, position="none", rngs=nnx.Rngs(0), **kw)
  alibi = nn.Attention(D, position="alibi", rngs=nnx.Rngs(0), **kw)
  assert float(jnp.max(jnp.abs(plain(_x()) - alibi(_x())))) > 1e-4


def test_knobs_reach_the_family():
  a = nn.Attention(D, num_heads=N, num_kv_heads=N, head_dim=H, knobs=XLA, rngs=nnx.Rngs(0))
  b = nn.Attention(
    D, num_heads=N, num_kv_heads=N, head_dim=H, knobs=dict(XLA, scale=0.0), rngs=nnx.Rngs(0)
  )
  # scale 0 = uniform attention: every query gets the mean of the values.
  v = b.value(_x())
  expected = b.out(jnp.broadcast_to(v.mean(axis=1, keepdims=True), v.shape))
  tolerances.assert_close(b(_x()), expected)
  assert float(jnp.max(jnp.abs(a(_x()) - b(_x())))) > 1e-4


def test_unknown_family_lists_valid_names():
  with pytest.raises(KeyError, match="softmax"):
    nn.Attention(D, num_heads=N, num_kv_heads=N, head_dim=H, family="nope", rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(num_heads=4, num_kv_heads=3), "not divisible"),
    (dict(num_heads=4, num_kv_heads=4, position="sinusoid"), "position"),
  ],
)
def test_bad_settings_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nn.Attention(D, head_dim=H, rngs=nnx.Rngs(0), **kwargs)


def test_layer_families_cycles_pattern():
  assert nn.layer_families(("a", "b"), 4) == ("a", "b", "a", "b")
  with pytest.raises(ValueError, match="does not divide"):
    nn.layer_families(("a", "b", "c"), 4)


@pytest.mark.parametrize("gated", [False, True])
def test_mlp(gated):
  mlp = nn.MLP(D, 24, gated=gated, activation="silu", rngs=nnx.Rngs(0))
  x = _x()
  h = (
    jax.nn.silu(x @ mlp.gate.kernel[...]) * (x @ mlp.up.kernel[...])
    if gated
    else jax.nn.silu(x @ mlp.up.kernel[...])
  )
  tolerances.assert_close(mlp(x), h @ mlp.down.kernel[...])


def test_tnl_layer_resolves_the_decay_schedule_and_norms_and_gates_the_output():
  """TransNormerLLM-style layer: decay="tnl" becomes this layer's official log-decays, and
  the heads are SRMSNorm-ed over the merged heads and gated by x W_u (arXiv 2307.14995 §3)."""
  from attnzoo.attention.linear import linear, tnl  # noqa: PLC0415

  knobs = dict(decay="tnl", feature_map="silu", implementation="xla", hooks="srms_norm+output_gate")
  layers = [
    nn.Attention(
      D,
      num_heads=N,
      num_kv_heads=N,
      head_dim=H,
      family="linear",
      knobs=knobs,
      is_causal=True,
      layer=i,
      num_layers=3,
      rngs=nnx.Rngs(0),
    )
    for i in range(3)
  ]
  for i, layer in enumerate(layers):
    np.testing.assert_allclose(layer.knobs["decay"], tnl.tnl_slopes(N, i, 3), rtol=1e-6)
  assert layers[0].knobs["decay"] != layers[2].knobs["decay"]
  layer, x = layers[1], _x()
  heads = linear.attention(
    layer.query(x),
    layer.key(x),
    layer.value(x),
    decay=jnp.asarray(layer.knobs["decay"]),
    feature_map="silu",
    implementation="xla",
  )
  gate = jnp.einsum("btd,dnv->btnv", x, layer.hook_params["output_gate"]["kernel"][...])
  normed = tnl.norm_attention_output(heads, gate.reshape(heads.shape[:2] + (-1,)))
  tolerances.assert_close(layer(x), layer.out(normed.reshape(heads.shape)))
  with pytest.raises(ValueError, match="per-layer schedule"):
    linear.attention(heads, heads, heads, decay="tnl")


def test_input_hook_qk_norm_and_hook_knob_replace_the_family_default():
  """Hooks are family knobs: "qk_norm" normalises q/k heads before the family; "none" drops
  a family's default hooks; unknown names raise."""
  layer = nn.Attention(
    D, num_heads=N, num_kv_heads=2, head_dim=H, knobs=dict(XLA, hooks="qk_norm"), rngs=nnx.Rngs(0)
  )
  assert layer.hook_params["qk_norm"]["key_scale"][...].shape == (2, H)
  layer.hook_params["qk_norm"]["query_scale"][...] = jnp.full((N, H), 2.0)
  x = _x()

  def rms(t):
    return t / jnp.sqrt(jnp.mean(t * t, -1, keepdims=True) + 1e-6)

  from attnzoo.attention import dot_product_attention  # noqa: PLC0415

  heads = dot_product_attention(
    2.0 * rms(layer.query(x)), rms(layer.key(x)), layer.value(x), implementation="xla"
  )
  tolerances.assert_close(layer(x), layer.out(heads))
  with pytest.raises(ValueError, match="unknown attention hooks"):
    nn.Attention(
      D, num_heads=N, num_kv_heads=N, head_dim=H, knobs=dict(hooks="nope"), rngs=nnx.Rngs(0)
    )


def test_srms_norm_layer_has_no_scale_and_unit_rms():
  layer = nn.norm("srms", D, dtype=None, rngs=nnx.Rngs(0))
  y = layer(_x() * 5.0)
  assert not jax.tree.leaves(nnx.state(layer, nnx.Param))
  tolerances.assert_close(jnp.sqrt(jnp.mean(y * y, -1)), jnp.ones((B, T)))


def test_learned_array_shapes_may_depend_on_knobs(monkeypatch):
  """`Dims.knobs` holds the family's knobs as the call sees them (signature defaults updated
  with the layer's knobs), so a knob can size a learned array."""
  from attnzoo import attention  # noqa: PLC0415
  from attnzoo.attention import registry  # noqa: PLC0415

  def taps_attention(q, k, v, *, taps, width: int = 3, is_causal=False, implementation=None):
    assert taps.shape == (width, q.shape[2])
    return attention.dot_product_attention(q, k, v, is_causal=is_causal)

  family = registry.Family(
    name="taps",
    attention=taps_attention,
    implementations=("xla",),
    params={"taps": registry.ParamSpec(lambda d: (d.knobs["width"], d.N))},
  )
  monkeypatch.setitem(attention.FAMILIES, "taps", family)
  for knobs, width in ((None, 3), ({"width": 5}, 5)):
    layer = nn.Attention(
      D, num_heads=N, num_kv_heads=N, head_dim=H, family="taps", knobs=knobs, rngs=nnx.Rngs(0)
    )
    assert layer.family_params["taps"][...].shape == (width, N)
    assert layer(_x()).shape == (B, T, D)


def test_family_head_layout_and_own_projection_reach_the_layer(monkeypatch):
  """`Family.heads` sizes the layer's projections (here N/2 query heads, 1 key head, 2 value
  heads, value width 2H); `Family.projection` replaces the plain value projection: the layer
  creates none, creates the projection's arrays and passes what `apply` returns."""
  from attnzoo import attention  # noqa: PLC0415
  from attnzoo.attention import registry  # noqa: PLC0415

  seen = {}

  def spy(q, k, v, *, is_causal=False, implementation=None):
    seen.update(q=q.shape, k=k.shape, v=v.shape)
    return attention.dot_product_attention(q, k, v, is_causal=is_causal)

  def values_from_keys(params, x, q, k, v, dims):
    assert v is None and q is not None
    v = jnp.einsum("btkh,hv->btkv", jnp.repeat(k, dims.Kv // dims.K, axis=2), params["w"])
    return q, k, v

  family = registry.Family(
    name="layout",
    attention=spy,
    implementations=("xla",),
    heads=lambda d: d.replace(N=d.N // 2, K=1, Kv=2, V=2 * d.H),
    projection=registry.Projection(
      replaces=("v",),
      params={"w": registry.ParamSpec(lambda d: (d.H, d.V), jax.nn.initializers.normal(1.0))},
      apply=values_from_keys,
    ),
  )
  monkeypatch.setitem(attention.FAMILIES, "layout", family)
  layer = nn.Attention(
    D, num_heads=N, num_kv_heads=N, head_dim=H, family="layout", rngs=nnx.Rngs(0)
  )
  assert layer.value is None
  assert layer.query.kernel.shape == (D, N // 2, H) and layer.key.kernel.shape == (D, 1, H)
  assert layer.out.kernel.shape == (N // 2, 2 * H, D)
  assert layer.projection_params["w"][...].shape == (H, 2 * H)
  assert layer(_x()).shape == (B, T, D)
  assert seen == dict(q=(B, T, N // 2, H), k=(B, T, 1, H), v=(B, T, 2, 2 * H))


@pytest.mark.parametrize(
  "heads, match",
  [
    (lambda d: d.replace(K=3), "not a multiple of 3 key heads"),
    (lambda d: d.replace(Kv=3), "not a multiple of 3 value heads"),
  ],
)
def test_head_layout_that_does_not_divide_raises(monkeypatch, heads, match):
  from attnzoo import attention  # noqa: PLC0415
  from attnzoo.attention import registry  # noqa: PLC0415

  family = registry.Family(
    name="bad_layout",
    attention=attention.dot_product_attention,
    implementations=("xla",),
    heads=heads,
  )
  monkeypatch.setitem(attention.FAMILIES, "bad_layout", family)
  with pytest.raises(ValueError, match=match):
    nn.Attention(D, num_heads=N, num_kv_heads=N, head_dim=H, family="bad_layout", rngs=nnx.Rngs(0))


def test_projection_replacing_an_unknown_name_raises():
  from attnzoo.attention import registry  # noqa: PLC0415

  with pytest.raises(ValueError, match="not among"):
    registry.Projection(replaces=("o",), params={}, apply=lambda *a: a)
