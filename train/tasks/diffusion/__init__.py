"""Denoising diffusion on images: the task of the UNet family.

  task.py   DiffusionTask: image batches, the noising objective, sampling, the report
  probe.py  a small classifier fitted on real images that scores class-conditional samples
"""

from train.tasks.diffusion.task import DiffusionTask

__all__ = ["DiffusionTask"]
