"""Parity of Treadle's RWKV-7 with the `rwkv` package (v7, CPU fp32), and the .pth converter.

Every parameter is perturbed away from its initialisation; the weights go to a
.pth written by torch, which both the package and Treadle's torch-free reader load.
"""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from helpers import REPO_ROOT as REPO
from models.rwkv import Rwkv, RwkvConfig
from models.rwkv import pth
from train import convert

torch = pytest.importorskip("torch")

jax.config.update("jax_default_matmul_precision", "highest")
CFG = RwkvConfig(vocab_size=97, embed_dim=64, num_layers=3, head_size=16, hidden_dim=256,
                 decay_rank=8, iclr_rank=12, value_rank=8, gate_rank=16, dtype="float32")
TOKENS = [int(t) for t in np.random.default_rng(0).integers(0, 97, 23)]


def perturbed_params(cfg: RwkvConfig, seed: int = 0) -> dict:
  """The initialisation, jitted (run eagerly, each of its ops compiles separately), plus
  0.2 x standard-normal noise from numpy (jax.random would compile once per shape)."""
  init = jax.jit(Rwkv(cfg).init)
  params = nn.unbox(init(jax.random.key(seed), np.zeros((1, 4), np.int32))["params"])
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed + 1)
  leaves = [np.asarray(w) + np.float32(0.2) * rng.standard_normal(w.shape, np.float32)
            for w in leaves]
  return jax.tree.unflatten(tree, leaves)


def rwkv_package_logits(stem: str, tokens) -> np.ndarray:
  """Full-sequence logits from the `rwkv` package (a fresh process: it reads its env at import)."""
  script = ("import os, sys, numpy as np\n"
            "os.environ['RWKV_V7_ON'] = '1'; os.environ['RWKV_CUDA_ON'] = '0'\n"
            "from rwkv.model import RWKV\n"
            f"m = RWKV(model={stem!r}, strategy='cpu fp32')\n"
            f"out, _ = m.forward({list(tokens)!r}, None, full_output=True)\n"
            f"np.save({stem + '.npy'!r}, out.float().numpy())\n")
  subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=REPO)
  return np.load(stem + ".npy")


@pytest.fixture(scope="module")
def torch_pth(tmp_path_factory):
  pytest.importorskip("rwkv")
  params = perturbed_params(CFG)
  stem = str(tmp_path_factory.mktemp("rwkv") / "model")
  tensors = pth.pth_from_params(params, CFG)
  torch.save({k: torch.from_numpy(np.array(w)) for k, w in tensors.items()}, stem + ".pth")
  return stem, params


def test_logits_match_rwkv_package(torch_pth):
  stem, _ = torch_pth
  expected = rwkv_package_logits(stem, TOKENS)
  cfg, params = pth.read_checkpoint(stem + ".pth")
  assert cfg.num_heads == 4 and cfg.value_rank == 8 and cfg.iclr_rank == 12
  cfg = dataclasses.replace(cfg, dtype="float32")
  logits = Rwkv(cfg).apply({"params": params}, np.array([TOKENS], np.int32))[0]
  assert np.abs(expected).max() > 1.0  # the perturbed model is far from uniform
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_pth_round_trip_without_torch(tmp_path, torch_pth):
  stem, params = torch_pth
  # Treadle's reader equals torch.load on the torch-written file.
  ours = pth.read_pth(stem + ".pth")
  theirs = torch.load(stem + ".pth", weights_only=True)
  assert set(ours) == set(theirs)
  for name, tensor in theirs.items():
    np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)
  # Treadle's writer is read back by torch (weights_only) and by the package.
  path = str(tmp_path / "again.pth")
  pth.write_checkpoint(path, CFG, {"params": params})
  again = torch.load(path, weights_only=True)
  for name, tensor in theirs.items():
    np.testing.assert_array_equal(again[name].numpy(), tensor.numpy(), err_msg=name)
  np.testing.assert_allclose(rwkv_package_logits(str(tmp_path / "again"), TOKENS[:5]),
                             rwkv_package_logits(stem, TOKENS[:5]), atol=1e-6)


def test_writer_handles_bfloat16_and_strides(tmp_path):
  import ml_dtypes
  tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4).T,
             "b": np.ones((2, 3), ml_dtypes.bfloat16), "c": np.zeros((0,), np.float32)}
  path = str(tmp_path / "t.pth")
  pth.write_pth(path, tensors)
  back = pth.read_pth(path)
  loaded = torch.load(path, weights_only=True)
  np.testing.assert_array_equal(back["a"], tensors["a"])
  np.testing.assert_array_equal(loaded["a"].numpy(), tensors["a"])
  assert loaded["b"].dtype == torch.bfloat16 and back["b"].dtype == ml_dtypes.bfloat16


def test_reader_refuses_other_globals(tmp_path):
  path = str(tmp_path / "evil.pth")
  torch.save({"x": torch.zeros(2), "y": torch.nn.Linear(2, 2)}, path)
  with pytest.raises(Exception, match="refusing"):
    pth.read_pth(path)


def test_convert_cli_round_trip(tmp_path, torch_pth):
  stem, params = torch_pth
  env = {**os.environ, "PYTHONPATH": REPO}
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  for args in (["import", "--model=rwkv7", stem + ".pth", work],
               ["export", "--model=rwkv7", work, out]):
    subprocess.run([sys.executable, "-m", "train.convert", *args], check=True, cwd=REPO, env=env,
                   capture_output=True)
  back = pth.read_pth(os.path.join(out, "model.pth"))
  for name, w in pth.pth_from_params(params, CFG).items():
    np.testing.assert_allclose(back[name], w, err_msg=name)
  assert "rwkv7" in convert.converters()
