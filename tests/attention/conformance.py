"""The conformance suite every attention family and implementation subclasses.

A subclass names a registry family, an implementation and the reference to
compare against, then inherits the structural tests:

    class TestSoftmaxChunked(AttentionConformance):
      family = "softmax"
      implementation = "chunked"

Tests: output shape/dtype; jit equals eager; causality by gradient; GQA equals
MHA with repeated kv heads; fully masked rows give zeros and finite gradients;
forward and gradients against the reference (f32 and bf16); lengths that are
not tile multiples and T != S.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import attention
from tests.tolerances import assert_close


def random_qkv(seed, B, T, S, N, K, H, Hv=None, dtype=jnp.float32, scale=1.0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  Hv = H if Hv is None else Hv
  q = (scale * jax.random.normal(kq, (B, T, N, H))).astype(dtype)
  k = (scale * jax.random.normal(kk, (B, S, K, H))).astype(dtype)
  v = jax.random.normal(kv, (B, S, K, Hv)).astype(dtype)
  return q, k, v


class AttentionConformance:
  """Base class (not collected: no `Test` prefix). Override the class attributes."""

  family: ClassVar[str] = "softmax"
  implementation: ClassVar[str | None] = None
  reference_implementation: ClassVar[str] = "xla"
  # Options passed to every call (family knobs, block sizes, interpret=True, ...).
  options: ClassVar[dict[str, Any]] = {}
  # Options of the reference call; default: the same as `options` minus implementation-only ones.
  reference_options: ClassVar[dict[str, Any] | None] = None
  supports_noncausal: ClassVar[bool] = True
  supports_mask: ClassVar[bool] = True
  # Shape used by most tests: B, T, S, N, K, H, Hv. T, S deliberately not tile multiples.
  shape: ClassVar[tuple[int, ...]] = (2, 37, 45, 4, 2, 16, 8)
  # Input scale: linear attention without normalisation wants small inputs.
  input_scale: ClassVar[float] = 1.0

  # ---------------------------------------------------------------- helpers

  def attend(self, q, k, v, **kw):
    fn = attention.get(self.family).attention
    return fn(q, k, v, implementation=self.implementation, **{**self.options, **kw})

  def reference(self, q, k, v, **kw):
    fn = attention.get(self.family).attention
    opts = self.options if self.reference_options is None else self.reference_options
    return fn(q, k, v, implementation=self.reference_implementation, **{**opts, **kw})

  def inputs(self, seed=0, dtype=jnp.float32, shape=None, causal=False):
    B, T, S, N, K, H, Hv = shape or self.shape
    if causal:
      S = T
    return random_qkv(seed, B, T, S, N, K, H, Hv, dtype, self.input_scale)

  def as_mask(self, keep: np.ndarray):
    """The `mask=` argument for a bool [T, S] keep pattern (default: the array itself)."""
    return jnp.asarray(keep)

  def causal_cases(self):
    return (True,) if not self.supports_noncausal else (False, True)

  # ---------------------------------------------------------------- tests

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_shape_and_dtype(self, dtype):
    for causal in self.causal_cases():
      q, k, v = self.inputs(dtype=dtype, causal=causal)
      out = self.attend(q, k, v, is_causal=causal)
      assert out.shape == q.shape[:3] + v.shape[-1:]
      assert out.dtype == dtype
      assert np.isfinite(np.asarray(out, np.float32)).all()

  def test_jit_equals_eager(self):
    causal = self.causal_cases()[-1]
    q, k, v = self.inputs(seed=1, causal=causal)
    eager = self.attend(q, k, v, is_causal=causal)
    jitted = jax.jit(functools.partial(self.attend, is_causal=causal))(q, k, v)
    assert_close(jitted, eager)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_forward_matches_reference(self, dtype):
    for causal in self.causal_cases():
      q, k, v = self.inputs(seed=2, dtype=dtype, causal=causal)
      assert_close(
        self.attend(q, k, v, is_causal=causal),
        self.reference(q, k, v, is_causal=causal),
        dtype,
        err_msg=f"is_causal={causal}",
      )

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_gradients_match_reference(self, dtype):
    for causal in self.causal_cases():
      q, k, v = self.inputs(seed=3, dtype=dtype, causal=causal)
      cot = jax.random.normal(jax.random.PRNGKey(9), q.shape[:3] + v.shape[-1:]).astype(dtype)

      def loss(fn, q, k, v, causal=causal, cot=cot):
        return jnp.sum(fn(q, k, v, is_causal=causal).astype(jnp.float32) * cot)

      got = jax.grad(functools.partial(loss, self.attend), argnums=(0, 1, 2))(q, k, v)
      want = jax.grad(functools.partial(loss, self.reference), argnums=(0, 1, 2))(q, k, v)
      for name, g, w in zip("qkv", got, want, strict=True):
        assert_close(g, w, dtype, grad=True, err_msg=f"d{name}, is_causal={causal}")

  def test_causality_by_gradient(self):
    q, k, v = self.inputs(seed=4, causal=True)
    T = q.shape[1]
    t = T // 2

    def row(k, v):
      return jnp.sum(self.attend(q, k, v, is_causal=True)[:, t])

    dk, dv = jax.grad(row, argnums=(0, 1))(k, v)
    np.testing.assert_array_equal(np.asarray(dk[:, t + 1 :]), 0.0)
    np.testing.assert_array_equal(np.asarray(dv[:, t + 1 :]), 0.0)
    assert np.abs(np.asarray(dv[:, : t + 1])).sum() > 0

  def test_gqa_equals_mha_with_repeated_heads(self):
    for causal in self.causal_cases():
      q, k, v = self.inputs(seed=5, causal=causal)
      G = q.shape[2] // k.shape[2]
      grouped = self.attend(q, k, v, is_causal=causal)
      repeated = self.attend(
        q, jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2), is_causal=causal
      )
      assert_close(grouped, repeated)

  def test_multi_query(self):
    B, T, S, N, _, H, Hv = self.shape
    q, k, v = self.inputs(seed=6, shape=(B, T, S, N, 1, H, Hv), causal=True)
    assert_close(self.attend(q, k, v, is_causal=True), self.reference(q, k, v, is_causal=True))

  def test_fully_masked_rows_are_zero_with_finite_gradients(self):
    if not self.supports_mask:
      pytest.skip(f"the {self.family!r} family takes no mask")
    q, k, v = self.inputs(seed=7)
    T, S = q.shape[1], k.shape[1]
    keep = np.ones((T, S), bool)
    keep[3] = False
    keep[T - 1] = False
    mask = self.as_mask(keep)
    out = self.attend(q, k, v, mask=mask)
    np.testing.assert_array_equal(np.asarray(out[:, 3]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[:, T - 1]), 0.0)
    grads = jax.grad(
      lambda q, k, v: jnp.sum(self.attend(q, k, v, mask=mask) ** 2), argnums=(0, 1, 2)
    )(q, k, v)
    for g in grads:
      assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(grads[0][:, 3]), 0.0)

  @pytest.mark.parametrize("lengths", [(1, 1), (7, 129), (130, 3)])
  def test_odd_lengths(self, lengths):
    T, S = lengths
    B, _, _, N, K, H, Hv = self.shape
    for causal in self.causal_cases():
      if causal and T != S and not self.supports_mask:
        continue
      q, k, v = self.inputs(seed=8, shape=(1, T, S, N, K, H, Hv))
      assert_close(
        self.attend(q, k, v, is_causal=causal),
        self.reference(q, k, v, is_causal=causal),
        err_msg=f"{T=} {S=} {causal=}",
      )
