"""The house checks itself: imports follow the layer order of WORKSPACE.md, and no module
outside `attnzoo/attention` branches on a family's name."""

from __future__ import annotations

import ast
import pathlib

import pytest

from attnzoo import attention

ROOT = pathlib.Path(__file__).resolve().parents[1]
# WORKSPACE.md "Layout and import rules": each package may import those before it, never after.
ORDER = (
  "pallas_kernels",
  "attnzoo.masks",
  "attnzoo.attention",
  "attnzoo.nn",
  "attnzoo.models",
  "attnzoo.compress",
  "attnzoo.training",
  "configs",
  "experiments",
)
# Side packages: what each may import from the project (besides itself).
SIDE = {
  "attnzoo.data": (),
  "attnzoo.accounting": ("attnzoo.masks", "pallas_kernels"),
}
PACKAGES = ("pallas_kernels", "attnzoo", "configs", "experiments")


def _unit(module: str) -> str | None:
  """The layer (or side package) `module` belongs to, None for outside the project."""
  for name in (*ORDER, *SIDE):
    if module == name or module.startswith(name + "."):
      return name
  if module == "attnzoo":
    return "attnzoo"
  return None


def _modules():
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      rel = path.relative_to(ROOT).with_suffix("")
      parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
      yield ".".join(parts), path, rel.name == "__init__"


def _imports(module: str, path: pathlib.Path, is_package: bool):
  tree = ast.parse(path.read_text(), str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".")
        anchor = anchor if is_package else anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
      for alias in node.names:
        yield f"{base}.{alias.name}" if base else alias.name, node.lineno


def _allowed(importer: str, imported: str) -> bool:
  if imported == importer or imported == "attnzoo":
    return imported == importer or importer in ORDER[1:]
  if importer in SIDE:
    return imported in SIDE[importer]
  if imported in SIDE:  # data and accounting serve every layer above attention
    return importer in ORDER[ORDER.index("attnzoo.attention") :]
  return ORDER.index(imported) < ORDER.index(importer)


def test_imports_point_down_the_layer_order():
  violations = []
  for module, path, is_package in _modules():
    importer = _unit(module)
    if importer is None or importer == "attnzoo":
      continue
    for name, line in _imports(module, path, is_package):
      imported = _unit(name)
      if imported is None or imported == importer:
        continue
      if not _allowed(importer, imported):
        violations.append(f"{path.relative_to(ROOT)}:{line} ({importer}) imports {name}")
  assert not violations, "imports pointing up the layer order:\n" + "\n".join(violations)


def test_the_checker_catches_an_upward_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from attnzoo.training import train\nimport experiments.train\n")
  found = [_unit(n) for n, _ in _imports("attnzoo.nn.bad", bad, False)]
  assert found == ["attnzoo.training", "experiments"]
  assert not _allowed("attnzoo.nn", "attnzoo.training")
  assert not _allowed("attnzoo.data", "attnzoo.masks")
  assert _allowed("attnzoo.accounting", "attnzoo.masks")
  assert _allowed("attnzoo.training", "attnzoo.data")


@pytest.mark.parametrize("package", ["attnzoo/nn", "attnzoo/models", "attnzoo/training"])
def test_no_branching_on_family_names_outside_attention(package):
  """A comparison against a registered family's name outside attnzoo/attention would be a
  special case the registry seam exists to avoid."""
  names = set(attention.FAMILIES)
  hits = []
  for path in sorted((ROOT / package).rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Compare):
        consts = [
          c.value
          for c in ast.walk(node)
          if isinstance(c, ast.Constant) and isinstance(c.value, str)
        ]
        if names & set(consts):
          hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
  assert not hits, f"family-name comparisons: {hits}"
