"""What `experiments.benchmark` measures: named cases (family x implementation x mask) and peers.

A case builds `fn(q, k, v) -> out` for a shape, or raises `Unavailable` with the reason (a family
module that has not landed, torch not installed, ...). Builders import lazily so that a missing
optional piece skips one case instead of the whole run.

Scenarios (the mask every case of a row group shares, so ratios compare like with like):
  full          no mask.
  causal        top-left causal mask (`is_causal=True`); block-sparse paths skip empty tiles.
  neighborhood  1-D neighborhood attention, window `NEIGHBORHOOD_WINDOW` (GNA / NATTEN semantics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

NEIGHBORHOOD_WINDOW = 256
SCENARIOS = ("full", "causal", "neighborhood")


class Unavailable(Exception):
  """The case cannot run here; the message says why (printed, never silent)."""


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked function.

  Attributes:
    name: "<family>/<implementation>:<scenario>" or "peer:<name>:<scenario>".
    scenario: one of SCENARIOS.
    build: (T, N, H, dtype_name) -> fn(q, k, v) -> out; raises Unavailable.
    time_exponent / memory_exponent: the growth in T the algorithm should show (the "paper"
      column of the speed/memory table).
    reference: name of the case whose output is the correctness reference, or "".
    max_len: longest T worth running (slow interpreters, O(T^2) time on CPU).
    correctness_only: timings measure an interpreter, not a kernel; labelled as such.
    peer: a third-party implementation (not attnzoo code).
    requires: a module whose absence skips the case without starting a process.
  """

  name: str
  scenario: str
  build: Callable[..., Callable]
  time_exponent: float
  memory_exponent: float
  reference: str = ""
  max_len: int = 1 << 30
  correctness_only: bool = False
  peer: bool = False
  requires: str = ""


# ------------------------------------------------------------------ attnzoo builders


def _mask(scenario: str, T: int):
  if scenario == "neighborhood":
    try:
      from attnzoo.masks import Neighborhood  # noqa: PLC0415
    except ImportError as e:
      raise Unavailable(f"attnzoo.masks.Neighborhood is not importable ({e})") from None
    return dict(mask=Neighborhood(shape=(T,), window=min(NEIGHBORHOOD_WINDOW, T)))
  return dict(is_causal=scenario == "causal")


def _softmax(implementation: str, scenario: str):
  def build(T, N, H, dtype):
    try:
      from attnzoo.attention import dot_product_attention  # noqa: PLC0415
    except ImportError as e:
      raise Unavailable(
        f"attnzoo.attention.dot_product_attention is not importable ({e})"
      ) from None
    kwargs = _mask(scenario, T)
    if implementation == "pallas":
      # On CPU the Pallas kernel only runs under the interpreter.
      kwargs["interpret"] = _on_cpu()
    return lambda q, k, v: dot_product_attention(q, k, v, implementation=implementation, **kwargs)

  return build


def _linear(implementation: str):
  def build(T, N, H, dtype):
    try:
      from attnzoo.attention.linear import linear  # noqa: PLC0415
    except ImportError as e:
      raise Unavailable(f"attnzoo.attention.linear is not importable yet ({e})") from None
    # The linear family runs its Pallas kernel in the interpreter on CPU by itself.
    return lambda q, k, v: linear.attention(q, k, v, is_causal=True, implementation=implementation)

  return build


def _on_cpu() -> bool:
  import jax  # noqa: PLC0415

  return jax.default_backend() == "cpu"


# ------------------------------------------------------------------ peers


def _jax_nn(scenario: str):
  def build(T, N, H, dtype):
    import jax  # noqa: PLC0415

    kwargs = {}
    if scenario == "causal":
      kwargs["is_causal"] = True
    elif scenario == "neighborhood":
      keep = _mask(scenario, T)["mask"].dense(T, T)
      kwargs["mask"] = jax.numpy.asarray(keep)[None, None]
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)

  return build


def _torch():
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    raise Unavailable(
      "torch is not installed (optional `bench` extra: pip install 'attnzoo[bench]')"
    ) from None
  return torch


def _torch_sdpa(scenario: str):
  def build(T, N, H, dtype):
    torch = _torch()
    mask = None
    if scenario == "neighborhood":
      mask = torch.from_numpy(_mask(scenario, T)["mask"].dense(T, T))

    def fn(q, k, v):  # torch layout [B, N, T, H]
      return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=scenario == "causal"
      )

    return fn

  return build


def _torch_flex(scenario: str):
  def build(T, N, H, dtype):
    torch = _torch()
    try:
      from torch.nn.attention.flex_attention import (  # noqa: PLC0415
        create_block_mask,
        flex_attention,
      )
    except ImportError as e:
      raise Unavailable(f"torch flex_attention is not available ({e})") from None
    if scenario == "causal":

      def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx
    else:
      # The same keep matrix attnzoo uses, looked up per element.
      keep = torch.from_numpy(_mask(scenario, T)["mask"].dense(T, T))

      def mask_mod(b, h, q_idx, kv_idx):
        return keep[q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cpu")
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)

  return build


# ------------------------------------------------------------------ the registry

_LINEAR = "attnzoo.attention.linear.linear"
_QUADRATIC_T = 16384  # beyond this, O(T^2)-time paths take minutes per point on a CPU


def _cases() -> dict[str, Case]:
  cases = [
    Case("softmax/xla:full", "full", _softmax("xla", "full"), 2, 2),
    Case(
      "softmax/chunked:full",
      "full",
      _softmax("chunked", "full"),
      2,
      1,
      reference="softmax/xla:full",
      max_len=_QUADRATIC_T,
    ),
    Case(
      "softmax/chunked:causal",
      "causal",
      _softmax("chunked", "causal"),
      2,
      1,
      reference="softmax/xla:causal",
      max_len=_QUADRATIC_T,
    ),
    Case(
      "softmax/chunked:neighborhood",
      "neighborhood",
      _softmax("chunked", "neighborhood"),
      1,
      1,
      reference="softmax/xla:neighborhood",
    ),
    Case(
      "softmax/pallas:causal",
      "causal",
      _softmax("pallas", "causal"),
      2,
      1,
      reference="softmax/xla:causal",
      max_len=2048,
      correctness_only=True,
    ),
    Case(
      "softmax/pallas:neighborhood",
      "neighborhood",
      _softmax("pallas", "neighborhood"),
      1,
      1,
      reference="softmax/xla:neighborhood",
      max_len=2048,
      correctness_only=True,
    ),
    Case(
      "linear/chunked:causal",
      "causal",
      _linear("chunked"),
      1,
      1,
      reference="linear/xla:causal",
      requires=_LINEAR,
    ),
    Case(
      "linear/pallas:causal",
      "causal",
      _linear("pallas"),
      1,
      1,
      reference="linear/xla:causal",
      max_len=2048,
      correctness_only=True,
      requires=_LINEAR,
    ),
    # References only (not in the default grid).
    Case("softmax/xla:causal", "causal", _softmax("xla", "causal"), 2, 2),
    Case("softmax/xla:neighborhood", "neighborhood", _softmax("xla", "neighborhood"), 2, 2),
    Case("linear/xla:causal", "causal", _linear("xla"), 2, 2, requires=_LINEAR),
  ]
  for scenario in SCENARIOS:
    cases.append(
      Case(
        f"peer:jax.nn:{scenario}",
        scenario,
        _jax_nn(scenario),
        2,
        2,
        peer=True,
        max_len=_QUADRATIC_T,
      )
    )
    cases.append(
      Case(
        f"peer:torch-sdpa:{scenario}",
        scenario,
        _torch_sdpa(scenario),
        2,
        2,
        peer=True,
        requires="torch",
        max_len=_QUADRATIC_T,
      )
    )
    if scenario != "full":
      cases.append(
        Case(
          f"peer:torch-flex:{scenario}",
          scenario,
          _torch_flex(scenario),
          2 if scenario == "causal" else 1,
          1,
          peer=True,
          requires="torch",
          max_len=_QUADRATIC_T,
        )
      )
  return {c.name: c for c in cases}


CASES: dict[str, Case] = _cases()
BASELINE = "softmax/xla:full"
DEFAULT_CASES = (
  "softmax/xla:full",
  "softmax/chunked:full",
  "softmax/chunked:causal",
  "softmax/chunked:neighborhood",
  "softmax/pallas:causal",
  "softmax/pallas:neighborhood",
  "linear/chunked:causal",
)
DEFAULT_PEERS = tuple(n for n, c in CASES.items() if c.peer)
