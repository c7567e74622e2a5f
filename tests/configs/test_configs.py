"""Configs: variants, overrides, and errors that name the key."""

import subprocess
import sys

import jax
import pytest

from configs import common, llama, llama_tiny, moe
from models import moe as moe_model
from train import families


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
  assert common.parse_arg("flag,n=2", n=1, flag=False).flag  # A bare bool key turns it on.


@pytest.mark.parametrize("override, message", [
    ("--config.opt.lrr=1", "lrr"),
    ("--config.train.num_steps=many", "num_steps"),
    ("--config.model.moe.num_experts=4", "moe"),  # A Llama config has no MoE section.
    ("--config.model.nsa.windw=4", "windw"),
    ("--config.model.nsa.window=wide", "window"),
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
  cfg = families.model_config(config.model)
  assert isinstance(cfg, moe_model.MoeConfig)
  tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
  shapes = jax.eval_shape(lambda: moe_model.Moe(cfg).init(jax.random.key(0), tokens))
  gates = [x for path, x in jax.tree_util.tree_leaves_with_path(shapes["params"])
           if "'experts'" in jax.tree_util.keystr(path) and "'gate'" in jax.tree_util.keystr(path)]
  # [L_moe, E, e, m] scanned (real sizes), [E, e, m] per unrolled layer (tiny).
  assert gates and all(x.shape[-3] == cfg.moe.num_experts for x in gates)
  if size == "deepseek_v3_small":
    assert cfg.moe.bias_update_rate > 0 and cfg.moe.router == "sigmoid"
  with pytest.raises(ValueError, match="Unknown moe size"):
    moe.get_config("size=huge")


def test_model_section_is_the_family_dataclass():
  """config.model holds exactly the family's fields; optional parts nest."""
  llama_model = llama_tiny.get_config().model
  assert "moe" not in llama_model and "num_experts" not in llama_model
  assert llama_model.nsa.window == 512 and llama_model.family == "llama"
  moe_model_section = moe.get_config("size=tiny").model
  assert moe_model_section.moe.num_experts == 8 and moe_model_section.nsa.window == 512
  fields = {key for key in families.get_family("llama").model.config_class.help()}
  flat = {f"model.{key}" for key, value in llama_model.items() if key != "family"
          and not hasattr(value, "items")}
  nested = {f"model.{name}.{key}" for name, section in llama_model.items()
            if hasattr(section, "items") for key in section}
  assert {name for name in llama_model if hasattr(llama_model[name], "items")} == {
      "nsa", "rope_scaling"}
  assert flat | nested == fields


def test_unknown_or_old_model_fields_are_errors():
  with pytest.raises(ValueError, match="model.nsa.windw is not a field of NsaConfig"):
    families.model_config({"family": "llama", "nsa": {"windw": 3}})
  with pytest.raises(ValueError, match="model.num_layers='4' has type str"):
    families.model_config({"family": "llama", "num_layers": "4"})
  with pytest.raises(ValueError, match="predates Treadle's per-family config sections"):
    families.model_config({"family": "llama", "nsa_window": 512})
  with pytest.raises(ValueError, match="config.model.family='gpt'"):
    families.model_config({"family": "gpt"})
