"""Colabs run top to bottom on CPU (short settings through environment variables and, where
the notebook has none, edits of its source: tests/helpers/colabs.py)."""

from helpers import colabs as colab_runner


# Smaller batches, one evaluation batch and 8 scored prompts instead of 64 (llama_tiny's own
# 32 rows, 4 batches and 64 prompts of 48 decoded tokens): the same cells, a fraction of the work.
_SHORT_QUICKSTART = {
    "config.evals.every_steps = config.train.num_steps\n":
        "config.evals.every_steps = config.train.num_steps\n"
        "config.data.global_batch_size, config.evals.num_batches = 8, 1\n"
        "config.sample.num_scored = 8\n"}


def test_quickstart_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("QUICKSTART_STEPS", "12")
  text = colab_runner.run("quickstart.ipynb", str(tmp_path), edits=_SHORT_QUICKSTART)
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


# The one-level UNet of the trainer tests instead of DIFFUSION_COLAB_SMALL's two levels: every
# cell runs the same code, at about half the compile time.
_ONE_LEVEL_UNET = {
    "config.model.block_out_channels = (16, 32)": "config.model.block_out_channels = (16,)",
    'config.model.down_block_types = ("DownBlock2D", "AttnDownBlock2D")':
        'config.model.down_block_types = ("AttnDownBlock2D",)',
    'config.model.up_block_types = ("AttnUpBlock2D", "UpBlock2D")':
        'config.model.up_block_types = ("AttnUpBlock2D",)'}


def test_diffusion_colab_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("DIFFUSION_COLAB_STEPS", "6")
  monkeypatch.setenv("DIFFUSION_COLAB_SMALL", "1")
  colab_runner.one_device(monkeypatch)  # The notebook does not shard.
  text = colab_runner.run("diffusion.ipynb", str(tmp_path), edits=_ONE_LEVEL_UNET)
  assert "sqrt(alpha_bar) at t=" in text and "step 6/6" in text
  assert "final train loss:" in text and "classes: ('circle'" in text
