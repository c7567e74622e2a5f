"""The diffusion task: noise images, learn to undo it, sample, and show it learned.

Batches (train/data/images/pipeline.py) hold `images` float32 [b, H, W, c] in
[-1, 1] and `labels` int32 [b]. Each training example gets a noise level t
drawn uniformly from the `diffusion.num_train_timesteps` of the forward
process; the model predicts `diffusion.prediction_type` (epsilon, v or x0)
from the noised image, and the loss is the mean squared error over pixels,
weighted by min-SNR-gamma where `diffusion.min_snr_gamma` > 0.

Class-conditional models (`model.num_class_embeds` > 0) see each label
replaced by the null class with probability `diffusion.label_dropout`; the
null class is the last embedding row, `model.num_class_embeds - 1`, so such a
model needs one row more than the data has classes. Sampling with
`sample.guidance_scale` s != 1 then mixes the two predictions
(classifier-free guidance).

The closing report samples from the EMA of the parameters (where the run keeps
one), writes WORKDIR/samples/step_<N>.png (one row per class), logs the grid to
TensorBoard and scores samples with a probe classifier fitted on real images.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from models.family import ModelFamily
from models.unet import sampling
from models.unet import schedule as schedule_lib
from train import metrics as metrics_lib
from train.data.images import grid
from train.data.images import pipeline
from train.tasks.diffusion import probe as probe_lib

IMAGE_AXES = ("batch", None, None, None)
# Images sampled per jitted call in the report and the sampling CLI.
_SAMPLE_BATCH = 64
# Real training images the report's probe classifier is fitted on.
_PROBE_TRAIN_IMAGES = 2048
SAMPLERS = ("ddim", "ddpm")
SPACINGS = ("leading", "trailing", "linspace")


def noise_schedule(config) -> schedule_lib.NoiseSchedule:
  """The forward process of `config.diffusion`."""
  f = config.diffusion
  return schedule_lib.make_schedule(
      f.beta_schedule, num_train_timesteps=f.num_train_timesteps, beta_start=f.beta_start,
      beta_end=f.beta_end, prediction_type=f.prediction_type)


def null_label(config) -> int | None:
  """The null class used for label dropout and guidance, or None without one."""
  if config.model.num_class_embeds and config.diffusion.label_dropout > 0:
    return config.model.num_class_embeds - 1
  return None


def num_classes(config) -> int:
  """Classes a class-conditional model draws (its embedding rows less the null class);
  0 for an unconditional model."""
  return config.model.num_class_embeds - (null_label(config) is not None)


def _check_sample_config(config) -> None:
  s, f = config.sample, config.diffusion
  if s.sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler={s.sampler!r} must be one of {SAMPLERS}.")
  if s.spacing not in SPACINGS:
    raise ValueError(f"sample.spacing={s.spacing!r} must be one of {SPACINGS}.")
  if not 1 <= s.num_steps <= f.num_train_timesteps:
    raise ValueError(f"sample.num_steps={s.num_steps} must be in [1, "
                     f"diffusion.num_train_timesteps={f.num_train_timesteps}].")
  if s.eta < 0:
    raise ValueError(f"sample.eta={s.eta} must be >= 0.")
  if s.guidance_scale < 0:
    raise ValueError(f"sample.guidance_scale={s.guidance_scale} must be >= 0 (1: no guidance).")
  if s.guidance_scale != 1 and null_label(config) is None:
    raise ValueError(
        f"sample.guidance_scale={s.guidance_scale} needs a class-conditional model trained "
        "with a null class: set model.num_class_embeds (classes + 1) and "
        "diffusion.label_dropout > 0, or sample.guidance_scale=1.")
  if s.num_per_class < 1:
    raise ValueError(f"sample.num_per_class={s.num_per_class} must be >= 1.")


@dataclasses.dataclass(frozen=True)
class DiffusionTask:
  """DDPM training of an image model (see the module docstring).

  Attributes:
    family: the model family (the UNet).
  """
  family: ModelFamily
  modality = "images"
  throughput_unit = "examples"
  console_keys = ()

  # --- Data.

  def check_config(self, config):
    m, d, f = config.model, config.data, config.diffusion
    if (d.image_size, d.image_channels) != (m.image_size, m.in_channels):
      raise ValueError(
          f"data.image_size={d.image_size}, data.image_channels={d.image_channels} must equal "
          f"model.image_size={m.image_size}, model.in_channels={m.in_channels}.")
    if m.out_channels != m.in_channels:
      raise ValueError(f"model.out_channels={m.out_channels} must equal model.in_channels="
                       f"{m.in_channels}: the model predicts noise (or images) of the input's "
                       "shape.")
    noise_schedule(config)  # Names a bad diffusion.* value.
    if not 0 <= f.label_dropout < 1:
      raise ValueError(f"diffusion.label_dropout={f.label_dropout} must be in [0, 1).")
    info = pipeline.dataset_info(d)
    if m.num_class_embeds:
      if not info.num_classes:
        raise ValueError(f"model.num_class_embeds={m.num_class_embeds} makes a class-conditional "
                         f"model but data.name={d.name!r} has no labels (data.label_key="
                         f"{d.label_key!r}); set model.num_class_embeds=0.")
      needed = info.num_classes + (1 if f.label_dropout > 0 else 0)
      if m.num_class_embeds != needed:
        extra = " plus the null class of diffusion.label_dropout" if f.label_dropout > 0 else ""
        raise ValueError(f"model.num_class_embeds={m.num_class_embeds} must be {needed}: the "
                         f"{info.num_classes} classes of data.name={d.name!r}{extra}.")
    elif f.label_dropout > 0:
      raise ValueError(f"diffusion.label_dropout={f.label_dropout} applies to class-conditional "
                       "models: set it to 0, or set model.num_class_embeds.")
    _check_sample_config(config)

  def make_train_iterator(self, config, *, process_index, process_count):
    return pipeline.make_train_iterator(config.data, seed=config.seed,
                                        process_index=process_index,
                                        process_count=process_count)

  def make_eval_batches(self, config, *, process_index, process_count):
    return pipeline.make_eval_batches(config.data, num_batches=config.evals.num_batches,
                                      process_index=process_index,
                                      process_count=process_count)

  def batch_axes(self):
    return {"images": IMAGE_AXES, "labels": ("batch",)}

  def dummy_batch(self, data_config, batch_size):
    size, channels = data_config.image_size, data_config.image_channels
    return {"images": np.zeros((batch_size, size, size, channels), np.float32),
            "labels": np.zeros((batch_size,), np.int32)}

  def units_per_batch(self, data_config):
    return data_config.global_batch_size

  def train_flops_per_batch(self, model_config, data_config):
    return model_config.train_flops_per_example() * data_config.global_batch_size

  # --- The model.

  def init_variables(self, model, rng, batch):
    labels = batch["labels"] if model.config.num_class_embeds else None
    timesteps = jnp.zeros(batch["labels"].shape, jnp.int32)
    return dict(model.init({"params": rng, "dropout": rng}, batch["images"], timesteps, labels))

  def loss_sums(self, model, variables, batch, rng, config, *, train=True):
    """Summed (weighted) per-example MSE; metrics: loss, mse (unweighted), weight = examples."""
    images = batch["images"].astype(jnp.float32)
    num = images.shape[0]
    schedule = noise_schedule(config)
    t_rng, noise_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
    timesteps = jax.random.randint(t_rng, (num,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(noise_rng, images.shape, jnp.float32)
    noisy = schedule_lib.add_noise(schedule, images, noise, timesteps)
    labels = None
    if model.config.num_class_embeds:
      labels = batch["labels"]
      null = null_label(config)
      if train and null is not None:
        dropped = jax.random.bernoulli(drop_rng, config.diffusion.label_dropout, (num,))
        labels = jnp.where(dropped, null, labels)
    prediction = model.apply(variables, noisy, timesteps, labels, deterministic=not train,
                             rngs={"dropout": dropout_rng} if train else None)
    target = schedule_lib.training_target(schedule, images, noise, timesteps)
    mse = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=(1, 2, 3))
    weight = schedule_lib.loss_weight(schedule, timesteps, config.diffusion.min_snr_gamma)
    loss = jnp.sum(weight * mse)
    return loss, {"loss": loss, "mse": jnp.sum(mse), "weight": jnp.asarray(num, jnp.float32)}

  def update_model_state(self, model_state, metrics, model):
    del metrics, model  # A UNet has no state outside its params.
    return model_state

  def summarize(self, sums):
    return metrics_lib.means(sums)

  # --- Sampling.

  def sample(self, model, variables, config, requests):
    """Images for the class labels `requests` (ignored by unconditional models: one image
    each) under `config.sample`, float32 [n, H, W, c] in [-1, 1]."""
    _check_sample_config(config)
    labels = np.asarray(list(requests), np.int32)
    if model.config.num_class_embeds:
      classes = num_classes(config)
      bad = labels[(labels < 0) | (labels >= classes)]
      if bad.size:
        raise ValueError(f"Class label {int(bad[0])} is not in [0, {classes}).")
    s = config.sample
    shape = (config.model.image_size, config.model.image_size, config.model.in_channels)
    rng = jax.random.PRNGKey(s.seed)
    generate = _sampler(model, noise_schedule(config), s.sampler, s.num_steps, s.spacing,
                        float(s.eta), float(s.guidance_scale), bool(s.clip_sample),
                        null_label(config))
    if not len(labels):
      return np.zeros((0,) + shape, np.float32)
    # Equal chunks (the last padded with repeats of its final label), so the sampler
    # compiles once for the whole request.
    batch = min(_SAMPLE_BATCH, len(labels))
    padded = np.concatenate([labels, np.full(-len(labels) % batch, labels[-1], np.int32)])
    outputs = []
    for start in range(0, len(padded), batch):
      noise_rng, step_rng = jax.random.split(jax.random.fold_in(rng, start))
      noise = jax.random.normal(noise_rng, (batch,) + shape, jnp.float32)
      outputs.append(np.asarray(generate(variables, noise, padded[start:start + batch],
                                         step_rng)))
    return np.concatenate(outputs)[:len(labels)]

  def class_rows(self, model, config) -> np.ndarray:
    """Labels of the closing grid: `num_per_class` of each class (one row per class), or
    `num_per_class` rows of unconditional samples."""
    per_class = config.sample.num_per_class
    if not model.config.num_class_embeds:
      return np.zeros((per_class * per_class,), np.int32)
    return np.repeat(np.arange(num_classes(config), dtype=np.int32), per_class)

  def report(self, model, variables, config, context):
    labels = self.class_rows(model, config)
    scored = self._scored_labels(model, config)
    # One call (one compilation) samples the grid and the scored images.
    images = self.sample(model, variables, config, np.concatenate([labels, scored]))
    images, scored_images = images[:len(labels)], images[len(labels):]
    picture = grid.image_grid(images, rows=len(labels) // config.sample.num_per_class)
    path = os.path.join(context.workdir, "samples", f"step_{context.step}.png")
    if jax.process_index() == 0:
      grid.write_png(path, picture)
      context.write_images({"samples": picture})
    context.print(f"samples ({config.sample.sampler}, {config.sample.num_steps} steps, "
                  f"guidance {config.sample.guidance_scale:g}): {path}")
    if len(scored):
      return self._score(scored_images, scored, config, context)
    return {}

  def _scored_labels(self, model, config) -> np.ndarray:
    """The classes asked for in the scored samples (cycling through them); none for an
    unconditional model."""
    if not model.config.num_class_embeds:
      return np.zeros((0,), np.int32)
    return np.arange(config.sample.num_scored, dtype=np.int32) % num_classes(config)

  def _score(self, samples, asked, config, context) -> dict[str, float]:
    """Probe accuracy on held-out real images, on class-conditional samples, on noise."""
    d = config.data
    train_data = d.copy_and_resolve_references()
    with train_data.unlocked():
      train_data.eval_split = d.train_split
      train_data.global_batch_size = _PROBE_TRAIN_IMAGES
    real = pipeline.make_eval_batches(train_data, num_batches=1, process_index=0,
                                      process_count=1)[0]
    info = pipeline.dataset_info(d)
    probe = probe_lib.fit_probe(real["images"], real["labels"], num_classes=info.num_classes,
                                seed=config.seed)
    heldout_data = d.copy_and_resolve_references()
    with heldout_data.unlocked():
      heldout_data.global_batch_size = config.sample.num_scored
    heldout = pipeline.make_eval_batches(heldout_data, num_batches=1, process_index=0,
                                         process_count=1)[0]
    noise = np.clip(np.random.default_rng(config.sample.seed).normal(size=samples.shape),
                    -1, 1).astype(np.float32)
    scores = {"real_class_accuracy": probe.accuracy(heldout["images"], heldout["labels"]),
              "sample_class_accuracy": probe.accuracy(samples, asked),
              "noise_class_accuracy": probe.accuracy(noise, asked)}
    context.print(
        f"a probe classifier fitted on real images recognises the class asked for in "
        f"{scores['sample_class_accuracy']:.1%} of {len(asked)} samples "
        f"(held-out real images: {scores['real_class_accuracy']:.1%}; pure noise: "
        f"{scores['noise_class_accuracy']:.1%}; chance {1 / info.num_classes:.1%})")
    return scores


def _sampler(model, schedule, sampler, num_steps, spacing, eta, guidance_scale, clip_sample,
             null):
  """A jitted (variables, noise [b, H, W, c], labels int [b], rng) -> images [b, H, W, c]."""

  def generate(variables, noise, labels, rng):
    conditional = bool(model.config.num_class_embeds)

    def apply(x, t, y):
      return model.apply(variables, x, t, y if conditional else None)

    if conditional and guidance_scale != 1:
      denoise = sampling.guided_denoiser(apply, labels, null, guidance_scale)
    else:
      def denoise(x, t):
        return apply(x, t, labels)
    return sampling.sample(denoise, schedule, noise, rng, sampler=sampler, num_steps=num_steps,
                           spacing=spacing, eta=eta, clip_sample=clip_sample)

  return jax.jit(generate)
