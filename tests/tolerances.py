"""The single tolerance table of the test suite, and the rule that applies it.

Tolerances are per input dtype (`FORWARD`); gradients get `GRAD_FACTOR` times as
much (they sum over more terms). `assert_close` applies one `tol` from the table
relative to the scale of the reference tensor:

    |actual - expected| <= tol * max(max|expected|, 1) + tol * |expected|   (elementwise)

Why scaled: two computation orders of the same math (chunked vs dense, a kernel
vs its reference, ring vs single device, one CPU vs another with a different
BLAS/XLA build or vector width) differ by rounding in the order of summation,
and that error grows with the magnitude of the values summed (for which the
tensor's largest entry stands in), not with 1. A fixed atol therefore fails on
outputs of magnitude ~100 on one machine and passes on another. Measured against
the tensor's own largest entry, an error means the same thing at every scale, as
in mature kernel test suites. The floor of 1
keeps an all-zero or tiny reference from demanding more than the table's atol.

What it does not do: an element much smaller than `tol * max|expected|` is not
resolved on its own (a sign flip of a 1e-4 entry next to a 100 passes). Tests of
such elements compare them exactly (masked rows, zeros) or pass them as their
own tensor. `tests/test_tolerances.py` shows that real errors still fail.

A test that loosens a tolerance says why beside it.
"""

import jax.numpy as jnp
import numpy as np

FORWARD = {
  jnp.dtype(jnp.float32): dict(atol=1e-5, rtol=1e-5),
  jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=2e-2),
  jnp.dtype(jnp.float16): dict(atol=5e-3, rtol=5e-3),
}
GRAD_FACTOR = 2.0


def fwd_tol(dtype) -> dict:
  return dict(FORWARD[jnp.dtype(dtype)])


def grad_tol(dtype) -> dict:
  return {k: v * GRAD_FACTOR for k, v in FORWARD[jnp.dtype(dtype)].items()}


def magnitude(expected) -> float:
  """max|expected| over its finite entries, floored at 1: the scale of the absolute tolerance."""
  expected = np.asarray(expected, np.float32)
  finite = np.abs(expected[np.isfinite(expected)])
  return max(float(finite.max()) if finite.size else 0.0, 1.0)


def assert_close(actual, expected, dtype=jnp.float32, *, grad=False, err_msg="", scale=None):
  """`np.testing.assert_allclose` in float32 under the table's tolerance for `dtype`.

  atol is the table's atol times `scale` (default `magnitude(expected)`: max|expected|,
  floored at 1); rtol is the table's. Pass `scale` to measure against another
  tensor's magnitude, e.g. the whole output when comparing a slice of it.
  """
  tol = grad_tol(dtype) if grad else fwd_tol(dtype)
  expected = np.asarray(expected, np.float32)
  scale = magnitude(expected) if scale is None else float(scale)
  np.testing.assert_allclose(
    np.asarray(actual, np.float32),
    expected,
    rtol=tol["rtol"],
    atol=tol["atol"] * scale,
    err_msg=f"{err_msg} (atol = {tol['atol']:g} x scale {scale:.3g})".lstrip(),
  )
