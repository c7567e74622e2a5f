"""colabs/mamba.ipynb runs top to bottom on CPU (one block, a few steps) and shows what it says."""

import re

from helpers import colabs as colab_runner


def test_mamba_colab_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("MAMBA_COLAB_STEPS", "4")
  monkeypatch.setenv("MAMBA_COLAB_SMALL", "1")
  text = colab_runner.run("mamba.ipynb", str(tmp_path))
  assert "step 4/4" in text and "final train loss:" in text
  # Per-head decay: one line per block (one here), a factor in (0, 1] per head.
  decays = re.findall(r"decay per head \(median exp\(dt\*A\)\): \[([^\]]*)\]", text)
  assert len(decays) == 1, text
  assert all(0 < float(v) <= 1 for line in decays for v in line.split()), decays
  # The state restarts where document 2 starts, and only with its segment id.
  assert "state restarts at the boundary: True" in text, text
  # The chunked SSD is the recurrence: float32 agreement to rounding.
  line = next(l for l in text.splitlines() if l.startswith("ssd float32"))
  y_diff, state_diff = (float(v) for v in re.findall(r"diff\| ([0-9.e+-]+)", line))
  assert y_diff < 1e-4 and state_diff < 1e-4, line
  assert "same next-token argmax" in text and "t=  512 forward         : chunked" in text
  assert "sample: 'The ' ->" in text
  assert ("mamba cache the same at every length: True; after the" in text
          and "it has the empty cache's shapes: True" in text), text
