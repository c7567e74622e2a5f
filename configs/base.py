"""The run sections of every config, each key declared once with its default and meaning.

Experiment files (`configs/llama_tiny.py`, `configs/llama.py`, ...) start from
`get_base_config(model_config)`, change values, and return the config locked:
a typo in an override (`--config.opt.lrr=1`) or a value of the wrong type is
an error that names the key. `config.model` is not declared here: it holds the
chosen family's config dataclass (models/<family>/config.py), whose fields,
defaults and meanings live with the model.
"""

import ml_collections

from models.config_schema import ModelConfig

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
    ("ssm_groups", None),  # Mamba: groups sharing B and C.
    ("ssm_state", None),  # Mamba: state size N.
    ("conv_width", None),  # Mamba: causal convolution taps.
    ("low_rank", None),  # RWKV-7: low-rank widths of the decay, iclr, value-mix and gate maps.
    ("state_dim", None),  # RWKV-7: the key axis of the [d, d] WKV state.
    # UNet (layers/unet/). Kernels are [kh, kw, c_in, c_out] or [c_in, c_out]: input
    # channels over fsdp (weights gathered at use, like 'embed'); output channels
    # replicated: splitting a conv's channels over tensor costs an activation gather
    # per conv and does not pay at UNet widths (<= 512). Spatial dims replicated.
    ("channels_in", "fsdp"),
    ("channels", None),
    ("image_channels", None),  # RGB side of the first and last convs (3 divides no mesh).
    ("conv_height", None),  # Conv taps (the width taps reuse 'conv_width').
    ("height", None),
    ("width", None),
    ("classes", None),  # Class-embedding rows (num_class_embeds).
)

def model_section(model_config: ModelConfig) -> ml_collections.ConfigDict:
  """`config.model`: `family` plus exactly the fields of the family's config dataclass.

  Defaults and one-line meanings live in that dataclass (models/<family>/config.py);
  optional parts are nested sections (`model.nsa.*`, `model.moe.*`).
  """
  return ml_collections.ConfigDict({"family": model_config.family, **model_config.to_dict()})


def get_base_config(model_config: ModelConfig) -> ml_collections.ConfigDict:
  """The unlocked base config for `model_config`; experiment files fill it in and lock it."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, dropout-free training RNG and data order.
  c.model = model_section(model_config)

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
