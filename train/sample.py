r"""Samples from the latest checkpoint of a workdir.

  python -m train.sample --workdir=/tmp/tiny --prompt="12+34=" --max_new_tokens=8
  python -m train.sample --workdir=/tmp/tiny --prompt="The " --temperature=0.8 \
      --top_k=40 --top_p=0.95 --seed=3
  python -m train.sample --workdir=/tmp/unet_tiny --class_label=0 --class_label=2 \
      --sampler=ddpm --num_steps=250 --guidance_scale=3 --output=/tmp/grid.png

Unset sampling flags take the values of the run's `config.sample`; a flag the
run's sampler does not have (e.g. --temperature for a UNet) is an error. The
family's task does the sampling: a language model completes the prompts, a
diffusion model draws `--num_per_class` images of each `--class_label` (all
classes by default) from the EMA of its parameters and writes them as one grid
(one row per class) to --output.
"""

import os

from absl import app
from absl import flags
import numpy as np

from train import checkpoint
from train import families
from train.data.images import grid

_WORKDIR = flags.DEFINE_string("workdir", None, "A Treadle workdir with checkpoints.",
                               required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt(s) to complete (text models).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus mass (1: all).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
# Image models.
_CLASS_LABEL = flags.DEFINE_multi_integer(
    "class_label", None, "Class(es) to draw, one grid row each (default: every class).")
_NUM_PER_CLASS = flags.DEFINE_integer("num_per_class", None, "Images per class (grid columns).")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "ddpm"], "Diffusion sampler.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Denoising steps.")
_SPACING = flags.DEFINE_enum("spacing", None, ["leading", "trailing", "linspace"],
                             "Timestep spacing of the sampler.")
_ETA = flags.DEFINE_float("eta", None, "DDIM noise (0: deterministic).")
_GUIDANCE_SCALE = flags.DEFINE_float("guidance_scale", None,
                                     "Classifier-free guidance scale (1: none).")
_OUTPUT = flags.DEFINE_string("output", None,
                              "PNG path of the image grid (default WORKDIR/samples/sample.png).")

# Checked when the flags are parsed: a bad value exits with an error naming its flag.
_RULES = {
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "temperature": (lambda v: v >= 0, "must be >= 0 (0 is greedy)"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 keeps all tokens)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1] (1 keeps all tokens)"),
    "num_per_class": (lambda v: v >= 1, "must be >= 1"),
    "num_steps": (lambda v: v >= 1, "must be >= 1"),
    "eta": (lambda v: v >= 0, "must be >= 0"),
    "guidance_scale": (lambda v: v >= 0, "must be >= 0 (1 is no guidance)"),
}


def _register_validators() -> None:
  for name, (check, rule) in _RULES.items():
    flags.register_validator(name, lambda v, check=check: v is None or check(v),
                             message=f"{rule}.")


_register_validators()


def sample(workdir: str, requests, step: int | None = None, **overrides):
  """Samples of the checkpoint in `workdir` for `requests` (prompts of a text model,
  class labels of an image model); `overrides` set config.sample (None: unset).

  Returns completions (list[str]) or images (float [n, H, W, c] in [-1, 1]).
  """
  config = checkpoint.load_config(workdir, step)
  for key, value in overrides.items():
    if value is None:
      continue
    if key not in config.sample:
      raise ValueError(f"--{key} does not apply to a {config.model.family!r} model (its "
                       f"config.sample has {sorted(config.sample)}).")
    config.sample[key] = value
  model, variables = checkpoint.load_model(workdir, step)
  task = families.get_family(config.model.family).task
  if task.modality == "images" and requests is None:
    requests = task.class_rows(model, config)
  return task.sample(model, variables, config, requests)


def _sample_images(workdir: str, config) -> str:
  """Draws the grid the image flags ask for (`config`: the run's); returns the PNG path."""
  per_class = _NUM_PER_CLASS.value or config.sample.num_per_class
  labels = None
  if _CLASS_LABEL.value:
    labels = np.repeat(np.asarray(_CLASS_LABEL.value, np.int32), per_class)
  images = sample(workdir, labels, _STEP.value, num_per_class=per_class,
                  sampler=_SAMPLER.value, num_steps=_NUM_STEPS.value, spacing=_SPACING.value,
                  eta=_ETA.value, guidance_scale=_GUIDANCE_SCALE.value, seed=_SEED.value)
  output = _OUTPUT.value or os.path.join(workdir, "samples", "sample.png")
  grid.write_png(output, grid.image_grid(images, rows=len(images) // per_class))
  return output


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = checkpoint.load_config(_WORKDIR.value, _STEP.value)
  family = config.model.family
  if families.get_family(family).task.modality == "images":
    if _PROMPT.value:
      raise app.UsageError(f"--prompt does not apply to the {family!r} model in "
                           f"{_WORKDIR.value}: it draws images (see --class_label).")
    print(f"Wrote {_sample_images(_WORKDIR.value, config)}")
    return
  if not _PROMPT.value:
    raise app.UsageError("--prompt is required to sample a text model.")
  completions = sample(_WORKDIR.value, _PROMPT.value, _STEP.value,
                       max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                       top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
  for prompt, completion in zip(_PROMPT.value, completions):
    print(f"{prompt}{completion}")


if __name__ == "__main__":
  app.run(main)
