"""The one place every config key is declared, with its default and meaning.

Experiment files (`configs/llama_tiny.py`, `configs/llama.py`, ...) start from
`get_base_config()`, change values, and return the config locked: a typo in an
override (`--config.opt.lrr=1`) or a value of the wrong type is an error that
names the key.
"""

import ml_collections

# Logical axis name -> mesh axes it is sharded over (None: replicated).
# Layers name their parameter and activation dimensions with these logical
# names; this table is the only place they meet the physical mesh.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp", "expert")),  # Outside MoE layers the expert axis is data-parallel.
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("cache_length", None),
    ("expert", "expert"),
)

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the unlocked base config; experiment files fill it in and lock it."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, dropout-free training RNG and data order.

  c.model = m = ml_collections.ConfigDict()
  m.family = "llama"  # Model family in train/families.py: decides module and task.
  m.vocab_size = 512  # Embedding rows; must be >= the tokenizer's vocabulary.
  m.embed_dim = 128  # Residual stream width.
  m.num_layers = 4  # Decoder blocks.
  m.num_heads = 4  # Query heads.
  m.num_kv_heads = 2  # Key/value heads (GQA); divides num_heads.
  m.head_dim = 32  # Per-head width.
  m.mlp_dim = 384  # SwiGLU hidden width.
  m.max_seq_len = 256  # Longest sequence (KV-cache capacity when sampling).
  m.rope_theta = 10_000.0  # RoPE base frequency.
  m.norm_eps = 1e-6  # RMSNorm epsilon.
  m.tie_embeddings = False  # Share input embedding and output projection.
  m.attention_impl = "auto"  # One of xla | cudnn | pallas | auto.
  m.attention = "full"  # full (dense causal) | nsa (Native Sparse Attention, layers/nsa.py).
  m.nsa_compress_block = 32  # nsa: tokens per compressed block.
  m.nsa_compress_stride = 16  # nsa: stride between compressed blocks.
  m.nsa_select_block = 64  # nsa: tokens per selectable block.
  m.nsa_select_top_n = 16  # nsa: blocks each query group attends (incl. first and local).
  m.nsa_window = 512  # nsa: sliding-window branch width in tokens.
  m.attention_chip = ""  # Pallas kernel target (h100, tpu_v5e, ...); '' = this machine's.
  m.scan_layers = True  # nn.scan over identical blocks (faster compile).
  m.remat_policy = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable.
  m.dtype = "bfloat16"  # Computation dtype.
  m.param_dtype = "float32"  # Parameter storage dtype.
  m.qkv_bias = False  # Biases on the query/key/value projections (Qwen2-style).
  # Mixture of experts (family 'moe'; see models/moe.py).
  m.num_experts = 8  # Routed experts per MoE layer.
  m.num_experts_per_token = 2  # Top-k experts each token is sent to.
  m.expert_mlp_dim = 192  # SwiGLU hidden width of each routed expert.
  m.shared_expert_mlp_dim = 0  # Hidden width of the always-on shared expert; 0 = none.
  m.shared_expert_gate = False  # Scale the shared expert by a learned sigmoid gate (Qwen2-MoE).
  m.router = "softmax"  # softmax (Mixtral, Qwen2-MoE) | sigmoid (DeepSeek-V3).
  m.router_norm_topk = True  # Renormalise the top-k gate weights to sum to 1.
  m.router_num_groups = 1  # DeepSeek group-limited routing: expert groups (1 = off).
  m.router_topk_groups = 1  # Groups each token may pick experts from.
  m.routed_scaling_factor = 1.0  # Multiplies the routed experts' gate weights.
  m.first_dense_layers = 0  # The first this many layers use a dense SwiGLU of mlp_dim.
  m.moe_impl = "dropless"  # dropless (sorted grouped matmul) | capacity (fixed buffers, drops).
  m.capacity_factor = 1.25  # capacity mode: slots per expert and row = factor * seq_len * k / experts.

  c.data = d = ml_collections.ConfigDict()
  d.name = "treadle_corpus"  # TFDS dataset name (the embedded corpus by default).
  d.data_dir = ""  # TFDS data_dir; '' means $TREADLE_DATA_DIR or ~/.cache/treadle/tfds.
  d.train_split = "train"  # TFDS split to train on.
  d.eval_split = "validation"  # TFDS split to evaluate on.
  d.text_key = "text"  # Feature holding the text in each example.
  d.tokenizer = "byte"  # 'byte' or the path to a SentencePiece .model file.
  d.seq_len = 128  # Packed row length in tokens.
  d.global_batch_size = 32  # Rows per step across all hosts.
  d.worker_count = 0  # grain worker processes per host (0: in-process).

  c.opt = o = ml_collections.ConfigDict()
  o.name = "adamw"  # adamw | lion | adafactor.
  o.lr = 3e-3  # Peak learning rate.
  o.warmup_steps = 50  # Linear warmup from 0 to lr.
  o.decay_steps = -1  # Cosine decay length after warmup; -1 means until train.num_steps.
  o.end_lr_factor = 0.1  # Final learning rate as a fraction of lr.
  o.b1 = 0.9  # First-moment decay (adamw, lion).
  o.b2 = 0.95  # Second-moment decay (adamw, lion).
  o.eps = 1e-8  # Adam epsilon.
  o.weight_decay = 0.1  # Decoupled weight decay (not on norms or biases).
  o.clip_norm = 1.0  # Global gradient-norm clip; 0 disables.
  o.grad_accum_steps = 1  # Micro-batches accumulated per optimizer step.
  o.z_loss = 1e-4  # Weight of log(Z)^2 in the loss; 0 disables.
  o.moe_aux_loss = 0.01  # Switch load-balancing loss weight (1.0 at even load; HF Mixtral coef x k).
  o.moe_seq_aux_loss = 0.0  # DeepSeek-V3 sequence-wise balance loss weight (~1e-4); 0 disables.
  o.router_z_loss = 1e-3  # Weight of the router's log-partition squared (MoE); 0 disables.
  # DeepSeek-V3 aux-loss-free balancing: after each step every expert's selection
  # bias moves by this much towards the mean load (b += rate * sign(mean - load)); 0 disables.
  o.moe_bias_update_rate = 0.0

  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 300  # Optimizer steps to train for.
  t.log_every_steps = 25  # Metrics to console, TensorBoard and metrics.jsonl.
  t.peak_tflops_per_device = 0.0  # For MFU; 0 looks the device kind up (CPU: not shown).
  t.profile_first_step = 10  # First step (1-based) of the jax.profiler trace in WORKDIR/profile.
  t.profile_num_steps = 0  # Steps traced from profile_first_step; 0 disables (train/profiling.py).

  c.evals = e = ml_collections.ConfigDict()
  e.every_steps = 100  # Evaluate on data.eval_split every this many steps; 0 disables.
  e.num_batches = 4  # Global batches per evaluation.

  c.checkpoint = k = ml_collections.ConfigDict()
  k.every_steps = 100  # Save every this many steps (and at the end).
  k.keep = 3  # Keep the latest this many checkpoints.
  k.async_save = True  # Write checkpoints in the background.

  c.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1 fills with the devices the other axes leave.
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.expert = 1
  mesh.sequence = 1
  # (logical axis, mesh axes) pairs; see DEFAULT_LOGICAL_AXIS_RULES.
  c.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

  c.sample = s = ml_collections.ConfigDict()
  s.prompts = ("The ", "12+34=")  # Prompts sampled at the end of training.
  s.max_new_tokens = 48  # Tokens generated per prompt.
  s.temperature = 0.0  # 0 is greedy.
  s.top_k = 0  # Keep the k most likely tokens; 0 disables.
  s.top_p = 1.0  # Nucleus sampling mass; 1 disables.
  s.seed = 0  # Sampling RNG seed.
  s.num_scored = 64  # Held-out task prompts scored after training; 0 disables.
  return c
