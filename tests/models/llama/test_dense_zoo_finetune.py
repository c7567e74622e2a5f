"""The main job on imported dense variants: import from transformers, fine-tune a few steps
through the trainer, sample from the workdir, export back."""

import jax
import numpy as np
import pytest

from configs import finetune, llama_tiny
from train import checkpoint, convert, sample, trainer

transformers = pytest.importorskip("transformers")
from helpers.hf import make_hf_decoder  # pylint: disable=g-import-not-at-top

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
            max_position_embeddings=64)
FORMATS = {
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
        "original_max_position_embeddings": 16})),
    "mistral": ("MistralForCausalLM", dict(sliding_window=8)),
    "gemma3": ("Gemma3ForCausalLM", dict(
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=8)),
}


# gemma3 (the most features) in the default suite; the others with -m slow.
@pytest.mark.parametrize("name", [name if name == "gemma3" else
                                  pytest.param(name, marks=pytest.mark.slow)
                                  for name in sorted(FORMATS)])
def test_import_finetune_sample_export(name, tmp_path):
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "run")
  model_class, fields = FORMATS[name]
  make_hf_decoder(model_class, hf_dir, **{**TINY, **fields})
  convert.import_checkpoint(name, hf_dir, workdir, run_config=llama_tiny.get_config())
  imported = checkpoint.load_model(workdir)[1]["params"]

  config = finetune.get_config(f"workdir={workdir}")
  for key, value in {"data.data_dir": str(tmp_path / "tfds"), "data.seq_len": 32,
                     "data.global_batch_size": 8, "train.num_steps": 2, "opt.lr": 1e-4,
                     "opt.warmup_steps": 0, "evals.every_steps": 0, "model.dtype": "float32",
                     "sample.num_scored": 0, "sample.max_new_tokens": 4}.items():
    section, field = key.split(".")
    config[section][field] = value
  trainer.train_and_evaluate(config, workdir)
  tuned = checkpoint.load_model(workdir)[1]["params"]
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       tuned, imported)
  assert 0 < max(jax.tree.leaves(moved)) < 0.01  # Small steps from the imported weights.
  assert len(sample.sample(workdir, ["Hi", "The fox"], max_new_tokens=3)) == 2
  written = convert.export_checkpoint(name, workdir, str(tmp_path / "out"))
  assert any(path.endswith("model.safetensors") for path in written)
  reloaded = getattr(transformers, model_class).from_pretrained(str(tmp_path / "out"))
  assert reloaded.config.model_type == transformers.AutoConfig.from_pretrained(hf_dir).model_type
