"""Configs: variants, overrides, and errors that name the key."""

import subprocess
import sys

import jax
import pytest

from configs import common, llama, llama_tiny, moe
from models import moe as moe_model


def test_tiny_is_locked_and_typed():
  config = llama_tiny.get_config()
  with pytest.raises(AttributeError, match="lrr"):
    config.opt.lrr = 1.0
  with pytest.raises(TypeError, match="lr"):
    config.opt.lr = "fast"


def test_llama_sizes_are_real_shapes():
  config = llama.get_config("size=8b,seq_len=8192")
  assert (config.model.embed_dim, config.model.num_layers, config.model.mlp_dim) == (
      4096, 32, 14336)
  assert config.data.seq_len == config.model.max_seq_len == 8192
  assert llama.get_config("size=tiny").model.embed_dim == llama_tiny.get_config().model.embed_dim


@pytest.mark.parametrize("arg, message", [
    ("size=5t", "Unknown llama size"),
    ("sise=1b", "Unknown config argument 'sise'"),
    ("size", "key=value"),
])
def test_bad_config_arguments(arg, message):
  with pytest.raises(ValueError, match=message):
    llama.get_config(arg)


def test_parse_arg_types():
  parsed = common.parse_arg("n=3,flag=true,lr=0.5", n=1, flag=False, lr=1.0)
  assert (parsed.n, parsed.flag, parsed.lr) == (3, True, 0.5)


@pytest.mark.parametrize("override, message", [
    ("--config.opt.lrr=1", "lrr"),
    ("--config.train.num_steps=many", "num_steps"),
])
def test_command_line_override_errors_name_the_key(override, message, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "train.main", "--config=configs/llama_tiny.py",
       f"--workdir={tmp_path}", override], capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr


@pytest.mark.parametrize("size", ["tiny", "mixtral_8x7b", "qwen2_moe_a2.7b",
                                  "deepseek_v3_small"])
def test_moe_sizes_build_valid_models(size):
  """Every MoE size validates as a model config, and its model traces abstractly."""
  config = moe.get_config(f"size={size}")
  assert config.model.family == "moe"
  cfg = moe_model.MoeConfig.from_config_dict(config.model)
  tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
  shapes = jax.eval_shape(lambda: moe_model.Moe(cfg).init(jax.random.key(0), tokens))
  gates = [x for path, x in jax.tree_util.tree_leaves_with_path(shapes["params"])
           if "'experts'" in jax.tree_util.keystr(path) and "'gate'" in jax.tree_util.keystr(path)]
  # [L_moe, E, e, m] scanned (real sizes), [E, e, m] per unrolled layer (tiny).
  assert gates and all(x.shape[-3] == cfg.num_experts for x in gates)
  if size == "deepseek_v3_small":
    assert config.opt.moe_bias_update_rate > 0 and cfg.router == "sigmoid"
  with pytest.raises(ValueError, match="Unknown moe size"):
    moe.get_config("size=huge")
