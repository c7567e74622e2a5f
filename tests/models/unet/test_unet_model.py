"""The UNet model: config validation, inputs, the tiny default, logical axes, dropout, remat."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unet_params

from configs.base import DEFAULT_LOGICAL_AXIS_RULES
from models.unet import FAMILY
from models.unet.config import UNetConfig
from models.unet.model import UNet

# A small model with every kind of block, for the tests that run it.
SMALL = UNetConfig(image_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                   down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=4)


@pytest.mark.parametrize("overrides, field", [
    (dict(down_block_types=("DownBlock2D",)), "model.down_block_types"),
    (dict(up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
     "model.up_block_types"),
    (dict(norm_num_groups=24), "model.norm_num_groups"),
    (dict(attention_head_dim=24), "model.attention_head_dim"),
    (dict(image_size=30), "model.image_size"),
    (dict(downsample_padding=2), "model.downsample_padding"),
    (dict(num_class_embeds=-1), "model.num_class_embeds"),
    (dict(attention_impl="flash"), "model.attention_impl"),
    (dict(remat_policy="some"), "model.remat_policy"),
    (dict(block_out_channels=()), "model.block_out_channels"),
    (dict(block_out_channels=(16, 32, 32), freq_shift=8), "model.freq_shift"),
    (dict(dtype="float33"), "model.dtype"),
])
def test_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    UNetConfig(**overrides)


def test_family_registration():
  assert FAMILY.name == "unet" and FAMILY.model_class is UNet and FAMILY.init_cache is None
  assert "unet2d" in FAMILY.converters
  assert UNetConfig().train_flops_per_token(128) is None


def test_tiny_default_shapes_and_logical_axes():
  cfg = UNetConfig()
  images = jnp.zeros((2, cfg.image_size, cfg.image_size, cfg.in_channels))
  variables = jax.eval_shape(lambda: UNet(cfg).init(jax.random.key(0), images, jnp.zeros(2)))
  out = jax.eval_shape(lambda v: UNet(cfg).apply(v, images, jnp.zeros(2)), variables)
  assert out.shape == images.shape and out.dtype == jnp.float32
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) for v in leaves)
  count = sum(np.prod(v.value.shape) for v in leaves)
  assert count == 280_755  # (16, 32, 32) channels, one resnet per down block.
  known = {name for name, _ in DEFAULT_LOGICAL_AXIS_RULES}
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= known, leaf.names
  assert 0.1e9 < cfg.forward_flops_per_example() < 0.2e9  # about 0.16 GFLOPs
  assert cfg.train_flops_per_example() == 3 * cfg.forward_flops_per_example()


def test_labels_required_iff_class_conditional():
  cfg = dataclasses.replace(SMALL, num_class_embeds=3)
  images = jnp.zeros((2, 8, 8, 3))
  with pytest.raises(ValueError, match="model.num_class_embeds=3"):
    jax.eval_shape(lambda: UNet(cfg).init(jax.random.key(0), images, jnp.zeros(2)))
  with pytest.raises(ValueError, match="num_class_embeds=0"):
    jax.eval_shape(lambda: UNet(SMALL).init(jax.random.key(0), images, jnp.zeros(2),
                                            jnp.zeros(2, jnp.int32)))
  with pytest.raises(ValueError, match="multiples of 2"):
    jax.eval_shape(lambda: UNet(SMALL).init(jax.random.key(0), jnp.zeros((2, 7, 8, 3)),
                                            jnp.zeros(2)))


def test_labels_timesteps_and_dropout_change_what_they_should():
  # One level (no resampling) keeps the compile short; parity tests cover deeper UNets.
  cfg = dataclasses.replace(SMALL, image_size=4, block_out_channels=(8,), num_class_embeds=3,
                            down_block_types=("AttnDownBlock2D",), dropout=0.5,
                            up_block_types=("AttnUpBlock2D",))
  variables = {"params": unet_params.random_params(cfg)}
  images = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))

  @jax.jit
  def run(timesteps, labels):
    plain = UNet(cfg).apply(variables, images, timesteps, labels)
    dropped = UNet(cfg).apply(variables, images, timesteps, labels, deterministic=False,
                              rngs={"dropout": jax.random.key(2)})
    return plain, dropped

  base, dropped = run(jnp.array([10, 10]), jnp.array([0, 0]))
  assert not np.allclose(np.asarray(dropped), np.asarray(base), atol=1e-3)
  other_label = run(jnp.array([10, 10]), jnp.array([0, 2]))[0]
  np.testing.assert_array_equal(np.asarray(other_label[0]), np.asarray(base[0]))
  assert not np.allclose(np.asarray(other_label[1]), np.asarray(base[1]), atol=1e-3)
  other_time = run(jnp.array([10, 500]), jnp.array([0, 0]))[0]
  np.testing.assert_array_equal(np.asarray(other_time[0]), np.asarray(base[0]))
  assert not np.allclose(np.asarray(other_time[1]), np.asarray(base[1]), atol=1e-3)


def test_remat_policy_builds_the_same_parameters():
  remat = dataclasses.replace(SMALL, remat_policy="dots_saveable")
  def shapes(cfg):
    return jax.tree.map(lambda v: v.shape, unet_params.abstract_variables(cfg))

  assert shapes(remat) == shapes(SMALL)


def test_flops_count_agrees_with_xla():
  """XLA's HLO count skips the zero-padding taps at image borders and adds the elementwise
  ops, so it lands a few percent under the dense count."""
  cfg = dataclasses.replace(SMALL, image_size=16, layers_per_block=2, block_out_channels=(32, 64))
  params = unet_params.abstract_variables(cfg)["params"]
  images = jnp.zeros((1, 16, 16, 3))
  forward = jax.jit(lambda p: UNet(cfg).apply({"params": p}, images, jnp.zeros(1)))
  xla_flops = forward.lower(params).cost_analysis()["flops"]
  assert 0.85 < xla_flops / cfg.forward_flops_per_example() < 1.05
