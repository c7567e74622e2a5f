"""Random UNet parameters without compiling `init` (XLA:CPU takes ~0.1 s per random op to
compile, and a UNet has a hundred parameters)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.unet.config import UNetConfig
from models.unet.model import UNet


def abstract_variables(cfg: UNetConfig, batch: int = 1):
  """The boxed variables of `UNet(cfg)` as ShapeDtypeStructs, with their logical axes."""
  images = jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.in_channels))
  labels = jnp.zeros((batch,), jnp.int32) if cfg.num_class_embeds else None
  return jax.eval_shape(lambda: UNet(cfg).init(jax.random.key(0), images, jnp.zeros(batch),
                                               labels))


def random_like(abstract_params, seed: int = 0) -> dict:
  """Plain float32 params shaped like `abstract_params` (boxed or plain): N(0, 1/fan_in)
  kernels, N(0, 0.1²) biases and embeddings, 1 + N(0, 0.1²) norm scales."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    base = 1.0 if name == "scale" else 0.0
    return (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params))


def random_params(cfg: UNetConfig, seed: int = 0) -> dict:
  """Random plain params of `UNet(cfg)` (see `random_like`)."""
  return random_like(abstract_variables(cfg)["params"], seed)
