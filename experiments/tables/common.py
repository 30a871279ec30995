"""Shared output helpers of the paper tables: JSON, markdown, match marks, plots."""

from __future__ import annotations

import json
import os

CHECK, CROSS = "✓", "✗"


def write_json(results_dir: str, name: str, payload) -> str:
  path = os.path.join(results_dir, f"{name}.json")
  os.makedirs(results_dir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=float)
  return path


def write_markdown(results_dir: str, name: str, text: str) -> str:
  path = os.path.join(results_dir, f"{name}.md")
  os.makedirs(results_dir, exist_ok=True)
  with open(path, "w") as f:
    f.write(text if text.endswith("\n") else text + "\n")
  return path


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def pyplot():
  """matplotlib.pyplot on the Agg backend, or None (with a printed note) without the extra."""
  try:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    print("[reproduce] matplotlib is not installed (`pip install 'attnzoo[plots]'`): no plots")
    return None
  return plt
