"""Colabs run top to bottom on CPU (short settings through environment variables)."""

from helpers import colabs as colab_runner


def test_quickstart_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("QUICKSTART_STEPS", "12")
  text = colab_runner.run("quickstart.ipynb", str(tmp_path))
  # The query kernel [embed, heads, head_dim] is listed sharded over fsdp and tensor.
  assert "('embed', 'heads', 'head_dim')" in text and "('fsdp', 'tensor', None)" in text
  assert "logits: (1, 5, 512)" in text
  assert "step 12/12" in text


def test_moe_colab_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("MOE_COLAB_STEPS", "4")
  monkeypatch.setenv("MOE_COLAB_SMALL", "1")
  text = colab_runner.run("moe.ipynb", str(tmp_path))
  assert text.count("step 4/4") == 2  # Both runs trained.
  assert "aux-loss-free bias: final load imbalance per layer" in text
  assert "bias per MoE layer and expert" in text and "'12+34=' ->" in text


def test_diffusion_colab_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("DIFFUSION_COLAB_STEPS", "6")
  monkeypatch.setenv("DIFFUSION_COLAB_SMALL", "1")
  text = colab_runner.run("diffusion.ipynb", str(tmp_path))
  assert "sqrt(alpha_bar) at t=" in text and "step 6/6" in text
  assert "final train loss:" in text and "classes: ('circle'" in text
