"""Unit tests of the trainer's small pieces: mesh, optimizer, metrics, flops, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, llama
from models.llama import LlamaConfig
from train import distributed, flops, metrics, optimizers, sampling, sharding


def _mesh_config(**sizes):
  config = base.get_base_config(LlamaConfig()).mesh
  config.update(sizes)
  return config


def test_mesh_fills_minus_one():
  assert sharding.mesh_shape(_mesh_config(data=-1, tensor=2), 8)["data"] == 4
  mesh = sharding.make_mesh(_mesh_config(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1, "sequence": 1}


@pytest.mark.parametrize("sizes, message", [
    ({"data": 3}, "= 3 devices, but 8"),
    ({"data": -1, "fsdp": -1}, "only one axis"),
    ({"data": -1, "tensor": 3}, "does not divide"),
    ({"data": 0}, "config.mesh.data=0"),
])
def test_mesh_errors_name_the_field(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(_mesh_config(**sizes), 8)


def test_schedule_warmup_then_cosine_to_end_factor():
  opt = base.get_base_config(LlamaConfig()).opt
  schedule = optimizers.learning_rate_schedule(opt, num_steps=300)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(opt.warmup_steps)), opt.lr, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(300)), opt.lr * opt.end_lr_factor, rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_optimizers_step_and_skip_decay_on_norms(name):
  opt = base.get_base_config(LlamaConfig()).opt
  opt.name = name
  opt.warmup_steps = 0
  params = {"dense": {"kernel": jnp.ones((4, 4))}, "norm": {"scale": jnp.ones((4,))}}
  optimizer = optimizers.make_optimizer(opt, num_steps=10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
  # With zero gradients only weight decay moves parameters: matrices, not norm scales.
  assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0
  assert float(jnp.abs(updates["norm"]["scale"]).max()) == 0


def test_unknown_optimizer_is_named():
  opt = base.get_base_config(LlamaConfig()).opt
  opt.name = "sgdd"
  with pytest.raises(ValueError, match="opt.name='sgdd'"):
    optimizers.make_optimizer(opt, 10)


def test_means_divide_by_weight_and_steps():
  out = metrics.means({"loss": 10.0, "weight": 5.0, "grad_norm": 4.0, "steps": 2.0})
  assert out == {"loss": 2.0, "grad_norm": 2.0}


def test_flops_match_hand_count():
  model = LlamaConfig.from_dict(llama.get_config("size=8b").model)
  # Llama-3 8B has ~7.0e9 non-embedding matmul weights plus a 0.5e9 output head.
  assert 7.4e9 < model.matmul_params() < 7.6e9
  assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops_per_device("cpu") is None
  assert flops.peak_flops_per_device("cpu", override_tflops=1.5) == 1.5e12


def test_progress_line_names_the_task_unit():
  scalars = {"loss": 1.5, "examples_per_sec": 250.0}
  line = metrics.progress_line(3, 10, scalars, rate_key="examples_per_sec")
  assert "250 examples/s" in line and "MFU n/a" in line
  assert "1,000 tok/s" in metrics.progress_line(3, 10, {"loss": 1.0, "tokens_per_sec": 1e3})


def test_top_k_and_top_p_filtering():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  top2 = sampling.filter_logits(logits, top_k=2, top_p=1.0)
  assert (np.asarray(top2) > -1e30).tolist() == [[True, True, False, False]]
  nucleus = sampling.filter_logits(logits, top_k=0, top_p=0.7)
  # 0.5 alone is below 0.7, so 0.3 joins; 0.15 and 0.05 are cut.
  assert (np.asarray(nucleus) > -1e30).tolist() == [[True, True, False, False]]
  tiny_p = sampling.filter_logits(logits, top_k=0, top_p=1e-6)
  assert (np.asarray(tiny_p) > -1e30).tolist() == [[True, False, False, False]]


def test_sampling_respects_the_filter_and_seed():
  logits = jnp.tile(jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1])), (256, 1))
  pick = lambda seed, **kw: np.asarray(sampling.choose_tokens(
      logits, jax.random.PRNGKey(seed), **kw))
  assert set(pick(0, temperature=1.0, top_k=2, top_p=1.0)) == {0, 1}
  np.testing.assert_array_equal(pick(1, temperature=1.0, top_k=0, top_p=1.0),
                                pick(1, temperature=1.0, top_k=0, top_p=1.0))
  assert set(pick(0, temperature=0.0, top_k=0, top_p=1.0)) == {0}


def test_left_pad_positions_and_segments():
  tokens, positions, segments = sampling.left_pad([[5, 6, 7], [8]], pad_id=0)
  np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8]])
  np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])
  np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0]])


def test_cluster_detection_from_launcher_environment():
  assert distributed.cluster_detected({"SLURM_NTASKS": "4"})
  assert not distributed.cluster_detected({"SLURM_NTASKS": "1"})
  assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})
  assert not distributed.cluster_detected({})


def test_checkpoint_compatibility_ignores_compute_only_fields():
  """A model may resume under another attention or MoE implementation, not another shape."""
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  def section(attention_impl="xla", **moe):
    moe = dict(dict(num_experts=8, impl="dropless", capacity_factor=1.25), **moe)
    return {"family": "moe", "attention_impl": attention_impl, "moe": moe}
  saved = section()
  same_params = section("pallas", impl="capacity", capacity_factor=2.0)
  assert checkpoint.model_config_differences(saved, same_params) == []
  assert checkpoint.model_config_differences(saved, section(num_experts=4)) == [
      "model.moe.num_experts: checkpoint has 8, config has 4"]
