"""Imports point down only: train -> models -> layers -> pallas_kernels; configs -> (models, train).

Scans every import statement of the library packages (module level and inside
functions) and fails on one that runs back up the stack.
"""

import ast
import os

import pytest

from helpers import REPO_ROOT

# Package -> the library packages it may import (itself included).
ALLOWED = {
    "pallas_kernels": {"pallas_kernels"},
    "layers": {"layers", "pallas_kernels"},
    "models": {"models", "layers", "pallas_kernels"},
    "train": {"train", "models", "layers", "pallas_kernels"},
    "configs": {"configs", "models", "train", "layers", "pallas_kernels"},
}


def imported_packages(path: str) -> list[tuple[int, str]]:
  """(line, top-level library package) of every import in the file at `path`."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module]
    else:
      continue
    found += [(node.lineno, name.split(".")[0]) for name in names
              if name.split(".")[0] in ALLOWED]
  return found


def library_files():
  for package in ALLOWED:
    for root, _, files in os.walk(os.path.join(REPO_ROOT, package)):
      for name in sorted(files):
        if name.endswith(".py"):
          yield package, os.path.join(root, name)


def test_imports_point_down():
  upward = [f"{os.path.relpath(path, REPO_ROOT)}:{line} imports {target}"
            for package, path in library_files()
            for line, target in imported_packages(path) if target not in ALLOWED[package]]
  assert not upward, "imports that run back up the stack:\n  " + "\n  ".join(upward)


def test_the_scan_sees_an_upward_import(tmp_path):
  """The checker itself: a layer importing train is caught, a relative import ignored."""
  bad = tmp_path / "bad.py"
  bad.write_text("import jax\nfrom train import sharding\n\ndef f():\n"
                 "  import configs.base\n  from . import x\n")
  assert imported_packages(str(bad)) == [(2, "train"), (5, "configs")]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_package_has_files(package):
  assert any(p == package for p, _ in library_files())
