"""Softmax attention with different key and value head counts (Sigma, arXiv 2501.13629 Eq. 3).

Query head i reads key head floor(i·Kk/N) and value head floor(i·Kv/N). The reference below
gathers those heads explicitly (one per query head) and runs plain multi-head attention, so it
shares nothing with the implementations' lcm repetition.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.attention import dot_product_attention as dpa
from attnzoo.attention.dense.softmax import repeat_to_common_heads
from pallas_kernels.block_sparse import BlockSizes
from tests.tolerances import assert_close

B, T, S, H, HV = 2, 13, 17, 8, 6
TILES = {"xla": {}, "chunked": {"block_sizes": BlockSizes(8, 8)}}


def inputs(N, Kk, Kv, seed=0, t=T, s=S):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(kq, (B, t, N, H)),
    jax.random.normal(kk, (B, s, Kk, H)),
    jax.random.normal(kv, (B, s, Kv, HV)),
  )


def eq3_heads(N: int, K: int) -> np.ndarray:
  return np.array([i * K // N for i in range(N)])


def reference(q, k, v, *, is_causal=False):
  """Dense MHA on the heads Eq. 3 assigns to each query head (fp32, einsum)."""
  N = q.shape[2]
  k_BSNH = k[:, :, eq3_heads(N, k.shape[2])]
  v_BSNV = v[:, :, eq3_heads(N, v.shape[2])]
  logits = jnp.einsum("btnh,bsnh->bnts", q, k_BSNH) / np.sqrt(q.shape[-1])
  if is_causal:
    keep = np.tril(np.ones((q.shape[1], k.shape[1]), bool))
    logits = jnp.where(keep, logits, -jnp.inf)
  return jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(logits, axis=-1), v_BSNV)


def test_eq3_map_of_the_repeated_heads_is_the_nested_floor():
  # The identity the lcm repetition rests on, over every divisor pair of N = 12.
  N = 12
  divisors = [d for d in range(1, N + 1) if N % d == 0]
  for Kk in divisors:
    for Kv in divisors:
      L = np.lcm(Kk, Kv)
      k = np.arange(Kk)[None, None, :, None] * np.ones((1, 1, 1, 1))
      v = np.arange(Kv)[None, None, :, None] * np.ones((1, 1, 1, 1))
      k_rep, v_rep = repeat_to_common_heads(jnp.asarray(k), jnp.asarray(v))
      assert k_rep.shape[2] == v_rep.shape[2] == L
      read_k = np.asarray(k_rep)[0, 0, eq3_heads(N, L), 0]
      read_v = np.asarray(v_rep)[0, 0, eq3_heads(N, L), 0]
      np.testing.assert_array_equal(read_k, eq3_heads(N, Kk), err_msg=f"{Kk=} {Kv=}")
      np.testing.assert_array_equal(read_v, eq3_heads(N, Kv), err_msg=f"{Kk=} {Kv=}")


def test_equal_counts_are_gqa_unchanged():
  q, k, v = inputs(8, 2, 2)
  k_rep, v_rep = repeat_to_common_heads(k, v)
  assert k_rep is k and v_rep is v  # no copy: the GQA path is exactly the old one
  out = dpa(q, k, v, implementation="xla")
  assert_close(out, reference(q, k, v))


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
@pytest.mark.parametrize("N,Kk,Kv,is_causal", [(8, 2, 4, False), (8, 4, 2, True), (6, 2, 3, True)])
def test_forward_and_gradients_match_the_eq3_reference(implementation, N, Kk, Kv, is_causal):
  q, k, v = inputs(N, Kk, Kv, seed=N + Kk + Kv, s=T if is_causal else S)
  fn = functools.partial(
    dpa, is_causal=is_causal, implementation=implementation, **TILES[implementation]
  )
  ref = functools.partial(reference, is_causal=is_causal)
  assert_close(jax.jit(fn)(q, k, v), ref(q, k, v))
  cot = jax.random.normal(jax.random.key(7), q.shape[:3] + (HV,))

  def loss(f, q, k, v):
    return jnp.sum(f(q, k, v) * cot)

  # Jitted: one compile instead of an eager dispatch per primitive.
  got = jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2)))(q, k, v)
  for name, g, w in zip("qkv", got, want, strict=True):
    assert g.shape == w.shape
    assert_close(g, w, grad=True, err_msg=f"d{name}")


def test_values_repeated_from_fewer_heads_equal_gqa_on_those_heads():
  # Kv = 4 value heads that are copies of 2 (pairs) read exactly what GQA with 2 reads.
  q, k, v2 = inputs(8, 2, 2, seed=3)
  v4 = jnp.repeat(v2, 2, axis=2)
  assert_close(dpa(q, k, v4, implementation="xla"), dpa(q, k, v2, implementation="xla"))


@pytest.mark.slow
def test_pallas_interpret_matches_the_eq3_reference():
  q, k, v = inputs(4, 1, 2, seed=11, t=16, s=16)
  fn = functools.partial(dpa, is_causal=True, implementation="pallas", block_sizes=BlockSizes(8, 8))
  ref = functools.partial(reference, is_causal=True)
  assert_close(fn(q, k, v), ref(q, k, v))
  got = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(lambda q, k, v: jnp.sum(ref(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want, strict=True):
    assert_close(g, w, grad=True, err_msg=f"d{name}")


@pytest.mark.parametrize(
  "N,Kk,Kv,match",
  [(8, 2, 3, "value heads Kv=3"), (8, 3, 4, "kv heads K=3"), (6, 2, 4, "value heads Kv=4")],
)
def test_head_counts_that_do_not_divide_n_raise(N, Kk, Kv, match):
  q, k, v = inputs(N, Kk, Kv)
  with pytest.raises(ValueError, match=match):
    dpa(q, k, v)
