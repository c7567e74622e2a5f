"""colabs/rwkv.ipynb runs top to bottom on CPU (a few training steps, short rows)."""

import re

from helpers import colabs as colab_runner


def test_rwkv_colab_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("RWKV_COLAB_STEPS", "4")
  monkeypatch.setenv("RWKV_COLAB_SMALL", "1")
  colab_runner.one_device(monkeypatch)  # The notebook does not shard.
  # Training rows of 64 tokens instead of 128: the sequential WKV scan steps half as often.
  text = colab_runner.run("rwkv.ipynb", str(tmp_path), edits={
      "  config.data.global_batch_size = 8\n":
          "  config.data.global_batch_size = 8\n  config.data.seq_len = 64\n"})
  assert "step 4/4" in text and "final train loss:" in text
  # The state restarts at the document boundary in every block.
  resets = re.findall(r"state norm ([\d.]+) at the last token of document 1, ([\d.]+) at the "
                      r"first of document 2", text)
  assert len(resets) == 2, text  # RWKV_COLAB_SMALL: two blocks
  assert all(float(after) < float(before) for before, after in resets), resets
  # Chunked (16, 32 and 64 tokens) and sequential agree to float32 rounding.
  errors = re.findall(r"max \|logits - sequential\| = (\S+)", text)
  assert len(errors) == 4 and float(errors[0]) == 0, errors
  assert all(float(error) < 1e-4 for error in errors[1:]), errors
  # The decode state keeps one size while the KV cache it replaces grows.
  sizes = re.findall(r"tokens: RWKV state ([\d,]+) bytes; a llama_tiny KV cache would hold "
                     r"([\d,]+)", text)
  assert len(sizes) >= 3 and len({state for state, _ in sizes}) == 1, sizes
  assert int(sizes[-1][1].replace(",", "")) > int(sizes[0][1].replace(",", ""))
