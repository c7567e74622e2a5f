"""Runs a colab top to bottom in a fresh kernel and returns what it printed.

The kernel inherits the test's environment: the notebooks' short settings
(environment variables the tests set), tests/conftest.py's compilation cache,
and its eight fake CPU devices unless the test calls `one_device` first.
"""

import os

import nbformat
from nbclient import NotebookClient

from helpers import REPO_ROOT, xla_flags

COLABS = os.path.join(REPO_ROOT, "colabs")


def one_device(monkeypatch) -> None:
  """The kernel sees one CPU device, as on a single-chip Colab: the colabs that do not
  shard compile and step faster without the eight fake devices of tests/conftest.py."""
  monkeypatch.setenv("XLA_FLAGS", xla_flags(1))


def execute(name: str, cwd: str, edits: dict[str, str] | None = None) -> nbformat.NotebookNode:
  """Executes colabs/<name> (which must be saved without outputs) with cwd `cwd`.

  `edits` maps source text to its replacement before the run, for test-only settings the
  notebook has no variable for; each text must occur in exactly one code cell, so an
  edit that no longer applies fails instead of silently testing the long version.
  """
  notebook = nbformat.read(os.path.join(COLABS, name), as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  for cell in code:
    assert not cell.outputs and cell.execution_count is None, (
        f"{name} is saved with outputs; clear them.")
  for old, new in (edits or {}).items():
    cells = [cell for cell in code if old in cell.source]
    assert len(cells) == 1 and cells[0].source.count(old) == 1, (
        f"{name}: {old!r} must occur exactly once, in one code cell")
    cells[0].source = cells[0].source.replace(old, new)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": cwd}}).execute()
  return notebook


def printed_text(notebook) -> str:
  """Everything the code cells printed, in order."""
  return "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.outputs)


def run(name: str, cwd: str, edits: dict[str, str] | None = None) -> str:
  return printed_text(execute(name, cwd, edits))
