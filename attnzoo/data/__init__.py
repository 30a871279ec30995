"""Deterministic, resumable, offline data: byte-level text, synthetic tasks, digit images.

Every dataset is a frozen dataclass; `batch(step, batch_size, split)` is a pure
function of (seed, split, step, batch_size) (see `attnzoo.data.base` for the batch
contract). Build one by name:

    ds = attnzoo.data.get_dataset("mqar", seq_len=256, num_kv_pairs=16)
    batch = ds.batch(step, batch_size=64)          # resume = ask for the next step
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType

from attnzoo.data.base import SPLITS, Batch, Dataset
from attnzoo.data.corpora import CORPORA, Corpus, load_corpus
from attnzoo.data.images import Digits, MNIST5k
from attnzoo.data.listops import ListOps
from attnzoo.data.synthetic import MQAR, NeedleInHaystack, SelectiveCopy
from attnzoo.data.text import TextLM

DATASETS: Mapping[str, Callable[..., Dataset]] = MappingProxyType(
  {
    "stdlib": functools.partial(TextLM, corpus="stdlib"),
    "shakespeare": functools.partial(TextLM, corpus="shakespeare"),
    "mqar": MQAR,
    "selective_copy": SelectiveCopy,
    "listops": ListOps,
    "needle": NeedleInHaystack,
    "digits": Digits,
    "mnist": MNIST5k,
  }
)


def get_dataset(name: str, **kwargs) -> Dataset:
  """Builds dataset `name` with `kwargs` overriding its defaults.

  Raises KeyError (listing the valid names) for an unknown name and TypeError
  (listing the valid options) for an unknown keyword.
  """
  if name not in DATASETS:
    raise KeyError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
  ctor = DATASETS[name]
  cls = ctor.func if isinstance(ctor, functools.partial) else ctor
  fixed = ctor.keywords if isinstance(ctor, functools.partial) else {}
  options = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed]
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise TypeError(f"dataset {name!r} has no option(s) {unknown}; valid options: {options}")
  return ctor(**kwargs)


__all__ = [
  "CORPORA",
  "DATASETS",
  "MQAR",
  "SPLITS",
  "Batch",
  "Corpus",
  "Dataset",
  "Digits",
  "ListOps",
  "MNIST5k",
  "NeedleInHaystack",
  "SelectiveCopy",
  "TextLM",
  "get_dataset",
  "load_corpus",
]
