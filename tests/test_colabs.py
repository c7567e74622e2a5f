"""Colabs run top to bottom on CPU (short settings through environment variables)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = os.path.join(os.path.dirname(__file__), os.pardir, "colabs")


def _execute(name: str, cwd: str) -> nbformat.NotebookNode:
  """Runs a colab in a kernel started with the current environment."""
  notebook = nbformat.read(os.path.join(COLABS, name), as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs, f"{name} is saved with outputs; clear them."
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": cwd}}).execute()
  return notebook


def _text(notebook) -> str:
  return "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.outputs)


def test_quickstart_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("QUICKSTART_STEPS", "12")
  notebook = _execute("quickstart.ipynb", str(tmp_path))
  text = _text(notebook)
  # The query kernel [embed, heads, head_dim] is listed sharded over fsdp and tensor.
  assert "('embed', 'heads', 'head_dim')" in text and "('fsdp', 'tensor', None)" in text
  assert "logits: (1, 5, 512)" in text
  assert "step 12/12" in text


def test_moe_colab_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("MOE_COLAB_STEPS", "4")
  monkeypatch.setenv("MOE_COLAB_SMALL", "1")
  text = _text(_execute("moe.ipynb", str(tmp_path)))
  assert text.count("step 4/4") == 2  # Both runs trained.
  assert "aux-loss-free bias: final load imbalance per layer" in text
  assert "bias per MoE layer and expert" in text and "'12+34=' ->" in text
