"""RWKV-7's depth-dependent initial values (layers/rwkv/initializers.py) through the model.

The expected values are recomputed here in numpy, channel by channel, from the
formulas of BlinkDL's RWKV-LM v7 trainer, for every layer, scanned and unrolled.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.rwkv import Rwkv, RwkvConfig

E, D, L, V = 64, 16, 5, 200
CFG = RwkvConfig(vocab_size=V, embed_dim=E, num_layers=L, head_size=D, hidden_dim=2 * E,
                 decay_rank=8, iclr_rank=8, value_rank=4, gate_rank=8, chunk_size=0,
                 max_seq_len=32, dtype="float32")


def init_params(cfg: RwkvConfig) -> dict:
  init = jax.jit(Rwkv(cfg).init)  # One token: the cheapest program that makes every param.
  return jax.device_get(nn.unbox(init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))


def per_layer(params: dict, scanned: bool) -> list[dict]:
  """Block l's params, l = 0..L-1."""
  if not scanned:
    return [params[f"layers_{i}"] for i in range(L)]
  rest = params["layers"]
  return [params["layers_0"]] + [jax.tree.map(lambda w, i=i: w[i], rest) for i in range(L - 1)]


def expected(layer: int) -> dict[str, np.ndarray]:
  """The formulas, channel by channel (c = 0..e-1)."""
  shallow, deep = 1 - layer / L, layer / (L - 1)
  c = np.arange(E, dtype=np.float64)
  z = (c % D - (D - 1) / 2) / ((D - 1) / 2)
  zigzag, centred = z * np.abs(z), c / (E - 1) - 0.5
  out = {f"x_{n}": 1 - (c / E) ** (p * shallow)
         for n, p in dict(r=0.2, w=0.9, k=0.7, v=0.7, a=0.9, g=0.2).items()}
  out.update(
      ffn_x_k=1 - (c / E) ** (shallow ** 4),
      w0=-6 + 6 * (c / (E - 1)) ** (1 + deep ** 0.3) + 0.5 + 2.5 * zigzag,
      a0=-0.19 + 0.3 * zigzag + 0.4 * centred,
      v0=0.73 - 0.4 * centred,
      k_k=0.71 - 0.1 * centred, k_a=np.full(E, 1.02), r_k=np.full(E, -0.04),
      ln_x_scale=np.full(E, ((layer + 1) / L) ** 0.7), ln_x_bias=np.zeros(E))
  return out


@pytest.fixture(scope="module")
def params():
  return {scanned: init_params(dataclasses.replace(CFG, scan_layers=scanned))
          for scanned in (True, False)}


@pytest.mark.parametrize("scanned", [True, False])
def test_per_channel_values_follow_the_depth(params, scanned):
  for layer, block in enumerate(per_layer(params[scanned], scanned)):
    for name, want in expected(layer).items():
      if name == "v0" and layer == 0:
        assert "v0" not in block["att"]  # The first layer makes v_first; no value mix.
        continue
      got = block["ffn"]["x_k"] if name == "ffn_x_k" else block["att"][name]
      np.testing.assert_allclose(np.ravel(got), want, rtol=2e-6, atol=2e-6,
                                 err_msg=f"layer {layer} {name}")


def test_depth_ramps_between_first_and_last_layer(params):
  first, *_, last = per_layer(params[True], True)
  # The first layer takes most of the previous token; the last keeps almost none of it.
  assert float(first["att"]["x_r"][E // 2]) == pytest.approx(1 - 0.5 ** 0.2, rel=1e-5)
  assert float(last["att"]["x_r"][E // 2]) == pytest.approx(1 - 0.5 ** (0.2 / L), rel=1e-5)
  assert float(first["ffn"]["x_k"].mean()) > 0.4 > 0.01 > float(last["ffn"]["x_k"][1:].mean())
  # Decay offsets rise from slow to fast over the channels, steeper (lower mid-way) deeper.
  head_means = [np.asarray(b["att"]["w0"]).reshape(-1, D).mean(1) for b in (first, last)]
  assert all(np.all(np.diff(m) > 0) for m in head_means)
  assert head_means[1][1] < head_means[0][1]
  assert float(first["att"]["ln_x_scale"].max()) == pytest.approx((1 / L) ** 0.7, rel=1e-6)
  np.testing.assert_allclose(last["att"]["ln_x_scale"], 1.0)


def test_projections_low_rank_maps_embedding_and_head(params):
  p = params[True]
  eye = np.eye(E)
  for layer, block in enumerate(per_layer(p, True)):
    att, ffn = block["att"], block["ffn"]
    for name, gain in (("receptance", 1.0), ("key", 0.1), ("value", 1.0)):
      k = np.asarray(att[name]["kernel"], np.float64).reshape(E, E)
      np.testing.assert_allclose(k.T @ k, gain ** 2 * eye, atol=1e-5, err_msg=f"{layer} {name}")
    key = np.asarray(ffn["key"]["kernel"], np.float64)  # [e, 2e]: orthonormal rows.
    np.testing.assert_allclose(key @ key.T, eye, atol=1e-5)
    assert not np.any(att["output"]["kernel"]) and not np.any(ffn["value"]["kernel"])
    for first, second in (("w1", "w2"), ("a1", "a2"), ("g1", "g2")) + (
        (("v1", "v2"),) if layer else ()):
      assert not np.any(att[first])
      out = np.asarray(att[second], np.float64)  # [R, e]: orthonormal rows times 0.1.
      np.testing.assert_allclose(out @ out.T, 0.01 * np.eye(out.shape[0]), atol=1e-6)
  # Scanned blocks draw their own random matrices.
  assert not np.allclose(p["layers"]["att"]["key"]["kernel"][0],
                         p["layers"]["att"]["key"]["kernel"][1])
  emb = np.asarray(p["embed"]["embedding"])
  assert np.abs(emb).max() <= 1e-4 and emb.std() > 4e-5
  head = np.asarray(p["head"]["kernel"], np.float64)  # [e, v], v > e: orthonormal rows.
  np.testing.assert_allclose(head @ head.T, 0.25 * V / E * eye, atol=1e-4)


def test_blocks_start_as_the_identity(params):
  """Zero output projections: at init the logits are head(ln_out(ln0(embedding)))."""
  p = params[True]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 5)), jnp.int32)
  logits = jax.jit(Rwkv(CFG).apply)({"params": p}, tokens)

  def layer_norm(x, norm, eps=CFG.norm_eps):
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return x * norm["scale"] + norm["bias"]
  x = layer_norm(layer_norm(np.asarray(p["embed"]["embedding"])[tokens], p["ln0"]), p["ln_out"])
  np.testing.assert_allclose(logits, x @ np.asarray(p["head"]["kernel"]), atol=1e-4, rtol=1e-4)
