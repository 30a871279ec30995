"""The conformance suite every attention family and implementation runs.

`suite(family, implementation, case)` builds the test class of one (family, implementation,
setting); `tests/attention/test_conformance.py` generates one for every registered family ×
implementation × `Family.conformance.cases` entry, so a new family joins by registration alone.
Everything family-specific comes from its registry entry: knobs per setting, per-implementation
options, learned/carried arrays (`Family.init_arrays`), layer inputs, aux results (dropped).

Tests: output shape/dtype; jit equals eager; causality by gradient; GQA equals MHA with
repeated kv heads; MQA; fully masked rows give zeros and finite gradients; forward and
gradients against the reference implementation (f32 and bf16); lengths that are not tile
multiples and T != S.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import attention, masks
from attnzoo.attention import registry
from tests.tolerances import assert_close


def random_qkv(seed, B, T, S, N, K, H, Hv=None, dtype=jnp.float32, scale=1.0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  Hv = H if Hv is None else Hv
  q = (scale * jax.random.normal(kq, (B, T, N, H))).astype(dtype)
  k = (scale * jax.random.normal(kk, (B, S, K, H))).astype(dtype)
  v = jax.random.normal(kv, (B, S, K, Hv)).astype(dtype)
  return q, k, v


def call_family(family: registry.Family, q, k, v, *, implementation, seed=0, **kw):
  """Calls `family` the way the attention layer does, from q/k/v alone: declared arrays from
  their specs (fixed seed), layer inputs synthesised from the shapes (as at eval: train=False,
  rng=None; a family's own tests cover training), aux dropped."""
  B, T, N, H = q.shape
  K, V = k.shape[2], v.shape[-1]
  dims = registry.Dims(D=N * H, N=N, K=K, H=H, V=V, knobs=family.knob_values(kw))
  arrays = family.init_arrays(jax.random.key(1000 + seed), dims)
  inputs = {
    "x": jax.random.normal(jax.random.key(2000 + seed), (B, T, N * H)).astype(q.dtype),
    "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
    "valid": jnp.ones((B, T), jnp.bool_),
    "train": False,
    "rng": None,
  }
  for name in family.layer_inputs:
    kw[name] = inputs[name]
  out = family.attention(q, k, v, implementation=implementation, **arrays, **kw)
  return out[0] if family.returns_aux else out


class AttentionConformance:
  """Base class (not collected: no `Test` prefix). `suite(...)` fills the class attributes."""

  family: ClassVar[str | registry.Family] = "softmax"
  implementation: ClassVar[str | None] = None
  # The setting's knobs (resolved per call from the shapes) and per-implementation options.
  case: ClassVar[registry.ConformanceCase] = registry.ConformanceCase()
  options: ClassVar[dict[str, Any]] = {}
  reference_options: ClassVar[dict[str, Any] | None] = None
  supports_noncausal: ClassVar[bool] = True
  # Shape used by most tests: B, T, S, N, K, H, Hv. T, S deliberately not tile multiples.
  shape: ClassVar[tuple[int, ...]] = (2, 37, 45, 4, 2, 16, 8)
  input_scale: ClassVar[float] = 1.0

  # ---------------------------------------------------------------- helpers

  @property
  def entry(self) -> registry.Family:
    return self.family if isinstance(self.family, registry.Family) else attention.get(self.family)

  @property
  def supports_mask(self) -> bool:
    return self.entry.supports_mask

  def knobs(self, q, k, v):
    dims = registry.Dims(
      D=q.shape[2] * q.shape[3], N=q.shape[2], K=k.shape[2], H=q.shape[3], V=v.shape[3]
    )
    return self.case.options_for(dims)

  def attend(self, q, k, v, **kw):
    opts = {**self.knobs(q, k, v), **self.options, **kw}
    return call_family(self.entry, q, k, v, implementation=self.implementation, **opts)

  def reference(self, q, k, v, **kw):
    opts = self.options if self.reference_options is None else self.reference_options
    opts = {**self.knobs(q, k, v), **opts, **kw}
    impl = self.entry.conformance.reference
    return call_family(self.entry, q, k, v, implementation=impl, **opts)

  def inputs(self, seed=0, dtype=jnp.float32, shape=None, causal=False):
    B, T, S, N, K, H, Hv = shape or self.shape
    if causal:
      S = T
    return random_qkv(seed, B, T, S, N, K, H, Hv, dtype, self.input_scale)

  def as_mask(self, keep: np.ndarray):
    """The `mask=` argument for a bool [T, S] keep pattern: a `DenseMask`, which every
    implementation (kernels included, as a table input) takes."""
    return masks.DenseMask(keep)

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
    q, k, v = self.inputs(seed=7)
    T, S = q.shape[1], k.shape[1]
    keep = np.ones((T, S), bool)
    keep[3] = False
    keep[T - 1] = False
    mask = self.as_mask(keep)
    if not self.supports_mask:  # a family without masks must say so, not ignore the mask
      with pytest.raises((TypeError, ValueError), match="mask"):
        self.attend(q, k, v, mask=mask)
      return
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


def suite(family: str | registry.Family, implementation: str, case: str = "default") -> type:
  """The conformance test class of `family` (a registry name or an unregistered `Family`)
  under `implementation` and setting `case` of its `Family.conformance`."""
  entry = family if isinstance(family, registry.Family) else attention.get(family)
  spec = entry.conformance
  setting = spec.cases[case]
  impl_options = dict(spec.implementation_options.get(implementation, {}))
  ref_options = dict(spec.implementation_options.get(spec.reference, {}))
  attrs = dict(
    family=entry,
    implementation=implementation,
    case=setting,
    options=impl_options,
    reference_options=ref_options,
    supports_noncausal=not (entry.causal_only or setting.causal_only),
    input_scale=setting.input_scale,
  )
  title = "".join(p.capitalize() for p in f"{entry.name}_{implementation}_{case}".split("_"))
  cls = type(f"Test{title}", (AttentionConformance,), attrs)
  return pytest.mark.slow(cls) if implementation in spec.slow else cls


def suites(family: str | registry.Family) -> dict[str, type]:
  """Every conformance class of `family`: implementations × settings, by class name.
  Implementations in `Family.conformance.skip` are left out (their reason says where they are
  tested instead, e.g. the ring on 8 virtual devices)."""
  entry = family if isinstance(family, registry.Family) else attention.get(family)
  spec = entry.conformance
  classes = [
    suite(entry, impl, case)
    for impl in entry.implementations
    if impl not in spec.skip
    for case in spec.cases
  ]
  return {cls.__name__: cls for cls in classes}
