"""RCMHA's own invariants (arXiv 2308.03429; spec §5.3): the official code ported to numpy as
the oracle, causality through the convolution, identity conv => RMHA, zero R/b/u => MHA,
relative scores that depend on i - j only, gradients, bad inputs. The shared conformance suite
runs the family with its initial arrays (identity conv, zero R/b/u); these tests use random ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jax_test_util

from attnzoo.attention import dot_product_attention, registry
from attnzoo.attention.heads import rcmha
from pallas_kernels.block_sparse import BlockSizes
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

B, N, K, H, HV = 2, 4, 2, 8, 6
# Jitted once per shape: eager dispatch of the many small ops dominates these tiny shapes.
attend = jax.jit(rcmha.attention, static_argnames=("is_causal", "implementation", "block_sizes"))
softmax = jax.jit(dot_product_attention, static_argnames=("is_causal", "implementation"))


def random_params(seed, *, N=N, H=H, V=HV, C=3, P=8, scale=0.5):
  """Random learned arrays (not the identity init), so every term is exercised."""
  ks = jax.random.split(jax.random.key(seed), 9)
  normal = lambda i, shape: scale * jax.random.normal(ks[i], shape)
  return dict(
    conv_q_kernel=normal(0, (C, H)),
    conv_q_bias=normal(1, (H,)),
    conv_k_kernel=normal(2, (C, H)),
    conv_k_bias=normal(3, (H,)),
    conv_v_kernel=normal(4, (C, V)),
    conv_v_bias=normal(5, (V,)),
    key_pos_emb=normal(6, (2 * P, N, H)),
    key_pos_bias=normal(7, (2 * P, N)),
    query_pos_bias=normal(8, (N, H)),
  )


def identity_conv(params, C=3):
  out = dict(params)
  for tag, width in (("q", H), ("k", H), ("v", HV)):
    out[f"conv_{tag}_kernel"] = jnp.zeros((C, width)).at[-1].set(1.0)
    out[f"conv_{tag}_bias"] = jnp.zeros((width,))
  return out


# ------------------------------------------------------------ the official code, in numpy


def official_conv(x_TBNH, weight_H1C, bias_H):
  """`SpatialDepthWiseConvolution.forward`: Conv1d(groups=H, padding=C-1) over
  [B·heads, H, T], last C-1 outputs dropped (torch Conv1d is a cross-correlation)."""
  T, b, n, h = x_TBNH.shape
  C = weight_H1C.shape[-1]
  x = x_TBNH.transpose(1, 2, 3, 0).reshape(b * n, h, T)
  x = np.pad(x, ((0, 0), (0, 0), (C - 1, C - 1)))
  out = np.stack(
    [np.einsum("mhc,hc->mh", x[:, :, t : t + C], weight_H1C[:, 0]) for t in range(T + C - 1)],
    axis=-1,
  )
  out = out + bias_H[None, :, None]
  out = out[:, :, : -(C - 1)] if C > 1 else out
  return out.reshape(b, n, h, T).transpose(3, 0, 1, 2)


def shift_right(x):
  """labml `shift_right`: row i moves right by i (the relative-shift trick)."""
  zero_pad = np.zeros((x.shape[0], 1, *x.shape[2:]), x.dtype)
  x_padded = np.concatenate([x, zero_pad], axis=1)
  x_padded = x_padded.reshape(x.shape[1] + 1, x.shape[0], *x.shape[2:])
  return x_padded[:-1].reshape(x.shape)


def official_rmha(q_TBNH, k_TBNH, v_TBNH, R, b, u, *, causal):
  """`RelativeMultiHeadAttention.get_scores` + `MultiHeadAttention.forward` after the
  projections (no memory, T == S), in the official 'ibhd' layout."""
  P = R.shape[0] // 2
  T, S = q_TBNH.shape[0], k_TBNH.shape[0]
  key_pos_emb, key_pos_bias = R[P - S : P + T], b[P - S : P + T]
  ac = np.einsum("ibhd,jbhd->ijbh", q_TBNH + u[None, None], k_TBNH)
  bb = np.einsum("ibhd,jhd->ijbh", q_TBNH, key_pos_emb)
  bd = shift_right(bb + key_pos_bias[None, :, None, :])[:, -S:]
  scores = (ac + bd) / np.sqrt(q_TBNH.shape[-1])
  if causal:
    keep = np.tril(np.ones((T, S), bool))[:, :, None, None]
    scores = np.where(keep, scores, -np.inf)
  attn = np.exp(scores - scores.max(axis=1, keepdims=True))
  attn = attn / attn.sum(axis=1, keepdims=True)  # softmax(dim=1): over keys j
  return np.einsum("ijbh,jbhd->ibhd", attn, v_TBNH)


def official_rcmha(q, k, v, params, *, causal):
  """Our layout in and out; conv weights converted to torch's [H, 1, C]."""
  p = {name: np.asarray(x, np.float64) for name, x in params.items()}
  t = lambda x: np.asarray(x, np.float64).transpose(1, 0, 2, 3)
  conv = {
    tag: official_conv(t(x), p[f"conv_{tag}_kernel"].T[:, None], p[f"conv_{tag}_bias"])
    for tag, x in (("q", q), ("k", k), ("v", v))
  }
  out = official_rmha(
    conv["q"],
    conv["k"],
    conv["v"],
    p["key_pos_emb"],
    p["key_pos_bias"],
    p["query_pos_bias"],
    causal=causal,
  )
  return out.transpose(1, 0, 2, 3)


# ------------------------------------------------------------ the paper's invariants


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_official_code(implementation, causal):
  """Full RCMHA (random conv, R, b, u) against the numpy port of the official module."""
  q, k, v = random_qkv(0, B, 13, 13, N, N, H, HV)
  params = random_params(1, P=16)  # the official slicing needs T + S <= 2P
  got = attend(q, k, v, is_causal=causal, implementation=implementation, **params)
  assert_close(got, official_rcmha(q, k, v, params, causal=causal))


def test_official_conv_taps_match():
  x = jax.random.normal(jax.random.key(0), (B, 11, K, H))
  kernel, bias = jax.random.normal(jax.random.key(1), (4, H)), jnp.arange(H, dtype=jnp.float32)
  got = rcmha.causal_depthwise_conv(x, kernel, bias)
  want = official_conv(
    np.asarray(x).transpose(1, 0, 2, 3), np.asarray(kernel).T[:, None], np.asarray(bias)
  )
  assert_close(got, want.transpose(1, 0, 2, 3))


def test_conv_weights_are_shared_across_heads():
  """Permuting heads commutes with the convolution (one kernel per channel, not per head)."""
  x = jax.random.normal(jax.random.key(0), (B, 9, N, H))
  kernel, bias = jax.random.normal(jax.random.key(1), (3, H)), jnp.ones((H,))
  perm = np.array([2, 0, 3, 1])
  conv = functools.partial(rcmha.causal_depthwise_conv, kernel=kernel, bias=bias)
  np.testing.assert_array_equal(np.asarray(conv(x[:, :, perm])), np.asarray(conv(x)[:, :, perm]))


@pytest.mark.parametrize("causal", [False, True])
def test_conv_is_causal_by_gradient(causal):
  """Output t reads q, k, v at steps <= t only; with is_causal=False the keys > t are read,
  but the conv itself still never reads a later step of its own input."""
  q, k, v = random_qkv(2, B, 12, 12, N, K, H, HV)
  params = random_params(3)
  t = 6

  def row(q, k, v):
    return jnp.sum(attend(q, k, v, is_causal=causal, implementation="xla", **params)[:, t])

  dq, dk, dv = jax.jit(jax.grad(row, argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_array_equal(np.asarray(dq[:, t + 1 :]), 0.0)
  assert np.abs(np.asarray(dq[:, t - 2 : t + 1])).min(axis=(0, 2, 3)).all() > 0  # taps t-2..t
  if causal:
    np.testing.assert_array_equal(np.asarray(dk[:, t + 1 :]), 0.0)
    np.testing.assert_array_equal(np.asarray(dv[:, t + 1 :]), 0.0)
  assert np.abs(np.asarray(dk[:, : t + 1])).sum() > 0
  assert np.abs(np.asarray(dv[:, : t + 1])).sum() > 0

  x = jax.random.normal(jax.random.key(4), (B, 12, K, H))
  dx = jax.grad(
    lambda x: jnp.sum(
      rcmha.causal_depthwise_conv(x, params["conv_k_kernel"], params["conv_k_bias"])[:, t]
    )
  )(x)
  np.testing.assert_array_equal(np.asarray(dx[:, t + 1 :]), 0.0)
  np.testing.assert_array_equal(np.asarray(dx[:, : t - 2]), 0.0)  # kernel size 3: taps t-2..t


def rmha(q, k, v, params, causal):
  """Relative attention without the conv: scores ((q+u)·k + q·R + b)/√H through softmax."""
  rel = rcmha.relative_bias(q, params["key_pos_emb"], params["key_pos_bias"], k.shape[1])
  return softmax(
    q + params["query_pos_bias"][None, None],
    k,
    v,
    bias=rel / np.sqrt(H),
    is_causal=causal,
    implementation="xla",
  )


@pytest.mark.parametrize("causal", [False, True])
def test_identity_kernel_is_rmha(causal):
  q, k, v = random_qkv(5, B, 10, 10, N, K, H, HV)
  params = identity_conv(random_params(6))
  got = attend(q, k, v, is_causal=causal, implementation="xla", **params)
  assert_close(got, rmha(q, k, v, params, causal))
  # The identity taps make the conv exactly the identity, not approximately.
  np.testing.assert_array_equal(
    np.asarray(rcmha.causal_depthwise_conv(k, params["conv_k_kernel"], params["conv_k_bias"])),
    np.asarray(k),
  )


def test_identity_kernel_with_nonzero_taps_is_not_rmha():
  """The test above can fail: any non-identity tap changes the output."""
  q, k, v = random_qkv(5, B, 10, 10, N, K, H, HV)
  params = identity_conv(random_params(6))
  params["conv_v_kernel"] = params["conv_v_kernel"].at[0, 0].set(0.1)
  got = attend(q, k, v, is_causal=True, implementation="xla", **params)
  assert np.abs(np.asarray(got - rmha(q, k, v, params, True))).max() > 1e-3


@pytest.mark.parametrize("shape", [(9, 9), (12, 5)])
def test_zero_relative_params_is_plain_mha_after_the_conv(shape):
  T, S = shape
  q, k, v = random_qkv(7, B, T, S, N, K, H, HV)
  params = random_params(8)
  for name in ("key_pos_emb", "key_pos_bias", "query_pos_bias"):
    params[name] = jnp.zeros_like(params[name])
  conv = lambda x, tag: rcmha.causal_depthwise_conv(
    x, params[f"conv_{tag}_kernel"], params[f"conv_{tag}_bias"]
  )
  for causal in (False, True):
    got = attend(q, k, v, is_causal=causal, implementation="xla", **params)
    want = softmax(conv(q, "q"), conv(k, "k"), conv(v, "v"), is_causal=causal, implementation="xla")
    assert_close(got, want, err_msg=f"{causal=}")


def test_fresh_layer_is_plain_softmax():
  """The registry's initial arrays (identity taps, zero R/b/u) give softmax attention."""
  q, k, v = random_qkv(9, B, 11, 11, N, K, H, HV)
  dims = registry.Dims(D=N * H, N=N, K=K, H=H, V=HV, knobs=rcmha.FAMILY.knob_values())
  arrays = rcmha.FAMILY.init_arrays(jax.random.key(0), dims)
  assert arrays["key_pos_emb"].shape == (2 * rcmha.MAX_DISTANCE, N, H)
  assert arrays["conv_v_kernel"].shape == (rcmha.KERNEL_SIZE, HV)
  got = attend(q, k, v, is_causal=True, implementation="xla", **arrays)
  assert_close(got, softmax(q, k, v, is_causal=True, implementation="xla"))


# ------------------------------------------------------------ relative positions


@pytest.mark.parametrize("shape", [(6, 6), (5, 11), (11, 4), (13, 15)])
def test_relative_bias_is_the_explicit_gather(shape):
  """q_i·R_{row(i-j)} + b_{row(i-j)} entry by entry, rows P - clip(i - j, -(P-1), P); the
  last shape exceeds P = 4 both ways, so clipping is exercised."""
  T, S = shape
  P = 4
  q = np.asarray(jax.random.normal(jax.random.key(0), (B, T, N, H)))
  params = random_params(1, P=P)
  R, b = np.asarray(params["key_pos_emb"]), np.asarray(params["key_pos_bias"])
  want = np.zeros((B, N, T, S))
  for i in range(T):
    for j in range(S):
      row = P - min(max(i - j, -(P - 1)), P)
      want[:, :, i, j] = np.einsum("bnh,nh->bn", q[:, i], R[row]) + b[row]
  got = rcmha.relative_bias(jnp.asarray(q), params["key_pos_emb"], params["key_pos_bias"], S)
  assert_close(got, want)


def test_relative_bias_matches_the_shift_trick():
  """The official `shift_right` construction gives the same [T, S] bias (T == S, T + S <= 2P)."""
  T, P = 7, 8
  q = np.asarray(jax.random.normal(jax.random.key(0), (B, T, N, H)))
  params = random_params(2, P=P)
  R, b = np.asarray(params["key_pos_emb"]), np.asarray(params["key_pos_bias"])
  bb = np.einsum("ibhd,jhd->ijbh", q.transpose(1, 0, 2, 3), R[P - T : P + T])
  bd = shift_right(bb + b[P - T : P + T][None, :, None, :])[:, -T:]
  got = rcmha.relative_bias(jnp.asarray(q), params["key_pos_emb"], params["key_pos_bias"], T)
  assert_close(got, bd.transpose(2, 3, 0, 1))


def test_relative_scores_depend_only_on_the_offset():
  """With one query vector at every position the relative term is Toeplitz, and prepending o
  steps shifts it along the diagonal unchanged."""
  T, S, o = 9, 11, 3
  q_vec = jax.random.normal(jax.random.key(0), (B, 1, N, H))
  params = random_params(3, P=16)
  bias = lambda T, S: rcmha.relative_bias(
    jnp.broadcast_to(q_vec, (B, T, N, H)), params["key_pos_emb"], params["key_pos_bias"], S
  )
  short, long = np.asarray(bias(T, S)), np.asarray(bias(T + o, S + o))
  np.testing.assert_array_equal(short[:, :, 1:, 1:], short[:, :, :-1, :-1])
  np.testing.assert_array_equal(long[:, :, o:, o:], short)
  assert np.abs(short[:, :, 0, 1:] - short[:, :, 0, :-1]).max() > 0  # depends on i - j at all


def test_gqa_equals_mha_with_repeated_kv_heads_under_random_params():
  q, k, v = random_qkv(10, B, 10, 10, N, K, H, HV)
  params = random_params(11)
  G = N // K
  for causal in (False, True):
    grouped = attend(q, k, v, is_causal=causal, implementation="xla", **params)
    repeated = attend(q, k.repeat(G, axis=2), v.repeat(G, axis=2), is_causal=causal, **params)
    assert_close(grouped, repeated)


# ------------------------------------------------------------ implementations and gradients


@pytest.mark.parametrize("shape", [(13, 13), (7, 20)])
def test_chunked_matches_xla_under_random_params(shape):
  T, S = shape
  q, k, v = random_qkv(12, B, T, S, N, K, H, HV)
  params = random_params(13, P=6)  # T + S > 2P: clipped distances
  cot = jax.random.normal(jax.random.key(14), (B, T, N, HV))
  for causal in (False, True) if T == S else (False,):

    def loss(q, k, v, params, impl, causal=causal):
      extra = {"block_sizes": BlockSizes(8, 8)} if impl == "chunked" else {}
      out = attend(q, k, v, is_causal=causal, implementation=impl, **params, **extra)
      return jnp.sum(out * cot), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
    (g_chunked, out_chunked), (g_xla, out_xla) = (
      grad(q, k, v, params, "chunked"),
      grad(q, k, v, params, "xla"),
    )
    assert_close(out_chunked, out_xla)
    for got, want in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_xla), strict=True):
      assert_close(got, want, grad=True, err_msg=f"{causal=}")


def test_gradients_of_learned_arrays_are_finite_and_nonzero():
  """From the layer's starting point (identity taps, zero R/b/u): every array learns."""
  q, k, v = random_qkv(15, B, 10, 10, N, K, H, HV)
  dims = registry.Dims(D=N * H, N=N, K=K, H=H, V=HV, knobs=rcmha.FAMILY.knob_values())
  arrays = rcmha.FAMILY.init_arrays(jax.random.key(0), dims)
  cot = jax.random.normal(jax.random.key(1), (B, 10, N, HV))
  grads = jax.grad(
    lambda p: jnp.sum(attend(q, k, v, is_causal=True, implementation="xla", **p) * cot)
  )(arrays)
  for name, g in grads.items():
    g = np.asarray(g)
    assert np.isfinite(g).all(), name
    assert np.abs(g).max() > 0, name
  # Distances 0..9 are visible causally: exactly their rows P - d get gradient.
  touched = np.flatnonzero(np.abs(np.asarray(grads["key_pos_bias"])).sum(axis=1))
  P = rcmha.MAX_DISTANCE
  np.testing.assert_array_equal(touched, np.arange(P - 9, P + 1))


def test_gradients_match_finite_differences():
  q, k, v = random_qkv(16, 1, 5, 5, 2, 1, 4, 3)
  params = random_params(17, N=2, H=4, V=3, P=3)

  def f(q, k, v, emb, conv_q, conv_v):
    p = dict(params, key_pos_emb=emb, conv_q_kernel=conv_q, conv_v_kernel=conv_v)
    return attend(q, k, v, is_causal=True, implementation="xla", **p)

  args = (q, k, v, params["key_pos_emb"], params["conv_q_kernel"], params["conv_v_kernel"])
  # The family computes in fp32 whatever the input dtype, so the check runs in fp32 with
  # check_grads' own fp32 gradient tolerance (central differences, eps 1e-2).
  jax_test_util.check_grads(jax.jit(f), args, order=1, modes=("rev",), eps=1e-2)


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
  "name, value, match",
  [
    ("conv_q_kernel", jnp.zeros((0, H)), "kernel size 0"),
    ("conv_k_kernel", jnp.zeros((5, H)), "kernel size 5 but conv_q_kernel has 3"),
    ("conv_v_kernel", jnp.zeros((3, H)), r"\[kernel_size, 6\]"),
    ("conv_v_bias", jnp.zeros((H,)), r"must be \(6,\)"),
    ("key_pos_emb", jnp.zeros((0, N, H)), "max_distance=0"),
    ("key_pos_emb", jnp.zeros((7, N, H)), "max_distance=3.5"),
    ("key_pos_emb", jnp.zeros((16, K, H)), "per query head"),
    ("key_pos_bias", jnp.zeros((12, N)), r"must be \(16, 4\)"),
    ("query_pos_bias", jnp.zeros((N, H + 1)), r"must be \(4, 8\)"),
  ],
)
def test_bad_input_names_the_value(name, value, match):
  q, k, v = random_qkv(0, 1, 4, 4, N, K, H, HV)
  params = dict(random_params(0), **{name: value})
  with pytest.raises(ValueError, match=match):
    attend(q, k, v, **params)


def test_unknown_implementation_raises():
  q, k, v = random_qkv(0, 1, 4, 4, N, K, H, HV)
  with pytest.raises(ValueError, match="'pallas' is not one of"):
    attend(q, k, v, implementation="pallas", **random_params(0))


def test_kernel_size_and_max_distance_are_knobs_that_size_the_layers_arrays():
  from flax import nnx  # noqa: PLC0415

  from attnzoo import nn  # noqa: PLC0415

  knobs = dict(kernel_size=4, max_distance=16, implementation="xla")
  layer = nn.Attention(
    32, num_heads=4, num_kv_heads=2, head_dim=8, family="rcmha", knobs=knobs, rngs=nnx.Rngs(0)
  )
  assert layer.family_params["conv_q_kernel"][...].shape == (4, 8)
  assert layer.family_params["key_pos_emb"][...].shape == (32, 4, 8)
  x = jax.random.normal(jax.random.key(0), (2, 10, 32))
  assert layer(x).shape == x.shape
  arrays = {k: v[...] for k, v in layer.family_params.items() if not k.startswith("__")}
  q = k = v = jnp.ones((1, 5, 4, 8))
  with pytest.raises(ValueError, match="kernel_size=3"):
    rcmha.attention(q, k, v, **arrays, kernel_size=3, max_distance=16)
