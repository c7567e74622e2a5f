"""Random, fully perturbed Hugging Face models saved locally, for parity and conversion tests.

Needs torch and transformers (test-only dependencies); callers skip without them.
"""


def make_llama(tied: bool, hf_dir: str):
  """A random, fully perturbed tiny GQA `LlamaForCausalLM` saved to `hf_dir`."""
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
      rope_theta=50_000.0, max_position_embeddings=64, tie_word_embeddings=tied,
      attn_implementation="eager")
  return perturbed_and_saved(transformers.LlamaForCausalLM, config, hf_dir)


def perturbed_and_saved(model_cls, config, hf_dir: str):
  """`model_cls(config)` in float32 eval mode with every parameter perturbed (seed 0:
  +0.1·N(0, 1); an SSM's A_log redrawn as log U[1, 16], realistic decays), saved to
  `hf_dir`."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = model_cls(config).float().eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("A_log"):
        param.copy_(torch.log(torch.empty_like(param).uniform_(1.0, 16.0)))
      else:
        param.add_(0.1 * torch.randn_like(param))
  model.save_pretrained(hf_dir)
  return model


def make_mamba2(tied: bool, hf_dir: str):
  """A random, fully perturbed tiny `Mamba2ForCausalLM` (2 groups of heads, chunks of 8)
  saved to `hf_dir`."""
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.Mamba2Config(
      vocab_size=300, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, expand=2,
      n_groups=2, state_size=16, conv_kernel=4, chunk_size=8, layer_norm_epsilon=1e-5,
      tie_word_embeddings=tied, time_step_limit=(0.0, float("inf")))
  return perturbed_and_saved(transformers.Mamba2ForCausalLM, config, hf_dir)


def make_hf_decoder(model_class: str, hf_dir: str, **config_fields):
  """A random, fully perturbed tiny transformers decoder (`model_class`, e.g.
  'Qwen3ForCausalLM', built from its config class with `config_fields`) saved to
  `hf_dir`; returns the float32 eager-attention model."""
  import transformers  # pylint: disable=g-import-not-at-top
  model_cls = getattr(transformers, model_class)
  config = model_cls.config_class(**config_fields, attn_implementation="eager")
  return perturbed_and_saved(model_cls, config, hf_dir)


def make_mamba1(hf_dir: str, **config_fields):
  """A random, fully perturbed tiny `MambaForCausalLM` (Mamba-1; e 32, i 64, N 8) saved to
  `hf_dir`; `config_fields` override the MambaConfig (tie_word_embeddings, use_bias, ...)."""
  import transformers  # pylint: disable=g-import-not-at-top
  fields = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                conv_kernel=4, layer_norm_epsilon=1e-5, use_mambapy=False)
  config = transformers.MambaConfig(**{**fields, **config_fields})
  return perturbed_and_saved(transformers.MambaForCausalLM, config, hf_dir)
