"""Runs a colab top to bottom in a fresh kernel and returns what it printed."""

import os

import nbformat
from nbclient import NotebookClient

from helpers import REPO_ROOT

COLABS = os.path.join(REPO_ROOT, "colabs")


def execute(name: str, cwd: str) -> nbformat.NotebookNode:
  """Executes colabs/<name> (which must be saved without outputs) with cwd `cwd`."""
  notebook = nbformat.read(os.path.join(COLABS, name), as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{name} is saved with outputs; clear them.")
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": cwd}}).execute()
  return notebook


def printed_text(notebook) -> str:
  """Everything the code cells printed, in order."""
  return "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.outputs)


def run(name: str, cwd: str) -> str:
  return printed_text(execute(name, cwd))
