"""Random, fully perturbed Hugging Face models saved locally, for parity and conversion tests.

Needs torch and transformers (test-only dependencies); callers skip without them.
"""


def make_llama(tied: bool, hf_dir: str):
  """A random, fully perturbed tiny GQA `LlamaForCausalLM` saved to `hf_dir`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
      rope_theta=50_000.0, max_position_embeddings=64, tie_word_embeddings=tied,
      attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).float().eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  model.save_pretrained(hf_dir)
  return model
