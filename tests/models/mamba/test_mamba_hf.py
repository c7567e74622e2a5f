"""Parity of Treadle's Mamba with transformers' Mamba2ForCausalLM, and checkpoint conversion.

torch runs on CPU in float32 (its pure-torch chunked fallback); every HF
parameter is perturbed away from its initialisation. The fallback takes no
seq_idx, so packed rows are checked against the documents run separately.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO_ROOT as REPO
from helpers.hf import make_mamba2
from models import hf_io
from models.mamba import Mamba, MambaConfig
from models.mamba import hf as mamba_hf
from train import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

jax.config.update("jax_default_matmul_precision", "highest")
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 21)).astype(np.int32)


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.numpy()


def treadle_logits(params, cfg: MambaConfig, tokens=TOKENS, segment_ids=None) -> np.ndarray:
  fn = jax.jit(lambda p, t, s: Mamba(cfg).apply({"params": p}, t, segment_ids=s))
  return np.asarray(fn(params, tokens, segment_ids))


@pytest.mark.parametrize("tied,scan", [(False, True), (True, False)])
def test_import_matches_torch(tied, scan, tmp_path):
  model = make_mamba2(tied, str(tmp_path))
  hf_config, tensors = hf_io.read_hf_dir(str(tmp_path))
  fields = mamba_hf.model_config_from_hf(hf_config)
  assert fields == dict(vocab_size=300, embed_dim=32, num_layers=2, num_heads=8, head_dim=8,
                        state_size=16, num_groups=2, conv_kernel=4, chunk_size=8,
                        time_step_limit=(0.0, float("inf")), max_seq_len=2048, norm_eps=1e-5,
                        tie_embeddings=tied)
  cfg = MambaConfig(**fields, scan_layers=scan, dtype="float32")
  params = mamba_hf.params_from_hf(tensors, cfg)
  abstract = jax.eval_shape(
      lambda: nn.unbox(Mamba(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))))
  assert jax.tree.structure(params) == jax.tree.structure(abstract["params"])
  jax.tree.map(lambda p, a: (p.shape, p.dtype) == (a.shape, a.dtype) or pytest.fail(str(a)),
               params, abstract["params"])
  expected = torch_logits(model)
  diff = np.abs(treadle_logits(params, cfg) - expected).max()
  print(f"max |logit diff| = {diff:.2e}")
  assert diff <= 1e-4, diff
  # And back: the HF tensors are reproduced exactly.
  back = mamba_hf.hf_from_params(params, cfg)
  assert set(back) == set(tensors) - ({"lm_head.weight"} if tied else set())
  for name, value in back.items():
    np.testing.assert_array_equal(value, tensors[name], err_msg=name)
  # A packed row: each document equals transformers run on it alone.
  if not tied:
    return
  lengths = (8, 5, 8)
  seg = np.repeat(np.arange(1, 4), lengths)[None].repeat(2, 0).astype(np.int32)
  packed = treadle_logits(params, cfg, TOKENS, seg)
  start = 0
  for length in lengths:
    alone = torch_logits(model, TOKENS[:, start:start + length])
    np.testing.assert_allclose(packed[:, start:start + length], alone, rtol=0, atol=1e-4)
    start += length


def test_refuses_what_it_cannot_hold():
  base = dict(model_type="mamba2", vocab_size=10, hidden_size=8, num_hidden_layers=1,
              num_heads=4, head_dim=4, expand=2, state_size=4)
  assert mamba_hf.model_config_from_hf(base)["num_groups"] == 1
  with pytest.raises(ValueError, match="use_bias"):
    mamba_hf.model_config_from_hf({**base, "use_bias": True})
  with pytest.raises(ValueError, match="num_heads"):
    mamba_hf.model_config_from_hf({**base, "head_dim": 3})
  with pytest.raises(ValueError, match="model_type='mamba'"):
    mamba_hf.model_config_from_hf({**base, "model_type": "mamba"})


def test_cli_round_trip(tmp_path):
  """train.convert import -> load_model parity -> export -> transformers reloads it."""
  hf_dir, workdir, out_dir = (str(tmp_path / n) for n in ("hf", "workdir", "out"))
  model = make_mamba2(False, hf_dir)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  result = subprocess.run(
      [sys.executable, "-m", "train.convert", "import", "--model=mamba2", hf_dir, workdir,
       "--config=configs/mamba_tiny.py"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  config = checkpoint.load_config(workdir)
  assert config.model.family == "mamba" and config.model.num_groups == 2
  loaded, variables = checkpoint.load_model(workdir, dtype="float32")
  assert config.model.dtype == "bfloat16" and loaded.config.dtype == "float32"
  logits = jax.jit(loaded.apply)(variables, TOKENS)
  np.testing.assert_allclose(logits, torch_logits(model), rtol=0, atol=1e-4)
  paths = convert.export_checkpoint("mamba2", workdir, out_dir)
  assert os.path.join(out_dir, "model.safetensors") in paths
  reloaded = transformers.Mamba2ForCausalLM.from_pretrained(out_dir).float().eval()
  assert reloaded.config.n_groups == 2 and reloaded.config.chunk_size == 8
  np.testing.assert_allclose(torch_logits(reloaded), torch_logits(model), rtol=0, atol=1e-6)
