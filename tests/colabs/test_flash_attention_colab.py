"""colabs/flash_attention.ipynb runs top to bottom on CPU (kernels interpreted)."""

from helpers import colabs as colab_runner


def test_flash_attention_colab_runs(tmp_path):
  text = colab_runner.run("flash_attention.ipynb", str(tmp_path))
  for name in ("out", "dq", "dk", "dv"):
    line = next(l for l in text.splitlines() if l.startswith(f"{name}: max"))
    assert float(line.split("=")[1].split()[0]) < 1e-4, line
  assert text.count("rows sum to 1: True") == 3
