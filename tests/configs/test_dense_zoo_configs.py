"""The released dense decoders' shapes (configs/dense_zoo.py, configs/llama.py): every size
builds, and parameter counts equal the published checkpoints'."""

import math

import jax
import jax.numpy as jnp
import pytest

from configs import dense_zoo, llama
from models.llama import Llama
from train import families

# Parameters of the released checkpoints (safetensors totals; tied heads counted once).
PUBLISHED = {(dense_zoo, "qwen2.5_0.5b"): 494_032_768, (dense_zoo, "qwen3_0.6b"): 596_049_920,
             (dense_zoo, "gemma3_1b"): 999_885_952, (dense_zoo, "mistral_7b"): 7_241_732_096,
             (llama, "3.2_1b"): 1_235_814_400}


def _params(config) -> int:
  model = Llama(families.model_config(config.model))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("module, size", sorted(PUBLISHED, key=lambda k: k[1]))
def test_parameter_counts_match_the_releases(module, size):
  assert _params(module.get_config(f"size={size}")) == PUBLISHED[(module, size)]


@pytest.mark.parametrize("size", sorted(dense_zoo.SIZES))
def test_every_size_builds_a_locked_config(size):
  config = dense_zoo.get_config(f"size={size},seq_len=2048")
  model = families.model_config(config.model)
  assert model.max_seq_len == config.data.seq_len == 2048
  assert (model.global_every > 0) == (not model.scan_layers)  # Gemma's interleaved layers unroll.
  with pytest.raises(AttributeError):
    config.model.qk_nrom = True


def test_llama31_sizes_carry_their_rope_scaling():
  model = families.model_config(llama.get_config("size=3.1_8b").model)
  assert (model.rope_scaling.kind, model.rope_scaling.factor,
          model.rope_scaling.original_context) == ("llama3", 8.0, 8192)
  assert families.model_config(llama.get_config("size=8b").model).rope_scaling.kind == "none"
  with pytest.raises(ValueError, match="Unknown dense_zoo size"):
    dense_zoo.get_config("size=qwen4_1b")
