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


def text_data_section() -> ml_collections.ConfigDict:
  """`config.data` of text families: packed token rows."""
  d = ml_collections.ConfigDict()
  d.name = "treadle_corpus"  # TFDS dataset name (the embedded corpus by default).
  d.data_dir = ""  # TFDS data_dir; '' means $TREADLE_DATA_DIR or ~/.cache/treadle/tfds.
  d.train_split = "train"  # TFDS split to train on.
  d.eval_split = "validation"  # TFDS split to evaluate on.
  d.text_key = "text"  # Feature holding the text in each example.
  d.tokenizer = "byte"  # 'byte', 'rwkv_world', or a .model / tokenizer.json / RWKV vocab .txt path.
  d.seq_len = 128  # Packed row length in tokens.
  d.global_batch_size = 32  # Rows per step across all hosts.
  d.worker_count = 0  # grain worker processes per host (0: in-process).
  return d


def image_data_section() -> ml_collections.ConfigDict:
  """`config.data` of image families: batches of (image, label)."""
  d = ml_collections.ConfigDict()
  d.name = "treadle_shapes"  # TFDS dataset name (the embedded coloured shapes by default).
  d.data_dir = ""  # TFDS data_dir; '' means $TREADLE_DATA_DIR or ~/.cache/treadle/tfds.
  d.train_split = "train"  # TFDS split to train on.
  d.eval_split = "validation"  # TFDS split to evaluate on and score samples against.
  d.image_key = "image"  # Feature holding the image.
  d.label_key = "label"  # ClassLabel feature; '' for unlabelled data.
  d.image_size = 32  # Height and width of the dataset's images (never resized).
  d.image_channels = 3  # Channels of the dataset's images.
  d.random_flip = True  # Random horizontal flips of training images.
  d.global_batch_size = 32  # Images per step across all hosts.
  d.worker_count = 0  # grain worker processes per host (0: in-process).
  return d


def text_sample_section() -> ml_collections.ConfigDict:
  """`config.sample` of text families: completions of prompts."""
  s = ml_collections.ConfigDict()
  s.prompts = ("The ", "12+34=")  # Prompts sampled at the end of training.
  s.max_new_tokens = 48  # Tokens generated per prompt.
  s.temperature = 0.0  # 0 is greedy.
  s.top_k = 0  # Keep the k most likely tokens; 0 disables.
  s.top_p = 1.0  # Nucleus sampling mass; 1 disables.
  s.seed = 0  # Sampling RNG seed.
  s.num_scored = 64  # Held-out task prompts scored after training; 0 disables.
  return s


def image_sample_section() -> ml_collections.ConfigDict:
  """`config.sample` of image families: the DDPM / DDIM sampler."""
  s = ml_collections.ConfigDict()
  s.sampler = "ddim"  # ddim | ddpm.
  s.num_steps = 50  # Denoising steps (any number up to diffusion.num_train_timesteps).
  s.spacing = "trailing"  # Timestep spacing: leading | trailing | linspace.
  s.eta = 0.0  # DDIM noise (0: deterministic; 1: DDPM-like).
  s.guidance_scale = 1.0  # Classifier-free guidance; 1 is plain conditional sampling.
  s.clip_sample = True  # Clip each step's x0 estimate to [-1, 1].
  s.num_per_class = 8  # Samples per class in the closing grid (one row per class).
  s.seed = 0  # Sampling RNG seed (initial noise and DDPM noise).
  s.num_scored = 256  # Samples scored by the probe classifier after training; 0 disables.
  return s


def diffusion_section() -> ml_collections.ConfigDict:
  """`config.diffusion`: the noising process and the objective of image families."""
  f = ml_collections.ConfigDict()
  f.num_train_timesteps = 1000  # Noise levels of the forward process (T).
  f.beta_schedule = "linear"  # linear | scaled_linear | cosine.
  f.beta_start = 1e-4  # First beta of linear schedules.
  f.beta_end = 0.02  # Last beta of linear schedules.
  f.prediction_type = "epsilon"  # What the model predicts: epsilon | v_prediction | sample.
  f.min_snr_gamma = 0.0  # Min-SNR-gamma loss weighting (e.g. 5); 0 weights every t equally.
  f.label_dropout = 0.0  # Share of labels replaced by the null class (for guidance); 0 disables.
  return f


def get_base_config(model_config: ModelConfig) -> ml_collections.ConfigDict:
  """The unlocked base config for `model_config`; experiment files fill it in and lock it."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, dropout-free training RNG and data order.
  if model_config.modality not in ("text", "images"):
    raise ValueError(f"{type(model_config).__name__}.modality={model_config.modality!r} must "
                     "be 'text' or 'images'.")
  c.model = model_section(model_config)

  c.data = text_data_section() if model_config.modality == "text" else image_data_section()

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
  o.z_loss = 1e-4  # Weight of log(Z)^2 in the loss; 0 disables (text).
  o.ema_decay = 0.0  # Keep an EMA of the params with this (max) decay; 0 disables.
  o.ema_warmup_power = 0.0  # EMA decay ramp: 0 is (1+s)/(10+s), p > 0 is 1-(1+s)^-p.

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

  if model_config.modality == "text":
    c.sample = text_sample_section()
  else:
    c.sample = image_sample_section()
    c.diffusion = diffusion_section()
  return c
