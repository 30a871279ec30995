"""The choices every kernel entry makes the same way (`pallas_kernels._common`), on a CPU host."""

import jax.numpy as jnp
import pytest

from pallas_kernels import _common


def _resolve(interpret, backend=None):
  return _common.resolve_interpret(interpret, op="my_kernel", backend=backend)


def test_none_interprets_off_gpu_and_tpu_and_logs_once_per_call_site(caplog):
  with caplog.at_level("WARNING", logger="pallas_kernels"):
    for _ in range(3):  # one call site, three calls
      assert _common.resolve_interpret(None, op="my_kernel", backend=None) is True
    assert _common.resolve_interpret(None, op="my_kernel", backend="gpu") is True  # another
  records = [r for r in caplog.records if "my_kernel" in r.getMessage()]
  assert len(records) == 2
  assert "interpreter" in records[0].getMessage() and "test_common.py" in records[0].getMessage()


def test_true_and_false_are_honoured():
  assert _resolve(True) is True
  assert _resolve(True, backend="tpu") is True
  # An explicit backend makes False a lowering-only request (jax.export, compile checks).
  assert _resolve(False, backend="tpu") is False
  with pytest.raises(ValueError, match=r"my_kernel\(interpret=False\) needs a GPU or TPU"):
    _resolve(False)
  with pytest.raises(TypeError, match="interpret="):
    _resolve("yes")


def test_backend_default_and_choices():
  assert _common.resolve_backend(None) == _common.default_backend() == "gpu"
  assert _common.resolve_backend("tpu") == "tpu"
  with pytest.raises(ValueError, match=r"backend='cuda' must be one of \['gpu', 'tpu'\]"):
    _common.resolve_backend("cuda")


@pytest.mark.parametrize(
  "shapes, error, match",
  [
    (((2, 8, 4), (2, 8, 2, 4), (2, 8, 2, 4)), ValueError, "q must be 4-D"),
    (((2, 8, 4, 4), (3, 8, 2, 4), (3, 8, 2, 4)), ValueError, "do not match"),
    (((2, 8, 4, 4), (2, 8, 2, 8), (2, 8, 2, 4)), ValueError, "do not match"),
    (((2, 8, 4, 4), (2, 8, 3, 4), (2, 8, 3, 4)), ValueError, "N=4 query heads is not divisible"),
  ],
)
def test_check_qkv_names_the_problem(shapes, error, match):
  q, k, v = (jnp.zeros(s) for s in shapes)
  with pytest.raises(error, match=match):
    _common.check_qkv(q, k, v)
  assert _common.check_qkv(*(jnp.zeros(s) for s in ((2, 8, 4, 4), (2, 6, 2, 4), (2, 6, 2, 5)))) == (
    2,
    8,
    6,
    4,
    2,
    4,
    5,
  )
