"""What `experiments.benchmark` measures: named cases (family x implementation x mask) and peers.

Family cases come from the registry, so a family added to `attnzoo.attention.FAMILIES` is
benchmarked with no edit here. For every family, conformance setting (`conformance.cases`),
implementation and scenario the entry allows (`causal_only` -> causal; `supports_mask` -> all
three; else full and causal), a case "<family>/<implementation>:<scenario>" (later settings:
"<family>(<setting>)/...") calls the family's pure function the way the conformance suite does:
the setting's knob `options`, q/k scaled by its `input_scale`, learned and carried arrays from
`Family.init_arrays` (params are differentiated with q, k, v), the `layer_inputs` it reads ("x":
random [B,T,D]; "positions": int32 arange [B,T]; "valid": all True; "train": False and "rng":
None, i.e. inference), and only `out` of a `returns_aux` family.
Unlike the suite, each implementation runs at its default tiles: `implementation_options` size
tiles for the suite's tiny shapes. An implementation that cannot run standalone here
(`conformance.skip`; "ring" needs a multi-device mesh) is a case skipped with its reason;
"pallas" on CPU runs in the Pallas interpreter (`interpret=True` when the function takes it)
and is labelled correctness-only. Peers (jax.nn, torch SDPA / flex_attention behind the
optional `bench` extra) are written by hand below.

A case builds a `Built` call for a shape, or raises `Unavailable` with the reason (torch not
installed, ...); builders import lazily so that a missing optional piece skips one case.

Scenarios (the mask every case of a row group shares, so ratios compare like with like):
  full          no mask (`is_causal=False`).
  causal        top-left causal mask (`is_causal=True`); block-sparse paths skip empty tiles.
  neighborhood  1-D neighborhood attention, window `NEIGHBORHOOD_WINDOW` (GNA / NATTEN semantics).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from collections.abc import Callable
from typing import Any

NEIGHBORHOOD_WINDOW = 256
SCENARIOS = ("full", "causal", "neighborhood")
BASELINE = "softmax/xla:full"
INTERPRET_MAX_LEN = 2048  # the Pallas interpreter takes minutes per point beyond this
QUADRATIC_T = 16384  # beyond this, O(T^2)-time paths take minutes per point on a CPU
# Implementations that cannot run as one standalone call on one device, with the reason.
STANDALONE_SKIP = {
  "ring": "needs a multi-device mesh with a 'sequence' axis (jax.set_mesh); "
  "see tests/attention/dense/ring_multidevice.py",
}
# The growth in T each algorithm has (time, memory): the "paper" column of the speed/memory
# table. First match wins; a family not listed gets no expected exponent (blank column).
GROWTH = (
  ("softmax/xla:*", (2, 2)),
  ("softmax/*:neighborhood", (1, 1)),
  ("softmax/*", (2, 1)),
  ("linear/xla:*", (2, 2)),
  ("linear/*", (1, 1)),
)
# The cases of the speed/memory paper table (those whose paper exponents it quotes).
PAPER_CASES = (
  "softmax/xla:full",
  "softmax/chunked:full",
  "softmax/chunked:causal",
  "softmax/chunked:neighborhood",
  "softmax/pallas:causal",
  "softmax/pallas:neighborhood",
  "linear/chunked:causal",
)


def is_dense_softmax(case_name: str) -> bool:
  """Whether a case computes dense softmax attention (its model FLOPs give the % roofline)."""
  family = case_name.split("/", 1)[0].split("(", 1)[0]
  return case_name.startswith("peer:") or family == "softmax"


class Unavailable(Exception):
  """The case cannot run here; the message says why (printed, never silent)."""


@dataclasses.dataclass(frozen=True)
class Built:
  """A case at one shape: `fn(q, k, v, params, consts) -> out`.

  Attributes:
    fn: the call; q, k, v are [B,T,N,H] (torch peers: [B,N,T,H] tensors).
    params: learned arrays, differentiated with q, k, v by the forward+backward timing.
    consts: carried state and layer inputs, passed but not differentiated.
    input_scale: scale of the random q and k.
  """

  fn: Callable[..., Any]
  params: dict[str, Any] = dataclasses.field(default_factory=dict)
  consts: dict[str, Any] = dataclasses.field(default_factory=dict)
  input_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked function.

  Attributes:
    name: "<family>/<implementation>:<scenario>" or "peer:<name>:<scenario>".
    scenario: one of SCENARIOS.
    build: (B, T, N, H, dtype_name) -> Built; raises Unavailable.
    time_exponent / memory_exponent: the growth in T the algorithm should show, or None.
    reference: name of the case whose output is the correctness reference, or "".
    max_len: longest T worth running (slow interpreters, O(T^2) time on CPU).
    correctness_only: timings measure an interpreter, not a kernel; labelled as such.
    peer: a third-party implementation (not attnzoo code).
    requires: a module whose absence skips the case without starting a process.
    skip: why the case cannot run here at all ("" = it can); shown in the table.
    framework: "jax" or "torch" (how the point is timed).
  """

  name: str
  scenario: str
  build: Callable[..., Built]
  time_exponent: float | None = None
  memory_exponent: float | None = None
  reference: str = ""
  max_len: int = 1 << 30
  correctness_only: bool = False
  peer: bool = False
  requires: str = ""
  skip: str = ""
  framework: str = "jax"


# ------------------------------------------------------------------ families, from the registry


def scenarios_of(family, setting) -> tuple[str, ...]:
  """The scenarios a registered family (under one conformance setting) is benchmarked in."""
  if family.causal_only or setting.causal_only:
    return ("causal",)
  return SCENARIOS if family.supports_mask else ("full", "causal")


def growth(family: str, impl: str, scenario: str) -> tuple[float | None, float | None]:
  """The (time, memory) exponents of `GROWTH` for a case, or (None, None)."""
  for pattern, exponents in GROWTH:
    if fnmatch.fnmatchcase(f"{family}/{impl}:{scenario}", pattern):
      return exponents
  return None, None


def family_cases(name: str, family) -> list[Case]:
  """Every (setting, implementation, scenario) case of one registered family.

  Settings are `family.conformance.benchmark_cases` (its `benchmark` settings, else the
  suite's `cases`); the first keeps the plain name
  "<family>/<impl>:<scenario>", the others read "<family>(<setting>)/<impl>:<scenario>".
  """
  conf = family.conformance
  interpreted = _on_cpu()
  cases = []
  for i, (setting_name, setting) in enumerate(conf.benchmark_cases.items()):
    prefix = name if i == 0 else f"{name}({setting_name})"
    for impl in family.implementations:
      for scenario in scenarios_of(family, setting):
        time_e, mem_e = growth(name, impl, scenario)
        correctness_only = impl == "pallas" and interpreted
        max_len = 1 << 30
        if correctness_only:
          max_len = INTERPRET_MAX_LEN
        elif time_e == 2 and mem_e is not None and mem_e < 2:
          # Memory-lean O(T^2) paths never hit the memory cap; they would run for minutes.
          max_len = QUADRATIC_T
        ref = "" if impl == conf.reference else f"{prefix}/{conf.reference}:{scenario}"
        cases.append(
          Case(
            f"{prefix}/{impl}:{scenario}",
            scenario,
            _family_builder(name, setting_name, impl, scenario),
            time_e,
            mem_e,
            reference=ref,
            max_len=max_len,
            correctness_only=correctness_only,
            skip=conf.skip.get(impl, "") or STANDALONE_SKIP.get(impl, ""),
          )
        )
  return cases


def _family_builder(name: str, setting_name: str, impl: str, scenario: str):
  def build(B, T, N, H, dtype):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from attnzoo import attention  # noqa: PLC0415
    from attnzoo.attention import registry  # noqa: PLC0415

    # Looked up at build time, so an entry added in this process (a test's monkeypatch) is used.
    family = attention.get(name)
    setting = family.conformance.benchmark_cases[setting_name]
    # `implementation_options` are left out: they size tiles for the suite's tiny shapes (e.g.
    # 16x8 softmax tiles), not for a benchmark; each implementation runs at its defaults.
    shapes = registry.Dims(D=N * H, N=N, K=N, H=H, V=H)
    kwargs = {**setting.options_for(shapes), **_mask_kwargs(scenario, T)}
    dims = registry.Dims(D=N * H, N=N, K=N, H=H, V=H, knobs=family.knob_values(kwargs))
    if impl == "pallas" and _on_cpu() and "interpret" not in kwargs and _takes(family, "interpret"):
      kwargs["interpret"] = True  # the Pallas kernel only runs under the interpreter on CPU
    arrays = family.init_arrays(jax.random.key(1), dims)
    params = {n: a for n, a in arrays.items() if n in family.params}
    consts = {n: a for n, a in arrays.items() if n not in family.params}
    if "x" in family.layer_inputs:
      consts["x"] = jax.random.normal(jax.random.key(2), (B, T, N * H), jnp.float32).astype(dtype)
    if "positions" in family.layer_inputs:
      consts["positions"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if "valid" in family.layer_inputs:
      consts["valid"] = jnp.ones((B, T), jnp.bool_)
    if "train" in family.layer_inputs:  # inference; a Python bool, so not among traced consts
      kwargs["train"] = False
    if "rng" in family.layer_inputs:
      kwargs["rng"] = None

    def fn(q, k, v, params, consts):
      out = family.attention(q, k, v, implementation=impl, **kwargs, **params, **consts)
      return out[0] if family.returns_aux else out

    return Built(fn, params, consts, setting.input_scale)

  return build


def _takes(family, keyword: str) -> bool:
  try:
    return keyword in inspect.signature(family.attention).parameters
  except (TypeError, ValueError):
    return False


def _neighborhood(T: int):
  from attnzoo.masks import Neighborhood  # noqa: PLC0415

  return Neighborhood(shape=(T,), window=min(NEIGHBORHOOD_WINDOW, T))


def _mask_kwargs(scenario: str, T: int) -> dict:
  if scenario == "neighborhood":
    return dict(mask=_neighborhood(T))
  return dict(is_causal=scenario == "causal")


def _on_cpu() -> bool:
  import jax  # noqa: PLC0415

  return jax.default_backend() == "cpu"


# ------------------------------------------------------------------ peers


def _plain(fn) -> Built:
  return Built(lambda q, k, v, params, consts: fn(q, k, v))


def _jax_nn(scenario: str):
  def build(B, T, N, H, dtype):
    import jax  # noqa: PLC0415

    kwargs = {}
    if scenario == "causal":
      kwargs["is_causal"] = True
    elif scenario == "neighborhood":
      kwargs["mask"] = jax.numpy.asarray(_neighborhood(T).dense(T, T))[None, None]
    return _plain(
      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
    )

  return build


TORCH_MISSING = "torch is not installed (optional `bench` extra: pip install 'attnzoo[bench]')"


def _torch():
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    raise Unavailable(TORCH_MISSING) from None
  return torch


def _torch_sdpa(scenario: str):
  def build(B, T, N, H, dtype):
    torch = _torch()
    mask = None
    if scenario == "neighborhood":
      mask = torch.from_numpy(_neighborhood(T).dense(T, T))

    def fn(q, k, v):  # torch layout [B, N, T, H]
      return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=scenario == "causal"
      )

    return _plain(fn)

  return build


def _torch_flex(scenario: str):
  def build(B, T, N, H, dtype):
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
      keep = torch.from_numpy(_neighborhood(T).dense(T, T))

      def mask_mod(b, h, q_idx, kv_idx):
        return keep[q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cpu")
    compiled = torch.compile(flex_attention)
    return _plain(lambda q, k, v: compiled(q, k, v, block_mask=block_mask))

  return build


def peer_cases() -> list[Case]:
  cases = []
  for scenario in SCENARIOS:
    cases.append(
      Case(
        f"peer:jax.nn:{scenario}", scenario, _jax_nn(scenario), 2, 2, peer=True, max_len=QUADRATIC_T
      )
    )
    torch_peer = dict(peer=True, requires="torch", max_len=QUADRATIC_T, framework="torch")
    cases.append(
      Case(f"peer:torch-sdpa:{scenario}", scenario, _torch_sdpa(scenario), 2, 2, **torch_peer)
    )
    if scenario != "full":
      time_e = 2 if scenario == "causal" else 1
      cases.append(
        Case(
          f"peer:torch-flex:{scenario}", scenario, _torch_flex(scenario), time_e, 1, **torch_peer
        )
      )
  return cases


# ------------------------------------------------------------------ the catalogue


def all_cases() -> dict[str, Case]:
  """Every case, from the registry as it is now (cheap: nothing is built)."""
  from attnzoo import attention  # noqa: PLC0415

  cases = [c for name, fam in attention.FAMILIES.items() for c in family_cases(name, fam)]
  return {c.name: c for c in [*cases, *peer_cases()]}


def get(name: str) -> Case:
  cases = all_cases()
  try:
    return cases[name]
  except KeyError:
    raise KeyError(f"unknown benchmark case {name!r}; valid: {sorted(cases)}") from None


def default_cases() -> tuple[str, ...]:
  """Every attnzoo case: each registered family x implementation x scenario."""
  return tuple(n for n, c in all_cases().items() if not c.peer)


def default_peers() -> tuple[str, ...]:
  return tuple(n for n, c in all_cases().items() if c.peer)
