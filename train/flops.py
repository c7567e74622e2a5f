"""Model FLOPs per token and device peaks, for MFU.

Training FLOPs per token of a decoder (PaLM appendix B, causal attention):
  6 * N_matmul + 6 * L * h * d * T
N_matmul counts the weights every token multiplies with (attention, MLP and
the output projection; not the embedding lookup), L layers, h query heads of
width d, T the sequence length. Causal attention does half of the 12*L*h*d*T
of full attention. MFU = achieved model FLOP/s / peak FLOP/s of the devices.
"""

# Dense bf16 peak FLOP/s per device, by the prefix of `jax.Device.device_kind`.
PEAK_FLOPS = (
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def llama_matmul_params(model_config) -> int:
  """Weights each token multiplies with (everything but the embedding lookup)."""
  m = model_config
  attention = m.embed_dim * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  mlp = 3 * m.embed_dim * m.mlp_dim
  return m.num_layers * (attention + mlp) + m.embed_dim * m.vocab_size


def llama_train_flops_per_token(model_config, seq_len: int) -> float:
  m = model_config
  return 6.0 * llama_matmul_params(m) + 6.0 * m.num_layers * m.num_heads * m.head_dim * seq_len


def moe_active_matmul_params(model_config) -> int:
  """Weights each token multiplies with in an MoE decoder: attention, the router,
  its top-k routed experts and the shared expert (dense MLPs in the first
  `first_dense_layers`), and the output projection."""
  m = model_config
  attention = m.embed_dim * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  dense_mlp = 3 * m.embed_dim * m.mlp_dim
  moe_mlp = (m.embed_dim * m.num_experts  # router
             + 3 * m.embed_dim * m.expert_mlp_dim * m.num_experts_per_token
             + 3 * m.embed_dim * m.shared_expert_mlp_dim
             + (m.embed_dim if m.shared_expert_gate else 0))
  moe_layers = m.num_layers - m.first_dense_layers
  return (m.num_layers * attention + m.first_dense_layers * dense_mlp + moe_layers * moe_mlp
          + m.embed_dim * m.vocab_size)


def moe_train_flops_per_token(model_config, seq_len: int) -> float:
  m = model_config
  return (6.0 * moe_active_matmul_params(m)
          + 6.0 * m.num_layers * m.num_heads * m.head_dim * seq_len)


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device; None when unknown (e.g. CPU) and not overridden."""
  if override_tflops:
    return override_tflops * 1e12
  for prefix, peak in PEAK_FLOPS:
    if device_kind.startswith(prefix):
      return peak
  return None
