r"""Treadle's diffusion UNet against diffusers' `UNet2DModel` (PyTorch eager), same device.

  python benchmarks/diffusion.py                              # tiny UNet, 32x32 and 64x64
  python benchmarks/diffusion.py --model=ddpm_cifar10 --sizes=32 --batch=8
  python benchmarks/diffusion.py --smoke --json=/tmp/diffusion.json

Two measurements per image size, each Treadle vs torch on the same architecture:
diffusers' side is `UNet2DModel.from_config(diffusers_config_from_model(cfg))`
(models/unet/diffusers.py), built from the very `UNetConfig` Treadle trains.
`--model=tiny` is configs/unet_tiny.py's class-conditional UNet (0.28M
parameters); `--model=ddpm_cifar10` is configs/unet.py's cifar10 shape, the
architecture of google/ddpm-cifar10-32 (35.7M parameters, dropout 0.1, one
attention level). Both sides start from their own random initialisation;
only time is compared.

1. Training step (forward + backward + AdamW update) on one fixed batch of
   random images in [-1, 1] (and random labels for the tiny model): epsilon-
   prediction MSE on images noised at a random timestep of the linear
   1000-step schedule, fresh noise and timesteps every step. Treadle:
   `train.trainer.Trainer`'s jitted step on configs/unet_tiny.py with the
   model replaced, the objective set to epsilon / linear / no min-SNR, and the
   parameter EMA off (torch keeps none); it still applies the tiny config's
   label dropout (a select per example). Batches are random images; the
   config names the treadle_shapes variant of the size (32x32 default, 64px)
   only for the task's data check. torch: `torch.optim.AdamW` with the
   same lr, betas, eps and weight decay, `clip_grad_norm_` at opt.clip_norm, a
   warmup-cosine `LambdaLR`, `DDPMScheduler.add_noise` and `mse_loss`.
2. Sampling: a `--ddim_steps` DDIM loop (eta 0, 'leading' spacing, x0
   clipped, no guidance) from fixed starting noise. Treadle: models/unet/
   sampling.py's `sample` under one jit (a lax.scan over the steps); torch:
   `DDIMScheduler.step` after each `UNet2DModel` call, under `torch.no_grad`.

Devices: on CPU both sides share the cores (XLA:CPU uses all of them, torch
`torch.set_num_threads(--threads)`). On a GPU torch runs on CUDA when its
build has it, and is skipped (saying why) otherwise, as on a TPU; there the
script also reports Treadle's MFU from `UNetConfig.train_flops_per_example`
(sampling: `forward_flops_per_example` x steps) and `train.flops`'s peak.
bfloat16 (`--dtype`): Treadle's `model.dtype` (params float32), torch autocast.

Timing, as benchmarks/cpu_vs_torch.py: `--warmup` untimed calls per side
(compilation), then `--repeats` alternating blocks (`--steps` train steps, or
one whole sample loop, per block), each synchronised at its end. Reported:
median images/s per side and the ratio torch time / Treadle time (> 1 means
Treadle is faster) of the medians and of the fastest blocks; on a shared
machine only the latter means much.
"""

import datetime
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from configs import base
from configs import unet as unet_configs
from configs import unet_tiny
from models.unet import UNet
from models.unet import UNetConfig
from models.unet import sampling
from models.unet.diffusers import diffusers_config_from_model
from train import flops
from train import state as state_lib
from train import trainer as trainer_lib
from train.tasks.diffusion import task as diffusion_task

try:  # The peer; a machine without torch and diffusers (a borrowed GPU) times Treadle alone.
  import diffusers
  import torch
except ImportError:
  diffusers = torch = None

_MODEL = flags.DEFINE_enum("model", "tiny", ["tiny", "ddpm_cifar10"], "UNet architecture.")
_SIZES = flags.DEFINE_list("sizes", ["32", "64"], "Image sizes (height = width) to time.")
_BATCH = flags.DEFINE_integer("batch", 0, "Images per step and per sample loop (0: 32 for "
                              "tiny; 8 for ddpm_cifar10 on CPU, 64 elsewhere).")
_STEPS = flags.DEFINE_integer("steps", 5, "Train steps per timed block.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed blocks per side (alternating).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps / sample loops per side first.")
_DDIM_STEPS = flags.DEFINE_integer("ddim_steps", 50, "DDIM steps of a sample loop.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch threads (0: os.cpu_count()).")
_JSON = flags.DEFINE_string("json", "", "Also write the numbers to this JSON file.")
_SMOKE = flags.DEFINE_bool("smoke", False, "tiny, 32x32, batch 2, one block of one step, 2 DDIM "
                           "steps: checks the script runs.")

_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
# Image size -> the embedded dataset variant of that size (read only by the data check).
_SHAPES_BY_SIZE = {32: "treadle_shapes", 64: "treadle_shapes/64px"}


def unet_config(model: str, image_size: int, dtype: str) -> UNetConfig:
  """The UNet of `--model` at `image_size`, computing in `dtype`."""
  if model == "tiny":
    fields = dict(unet_tiny.get_config().model)
  else:
    fields = dict(unet_configs.get_config("size=cifar10").model)
  fields.pop("family")
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  return UNetConfig(**{**fields, "image_size": image_size, "dtype": dtype})


def bench_config(cfg: UNetConfig, batch: int):
  """configs/unet_tiny.py with the UNet `cfg`, epsilon-prediction on the linear schedule."""
  config = unet_tiny.get_config()
  with config.unlocked():
    config.model = base.model_section(cfg)
    if cfg.image_size not in _SHAPES_BY_SIZE:
      raise ValueError(f"--sizes: {cfg.image_size} has no treadle_shapes variant; "
                       f"use {sorted(_SHAPES_BY_SIZE)}.")
    config.data.name = _SHAPES_BY_SIZE[cfg.image_size]
    config.data.image_size, config.data.image_channels = cfg.image_size, cfg.in_channels
    config.data.global_batch_size = batch
    f = config.diffusion
    f.prediction_type, f.beta_schedule, f.min_snr_gamma = "epsilon", "linear", 0.0
    f.beta_start, f.beta_end = _SCHEDULE["beta_start"], _SCHEDULE["beta_end"]
    f.num_train_timesteps = _SCHEDULE["num_train_timesteps"]
    f.label_dropout = f.label_dropout if cfg.num_class_embeds else 0.0
    config.opt.ema_decay = 0.0
    config.sample.guidance_scale = 1.0  # Both sides sample without guidance.
  return config


def random_batch(cfg: UNetConfig, batch: int, null_class: bool) -> dict[str, np.ndarray]:
  """images float32 [b, H, W, c] uniform in [-1, 1]; labels int32 [b] (real classes only)."""
  rng = np.random.default_rng(0)
  shape = (batch, cfg.image_size, cfg.image_size, cfg.in_channels)
  classes = max(cfg.num_class_embeds - int(null_class), 1)
  return {"images": rng.uniform(-1, 1, shape).astype(np.float32),
          "labels": rng.integers(0, classes, (batch,), dtype=np.int32)}


class TreadleTrainSide:
  """The trainer's jitted step on a fixed batch; `run(n)` takes n steps."""

  def __init__(self, config, batch: dict[str, np.ndarray]):
    self.run_ = trainer_lib.Trainer(config, workdir="")
    local = self.run_.task.dummy_batch(config.data, batch["images"].shape[0])
    local.update(batch)
    with self.run_.sharding_context():
      self.state = state_lib.init_state(
          self.run_.model, self.run_.task, self.run_.optimizer, self.run_.dummy, config.seed,
          self.run_.state_shardings)
    self.batch = self.run_.global_batch(local)

  def run(self, steps: int) -> None:
    with self.run_.sharding_context():
      for _ in range(steps):
        self.state, metrics = self.run_.train_step(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))


def _lr_factor(step: int, warmup: int, total: int, end_factor: float) -> float:
  """Treadle's warmup-cosine schedule as a multiple of opt.lr."""
  if step < warmup:
    return step / warmup
  progress = min((step - warmup) / max(total - warmup, 1), 1.0)
  return end_factor + (1 - end_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class TorchTrainSide:
  """diffusers UNet2DModel of the same shape, eager, AdamW + clipping, epsilon MSE."""

  def __init__(self, config, cfg: UNetConfig, batch: dict[str, np.ndarray], device: str):
    o = config.opt
    torch.manual_seed(config.seed)
    self.device = device
    self.model = diffusers.UNet2DModel.from_config(diffusers_config_from_model(cfg)).to(device)
    self.model.train()
    decay = [p for p in self.model.parameters() if p.ndim >= 2]
    no_decay = [p for p in self.model.parameters() if p.ndim < 2]
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, lambda step: _lr_factor(step, o.warmup_steps, config.train.num_steps,
                                                o.end_lr_factor))
    self.noise_scheduler = diffusers.DDPMScheduler(beta_schedule="linear", **_SCHEDULE)
    self.clip_norm = o.clip_norm
    self.autocast = cfg.dtype == "bfloat16"
    # NHWC -> NCHW, diffusers' layout.
    self.images = torch.from_numpy(batch["images"].transpose(0, 3, 1, 2).copy()).to(device)
    self.labels = (torch.from_numpy(batch["labels"].astype(np.int64)).to(device)
                   if cfg.num_class_embeds else None)

  def step(self) -> None:
    self.optimizer.zero_grad(set_to_none=True)
    noise = torch.randn_like(self.images)
    timesteps = torch.randint(0, _SCHEDULE["num_train_timesteps"], (self.images.shape[0],),
                              device=self.device)
    noisy = self.noise_scheduler.add_noise(self.images, noise, timesteps)
    with torch.autocast(self.device, torch.bfloat16, enabled=self.autocast):
      prediction = self.model(noisy, timesteps, class_labels=self.labels).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
    self.optimizer.step()
    self.scheduler.step()

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self.step()
    if self.device == "cuda":
      torch.cuda.synchronize()


class TreadleSampler:
  """`sampling.sample` (DDIM) under jit on the train side's parameters; `run(n)`: n loops."""

  def __init__(self, side: TreadleTrainSide, config, batch: dict[str, np.ndarray],
               ddim_steps: int):
    model = side.run_.model
    conditional = bool(model.config.num_class_embeds)
    schedule = diffusion_task.noise_schedule(config)

    def generate(params, noise, labels):
      def denoise(x, t):
        return model.apply({"params": params}, x, t, labels if conditional else None)
      return sampling.sample(denoise, schedule, noise, jax.random.key(0), sampler="ddim",
                             num_steps=ddim_steps, spacing="leading", eta=0.0,
                             clip_sample=True)

    self.generate = jax.jit(generate)
    self.params = jax.tree.map(jnp.copy, side.state.params)  # The train state is donated.
    self.noise = jnp.asarray(np.random.default_rng(1).standard_normal(
        batch["images"].shape).astype(np.float32))
    self.labels = jnp.asarray(batch["labels"])

  def run(self, loops: int) -> None:
    for _ in range(loops):
      images = self.generate(self.params, self.noise, self.labels)
    jax.block_until_ready(images)


class TorchSampler:
  """`DDIMScheduler` loop around the train side's UNet2DModel, no_grad; `run(n)`: n loops."""

  def __init__(self, side: TorchTrainSide, ddim_steps: int):
    self.side = side
    self.scheduler = diffusers.DDIMScheduler(
        beta_schedule="linear", clip_sample=True, set_alpha_to_one=True, steps_offset=0,
        timestep_spacing="leading", prediction_type="epsilon", **_SCHEDULE)
    self.ddim_steps = ddim_steps
    self.noise = torch.from_numpy(np.random.default_rng(1).standard_normal(
        side.images.shape).astype(np.float32)).to(side.device)

  def loop(self):
    side = self.side
    side.model.eval()
    self.scheduler.set_timesteps(self.ddim_steps)
    x = self.noise
    with torch.no_grad():
      for t in self.scheduler.timesteps:
        with torch.autocast(side.device, torch.bfloat16, enabled=side.autocast):
          output = side.model(x, t.to(side.device), class_labels=side.labels).sample
        x = self.scheduler.step(output.float(), t, x).prev_sample
    return x

  def run(self, loops: int) -> None:
    for _ in range(loops):
      self.loop()
    if self.side.device == "cuda":
      torch.cuda.synchronize()


def alternate(sides: dict, calls: int, repeats: int, warmup: int) -> dict[str, list[float]]:
  """Seconds per call of each side: `warmup` untimed calls, then `repeats` alternating blocks."""
  for side in sides.values():
    side.run(warmup)
  times = {name: [] for name in sides}
  for _ in range(repeats):
    for name, side in sides.items():
      start = time.perf_counter()
      side.run(calls)
      times[name].append((time.perf_counter() - start) / calls)
  return times


def mfu(images_per_s: float, flops_per_image: float) -> float | None:
  """Model FLOP/s over the devices' published peak; None where there is none (CPU)."""
  device = jax.devices()[0]
  peak = flops.peak_flops_per_device(device.device_kind)
  return images_per_s * flops_per_image / (jax.device_count() * peak) if peak else None


def report(what: str, times: dict[str, list[float]], images: int,
           flops_per_image: float) -> dict:
  """Prints images/s per side and the ratios; returns them as a JSON row."""
  row = {"what": what, "images": images}
  print(f"  {what}")
  for name, t in times.items():
    median = statistics.median(t)
    row[f"{name}_images_per_s"] = images / median
    row[f"{name}_fastest_images_per_s"] = images / min(t)
    print(f"    {name:8s} {median * 1e3:9.1f} ms (min {min(t) * 1e3:.1f}, max "
          f"{max(t) * 1e3:.1f}), {images / median:9.1f} images/s")
  utilisation = mfu(row["treadle_images_per_s"], flops_per_image)
  row["treadle_mfu"] = utilisation
  if utilisation is not None:
    print(f"    treadle  MFU {utilisation:.1%} ({flops_per_image / 1e9:.2f} GFLOP/image)")
  if "torch" in times:
    row["ratio_median"] = statistics.median(times["torch"]) / statistics.median(times["treadle"])
    row["ratio_fastest"] = min(times["torch"]) / min(times["treadle"])
    print(f"    ratio    {row['ratio_median']:.2f}x of the medians, {row['ratio_fastest']:.2f}x "
          "of the fastest blocks (Treadle images/s / torch images/s)")
  return row


def torch_device() -> tuple[str | None, str]:
  """torch's device matching JAX's backend, or None and why torch is skipped."""
  if torch is None or diffusers is None:
    return None, "skipped: torch and diffusers are not installed"
  backend = jax.default_backend()
  if backend == "cpu":
    return "cpu", "cpu"
  if backend == "gpu" and torch.cuda.is_available():
    return "cuda", f"cuda ({torch.cuda.get_device_name()})"
  return None, (f"skipped: torch {torch.__version__} has no CUDA device"
                if backend == "gpu" else f"skipped: no torch backend for {backend}")


def treadle_param_count(cfg: UNetConfig, data: dict[str, np.ndarray]) -> int:
  """Parameters of Treadle's UNet (diffusers' twin has the same count: the parity tests)."""
  model = UNet(cfg)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.asarray(data["images"][:1]), jnp.zeros((1,), jnp.int32),
      labels=None if data.get("labels") is None else jnp.asarray(data["labels"][:1])))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


def bench_size(image_size: int, batch: int, device: str | None, args: dict) -> list[dict]:
  """Train step and DDIM sampling at one image size; their JSON rows."""
  cfg = unet_config(args["model"], image_size, args["dtype"])
  config = bench_config(cfg, batch)
  data = random_batch(cfg, batch, diffusion_task.null_label(config) is not None)
  params = treadle_param_count(cfg, data)
  print(f"\n{image_size}x{image_size}, batch {batch}, {params / 1e6:.2f}M params, "
        f"{args['dtype']}")
  train = {"treadle": TreadleTrainSide(config, data)}
  if device:
    train["torch"] = TorchTrainSide(config, cfg, data, device)
  times = alternate(train, args["steps"], args["repeats"], args["warmup"])
  rows = [report("train step (fwd + bwd + AdamW)", times, batch, cfg.train_flops_per_example())]
  samplers = {"treadle": TreadleSampler(train["treadle"], config, data, args["ddim_steps"])}
  if device:
    samplers["torch"] = TorchSampler(train["torch"], args["ddim_steps"])
  times = alternate(samplers, 1, args["repeats"], args["warmup"])
  rows.append(report(f"DDIM sampling, {args['ddim_steps']} steps", times, batch,
                     cfg.forward_flops_per_example() * args["ddim_steps"]))
  for row in rows:
    row.update(image_size=image_size, batch=batch, params=params)
  return rows


def run_args() -> dict:
  """The flags, with --smoke's and the per-model defaults applied."""
  args = dict(model=_MODEL.value, sizes=[int(s) for s in _SIZES.value], batch=_BATCH.value,
              steps=_STEPS.value, repeats=_REPEATS.value, warmup=_WARMUP.value,
              ddim_steps=_DDIM_STEPS.value, dtype=_DTYPE.value)
  if _SMOKE.value:
    args.update(model="tiny", sizes=[32], batch=2, steps=1, repeats=1, warmup=1, ddim_steps=2)
  if not args["batch"]:
    on_cpu = jax.default_backend() == "cpu"
    args["batch"] = 32 if args["model"] == "tiny" else (8 if on_cpu else 64)
  return args


def main(argv):
  del argv
  args = run_args()
  device, device_note = torch_device()
  if torch is not None:
    torch.set_num_threads(_THREADS.value or os.cpu_count())
  peer = ("none" if torch is None else
          f"torch {torch.__version__}, diffusers {diffusers.__version__}")
  print(f"date     {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
  print(f"device   {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), {os.cpu_count()} cores; torch {device_note}"
        + (f", threads {torch.get_num_threads()}" if torch is not None else ""))
  print(f"versions jax {jax.__version__}, jaxlib {jax.lib.__version__}; peer {peer}")
  print(f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}")
  print(f"shape    --model={args['model']}, sizes {args['sizes']}, batch {args['batch']}; "
        f"{args['repeats']} alternating blocks of {args['steps']} train steps / one "
        f"{args['ddim_steps']}-step DDIM loop; {args['warmup']} warmup")
  rows = []
  for size in args["sizes"]:
    rows += bench_size(size, args["batch"], device, args)
  if _JSON.value:
    meta = dict(args, device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                torch_device=device_note, jax=jax.__version__, peer=peer, xla_flags=os.environ.get("XLA_FLAGS", ""))
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
