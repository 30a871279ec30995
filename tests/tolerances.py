"""The single tolerance table of the test suite.

Forward tolerances per input dtype; gradients get `GRAD_FACTOR` times as much
(they sum over more terms). A test that loosens a tolerance says why beside it.
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


def assert_close(actual, expected, dtype=jnp.float32, *, grad=False, err_msg=""):
  """`np.testing.assert_allclose` in float32 under the table's tolerance for `dtype`."""
  tol = grad_tol(dtype) if grad else fwd_tol(dtype)
  np.testing.assert_allclose(
    np.asarray(actual, np.float32), np.asarray(expected, np.float32), err_msg=err_msg, **tol
  )
