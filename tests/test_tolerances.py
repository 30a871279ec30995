"""The tolerance rule itself: summation-order noise passes at any scale, real errors still fail."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.tolerances import assert_close, magnitude


def _ref(scale=1.0, shape=(4, 37, 16), seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _noise(ref, rel, seed=1):
  """Rounding-like noise: at most `rel` times the tensor's largest entry, on every element."""
  u = np.random.default_rng(seed).uniform(-1, 1, ref.shape).astype(np.float32)
  return ref + rel * np.abs(ref).max() * u


# ------------------------------------------------------------------------------------------------
# What must pass.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0, 1e4])
def test_noise_of_one_in_a_million_passes_at_every_scale(scale):
  ref = _ref(scale)
  assert_close(_noise(ref, 1e-6), ref)
  assert_close(_noise(ref, 1e-6), ref, grad=True)


def test_magnitude_100_noise_that_a_fixed_atol_rejects_passes():
  """The failure that motivated the rule: elements near 0 in an output of magnitude ~100."""
  ref = _ref(100.0)
  noisy = _noise(ref, 1e-6)
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(noisy, ref, atol=1e-5, rtol=1e-5)
  assert_close(noisy, ref)


def test_mixed_magnitudes_pass():
  ref = _ref() * np.logspace(-4, 2, 16, dtype=np.float32)  # columns from 1e-4 to 100
  assert_close(_noise(ref, 1e-6), ref)


def test_two_real_summation_orders_agree():
  """Sequential float32 sums vs exact sums rounded once: outputs ~±300, some near zero."""
  terms = np.random.default_rng(2).normal(size=(64, 2048)).astype(np.float32) * 10
  sequential = np.cumsum(terms, axis=1, dtype=np.float32)[:, -1]
  exact = terms.astype(np.float64).sum(1).astype(np.float32)
  assert_close(sequential, exact)


def test_all_zero_reference_uses_the_floor():
  zeros = np.zeros((8, 8), np.float32)
  assert_close(zeros + 5e-6, zeros)
  with pytest.raises(AssertionError):
    assert_close(zeros + 1e-4, zeros)


def test_matching_non_finite_entries_pass_and_do_not_set_the_scale():
  ref = _ref()
  ref[0, 0, 0], ref[0, 0, 1] = np.inf, np.nan
  assert magnitude(ref) == pytest.approx(np.abs(ref[np.isfinite(ref)]).max())
  assert_close(ref.copy(), ref)


# ------------------------------------------------------------------------------------------------
# What must fail.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True])
def test_one_percent_error_fails(grad):
  ref = _ref()
  with pytest.raises(AssertionError):
    assert_close(ref * 1.01, ref, grad=grad)


def test_bfloat16_ten_percent_error_fails():
  ref = _ref()
  assert_close(_noise(ref, 1e-3), ref, jnp.bfloat16)
  with pytest.raises(AssertionError):
    assert_close(ref * 1.1, ref, jnp.bfloat16)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_wrong_sign_in_one_element_fails(scale):
  ref = _ref(scale)
  i = np.unravel_index(np.argmin(np.abs(np.abs(ref) - 0.5 * scale)), ref.shape)  # a mid-size one
  wrong = ref.copy()
  wrong[i] = -wrong[i]
  with pytest.raises(AssertionError):
    assert_close(wrong, ref)


def test_one_wrong_element_among_mixed_magnitudes_fails():
  """An error of 1e-2 on a 1e-3 entry, beside entries of ~400: a few times the f32 tolerance."""
  ref = _ref() * np.logspace(-4, 2, 16, dtype=np.float32)
  wrong = ref.copy()
  wrong[1, 2, 3] += 1e-2
  with pytest.raises(AssertionError):
    assert_close(wrong, ref)


def test_scale_override_measures_a_slice_against_the_whole():
  whole = _ref()
  whole[..., 0] *= 100.0
  part = whole[..., 1:]  # O(1) entries of a tensor whose noise is set by the O(100) column
  noisy = _noise(part, 1e-4)
  with pytest.raises(AssertionError):
    assert_close(noisy, part)
  assert_close(noisy, part, scale=magnitude(whole))
