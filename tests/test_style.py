"""Lint and formatting are part of the suite: `ruff check` and `ruff format --check` stay clean."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff():
  exe = pathlib.Path(sys.executable).with_name("ruff")
  found = str(exe) if exe.exists() else shutil.which("ruff")
  if found is None:
    pytest.skip("ruff is not installed (it comes with the `test` extra)")
  return found


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
  result = subprocess.run([_ruff(), *args], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
