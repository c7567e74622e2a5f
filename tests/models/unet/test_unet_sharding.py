"""The tiny UNet with its parameters and batch sharded over 8 fake CPU devices."""

import flax.linen as nn
import jax
import numpy as np
from helpers import unet_params
from jax.sharding import Mesh, NamedSharding

from configs.base import DEFAULT_LOGICAL_AXIS_RULES
from models.unet.config import UNetConfig
from models.unet.model import UNet
from train.sharding import MESH_AXES


def test_sharded_forward_matches_single_device():
  cfg = UNetConfig(num_class_embeds=3)  # The tiny default, class-conditional.
  model, params = UNet(cfg), unet_params.random_params(cfg)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((4, 16, 16, 3)).astype(np.float32)
  timesteps, labels = np.array([0, 5, 300, 999]), np.array([0, 1, 2, 1])
  forward = lambda p, x, t, y: model.apply({"params": p}, x, t, y)  # noqa: E731
  want = jax.jit(forward)(params, images, timesteps, labels)

  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2, 1, 1), MESH_AXES)  # data, fsdp, tensor
  rules = tuple(DEFAULT_LOGICAL_AXIS_RULES)
  specs = nn.get_partition_spec(unet_params.abstract_variables(cfg)["params"])
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  assert tuple(shardings["conv_in"]["kernel"].spec) == (None,) * 4  # 3 RGB channels
  assert shardings["down_blocks_0"]["resnets_0"]["conv1"]["kernel"].spec[2] == "fsdp"
  batch = lambda *axes: NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules))  # noqa: E731
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded_params = jax.device_put(params, shardings)
    got = jax.jit(forward, in_shardings=(shardings, batch("batch", "height", "width", "channels"),
                                         batch("batch"), batch("batch")))(
        sharded_params, images, timesteps, labels)
  assert tuple(got.sharding.spec)[0] in (("data", "fsdp"), ("data", "fsdp", "expert"))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
