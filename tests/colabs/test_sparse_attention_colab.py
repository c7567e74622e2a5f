"""colabs/sparse_attention.ipynb runs top to bottom on CPU (kernels interpreted)."""

from helpers import colabs as colab_runner


def test_sparse_attention_colab_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("SPARSE_COLAB_SMALL", "1")
  text = colab_runner.run("sparse_attention.ipynb", str(tmp_path))
  # Kernel vs reference: out, dq, dk, dv for each of the two masks (f32 on CPU).
  errors = [l for l in text.splitlines() if "max |kernel - reference|" in l]
  assert len(errors) == 8, text
  for line in errors:
    assert float(line.split("=")[1].split()[0]) < 1e-4, line
  # The composed mask's block map has all three tile kinds.
  line = next(l for l in text.splitlines() if l.startswith("causal & (window 24 | sink 16):"))
  assert " 0 FULL" not in line and " 0 PARTIAL" not in line and " 0 SKIP" not in line, line
  # NSA: every query reads its first and local blocks, never a block after it.
  assert "block_indices (256, 2, 4)" in text
  assert "first and local blocks always read: True" in text
  assert "no block after its query: True" in text
  # CPU: no timing table, block map build times for both targets.
  assert "the timing table needs one" in text
  assert "h100" in text and "tpu_v5e" in text and "map build" in text
