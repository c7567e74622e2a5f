"""The UNet layers against diffusers' and plain references: timestep features, resampling,
group norm, and the spatial self-attention with its non-causal attention switch."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unet_params

from layers.attention import implementations
from layers.unet import (BlockOptions, DownBlock2D, Downsample2D, GroupNorm,
                         SpatialSelfAttention, Upsample2D, sinusoidal_embedding)


@pytest.mark.parametrize("flip, shift, dim", [(False, 1, 32), (True, 0, 32), (True, 1, 7)])
def test_sinusoidal_embedding_matches_diffusers(flip, shift, dim):
  torch = pytest.importorskip("torch")
  embeddings = pytest.importorskip("diffusers.models.embeddings")
  timesteps = np.array([0, 1, 17, 500.5, 999], np.float32)
  want = embeddings.get_timestep_embedding(torch.from_numpy(timesteps), dim,
                                           flip_sin_to_cos=flip, downscale_freq_shift=shift)
  got = sinusoidal_embedding(jnp.asarray(timesteps), dim, flip_sin_to_cos=flip, freq_shift=shift)
  assert got.shape == (5, dim)
  # float32 angles up to ~1000 rad: one ulp of a frequency moves them by ~6e-5.
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4)


@pytest.mark.parametrize("padding", [1, 0])
def test_downsample_padding(padding):
  """With a kernel of one tap at (0, 0), output (i, j) reads input (2i - p, 2j - p):
  padding=1 pads every side (output (0, 0) reads a zero), padding=0 only the bottom and
  right (output (0, 0) reads input (0, 0); Flax 'SAME' would too, but not for padding=1)."""
  x = jnp.arange(1.0, 1 + 8 * 8).reshape(1, 8, 8, 1)
  layer = Downsample2D(padding)
  params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
  params["conv"]["kernel"] = jnp.zeros((3, 3, 1, 1)).at[0, 0].set(1.0)
  y = layer.apply({"params": params}, x)
  assert y.shape == (1, 4, 4, 1)
  assert float(y[0, 1, 1, 0]) == float(x[0, 2 - padding, 2 - padding, 0])
  assert float(y[0, 0, 0, 0]) == (0.0 if padding else float(x[0, 0, 0, 0]))


def test_upsample_is_nearest_then_conv():
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
  layer = Upsample2D()
  params = nn.unbox(layer.init(jax.random.key(1), x)["params"])
  identity = jnp.zeros((3, 3, 4, 4)).at[1, 1].set(jnp.eye(4))
  params["conv"] = {"kernel": identity, "bias": jnp.zeros(4)}
  y = layer.apply({"params": params}, x)
  np.testing.assert_array_equal(np.asarray(y), np.repeat(np.repeat(np.asarray(x), 2, 1), 2, 2))


def test_group_norm_matches_grouped_reference():
  x = 3.0 + jax.random.normal(jax.random.key(0), (2, 4, 6, 12))
  layer = GroupNorm(3, eps=1e-6)
  variables = layer.init(jax.random.key(1), x)
  params = {"scale": jnp.linspace(0.5, 2, 12), "bias": jnp.linspace(-1, 1, 12)}
  got = layer.apply({"params": params}, x)
  g = np.asarray(x, np.float64).reshape(2, 4, 6, 3, 4)
  normed = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
      g.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
  want = normed.reshape(x.shape) * np.asarray(params["scale"]) + np.asarray(params["bias"])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  assert all(isinstance(v, nn.Partitioned) for v in jax.tree.leaves(
      variables, is_leaf=lambda v: isinstance(v, nn.Partitioned)))


def _softmax_attention(q, k, v):
  """Plain non-causal softmax attention, [b, t, h, d], in float64 numpy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_dot_product_attention_non_causal(impl):
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (2, 24, 2, 16)) for key in keys)
  attend = jax.jit(functools.partial(implementations.dot_product_attention, impl=impl,
                                     interpret=True), static_argnames="causal")
  with jax.default_matmul_precision("highest"):
    got = attend(q, k, v, causal=False)
    causal = attend(q, k, v)
  np.testing.assert_allclose(np.asarray(got), _softmax_attention(q, k, v), atol=2e-5)
  # The first query of causal attention sees only key 0; non-causal differs there.
  assert not np.allclose(np.asarray(causal[:, 0]), np.asarray(got[:, 0]), atol=1e-3)


@pytest.mark.parametrize("head_dim", [0, 4])
def test_spatial_attention_matches_softmax_reference(head_dim):
  x = jax.random.normal(jax.random.key(0), (2, 4, 3, 8))
  layer = SpatialSelfAttention(head_dim, num_groups=2, eps=1e-5, attention_impl="xla")
  params = unet_params.random_like(jax.eval_shape(layer.init, jax.random.key(1), x)["params"])
  with jax.default_matmul_precision("highest"):
    got = jax.jit(layer.apply)({"params": params}, x)
    normed = GroupNorm(2, 1e-5).apply({"params": params["group_norm"]}, x).reshape(2, 12, 8)
  h, d = (1, 8) if head_dim == 0 else (2, 4)

  def proj(name, y):
    return np.asarray(y, np.float64) @ params[name]["kernel"] + params[name]["bias"]

  q, k, v = (proj(name, normed).reshape(2, 12, h, d) for name in ("to_q", "to_k", "to_v"))
  want = np.asarray(x) + proj("to_out_0", _softmax_attention(q, k, v).reshape(2, 12, 8)).reshape(
      x.shape)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_down_block_remat_keeps_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  temb = jax.random.normal(jax.random.key(1), (2, 16))
  options = BlockOptions(num_groups=4, head_dim=4, attention_impl="xla")
  block = lambda remat: DownBlock2D(8, 2, attention=True, add_downsample=True,  # noqa: E731
                                    options=dataclasses.replace(options, remat=remat))
  params = unet_params.random_like(
      jax.eval_shape(lambda: block(False).init(jax.random.key(2), x, temb))["params"])

  def loss(params, remat):
    out, skips = block(remat).apply({"params": params}, x, temb)
    return jnp.sum(out ** 2) + sum(jnp.sum(s) for s in skips)

  plain, remat = jax.jit(lambda p: (jax.value_and_grad(loss)(p, False),
                                    jax.value_and_grad(loss)(p, True)))(params)
  assert sorted(params) == ["attentions_0", "attentions_1", "downsamplers_0", "resnets_0",
                            "resnets_1"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), plain, remat)


def test_spatial_attention_exports_for_cuda_with_cudnn(monkeypatch):
  """attention_impl='cudnn' lowers for CUDA from this host as a non-causal cuDNN call without
  a mask (a CPU-only jaxlib has no cuDNN version to check: the test stands in for it)."""
  from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
  if cuda_versions is None:
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not hasattr(fused, "check_cudnn_version"):
      pytest.skip("CPU-only jaxlib and no cuDNN version check to stand in for.")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 90800)
  layer = SpatialSelfAttention(16, num_groups=4, attention_impl="cudnn", dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 8, 8, 32), jnp.bfloat16)
  params = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
  checks = [jax.export.DisabledSafetyCheck.custom_call("__cudnn$fmhaSoftmax")]
  exported = jax.export.export(jax.jit(lambda p, x: layer.apply({"params": p}, x)),
                               platforms=["cuda"], disabled_checks=checks)(params, x)
  text = exported.mlir_module()
  assert "__cudnn$fmhaSoftmax" in text and "NO_MASK" in text
