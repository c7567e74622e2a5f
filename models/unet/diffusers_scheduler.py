"""A diffusers scheduler config (DDPMScheduler / DDIMScheduler) <-> Treadle run settings.

The noise schedule is not part of the UNet's weights: diffusers keeps it in
scheduler_config.json beside the model (or under scheduler/ in a pipeline).
Importing maps it onto `config.diffusion.*` (the forward process the model was
trained for) and `config.sample.*` (how to sample it); exporting writes a
DDPMScheduler config from them, which diffusers' DDPMScheduler and
DDIMScheduler both read.

A setting Treadle's samplers do not reproduce (trained betas, thresholding, a
variance type other than fixed_small, zero-SNR rescaling, clip ranges other than
1) is refused with its name, rather than sampled differently.
"""

import json
import os
from typing import Any

SCHEDULER_NAME = "scheduler_config.json"
_DIFFUSERS_VERSION = "0.42.1"
# diffusers beta_schedule -> config.diffusion.beta_schedule.
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                   "squaredcos_cap_v2": "cosine"}
_SAMPLERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
# Fields whose value must be the one given (None: absent or None) for Treadle to sample alike.
_REQUIRED = {"trained_betas": None, "thresholding": False, "variance_type": "fixed_small",
             "rescale_betas_zero_snr": False, "clip_sample_range": 1.0, "steps_offset": 0}


def find_scheduler_config(path: str) -> str | None:
  """The scheduler_config.json that belongs with a model directory, or None."""
  candidates = (os.path.join(path, SCHEDULER_NAME),
                os.path.join(path, "scheduler", SCHEDULER_NAME),
                os.path.join(os.path.dirname(os.path.abspath(path)), "scheduler", SCHEDULER_NAME))
  return next((c for c in candidates if os.path.isfile(c)), None)


def run_settings(scheduler: dict[str, Any], source: str = SCHEDULER_NAME) -> dict[str, Any]:
  """A scheduler config's values as {'diffusion.<field>' | 'sample.<field>': value}.

  Raises:
    ValueError: naming each field Treadle cannot reproduce.
  """
  refused = [f"{key}={scheduler[key]!r} (Treadle: {value!r})"
             for key, value in _REQUIRED.items() if scheduler.get(key, value) != value]
  beta_schedule = scheduler.get("beta_schedule", "linear")
  if beta_schedule not in _BETA_SCHEDULES:
    refused.append(f"beta_schedule={beta_schedule!r} (Treadle: {sorted(_BETA_SCHEDULES)})")
  if refused:
    raise ValueError(f"{source} sets what Treadle's samplers do not reproduce: "
                     + "; ".join(refused) + ".")
  settings = {
      "diffusion.num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
      "diffusion.beta_schedule": _BETA_SCHEDULES[beta_schedule],
      "diffusion.beta_start": float(scheduler.get("beta_start", 1e-4)),
      "diffusion.beta_end": float(scheduler.get("beta_end", 0.02)),
      "diffusion.prediction_type": scheduler.get("prediction_type", "epsilon"),
      "sample.clip_sample": bool(scheduler.get("clip_sample", True)),
  }
  if "timestep_spacing" in scheduler:
    settings["sample.spacing"] = scheduler["timestep_spacing"]
  if scheduler.get("_class_name") in _SAMPLERS:
    settings["sample.sampler"] = _SAMPLERS[scheduler["_class_name"]]
  return settings


def read_run_settings(path: str) -> dict[str, Any]:
  """The run settings of the scheduler config found with the model at `path` ({} if none)."""
  if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "unet")):
    path = os.path.join(path, "unet")
  found = find_scheduler_config(path)
  if found is None:
    return {}
  with open(found) as f:
    return run_settings(json.load(f), found)


def scheduler_config(config) -> dict[str, Any]:
  """The DDPMScheduler config of a run config's `diffusion` and `sample` sections."""
  f, s = config.diffusion, config.sample
  beta_schedule = {v: k for k, v in _BETA_SCHEDULES.items()}[f.beta_schedule]
  return {"_class_name": "DDPMScheduler", "_diffusers_version": _DIFFUSERS_VERSION,
          "num_train_timesteps": f.num_train_timesteps, "beta_start": f.beta_start,
          "beta_end": f.beta_end, "beta_schedule": beta_schedule,
          "prediction_type": f.prediction_type, "clip_sample": s.clip_sample,
          "timestep_spacing": s.spacing, **{k: v for k, v in _REQUIRED.items()}}


def write_run_settings(dst: str, config) -> list[str]:
  """Writes DST/scheduler_config.json from the run config; returns its path."""
  os.makedirs(dst, exist_ok=True)
  path = os.path.join(dst, SCHEDULER_NAME)
  with open(path, "w") as f:
    json.dump(scheduler_config(config), f, indent=2)
  return [path]
