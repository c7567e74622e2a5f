"""Mamba-1 (`model.version=1`): config, params, packing, decoding, sharding, and parity with
transformers' MambaForCausalLM both ways (torch on CPU in float32, its sequential scan)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from configs import mamba as mamba_configs
from configs.base import DEFAULT_LOGICAL_AXIS_RULES
from helpers import lm_properties as lm
from helpers.hf import make_mamba1
from models import hf_io
from models.mamba import Mamba, MambaConfig, hf_mamba1, init_cache
from models.mamba import hf as mamba2_hf
from train import checkpoint, convert
from train.sharding import MESH_AXES

jax.config.update("jax_default_matmul_precision", "highest")
LOGICAL_NAMES = {name for name, _ in DEFAULT_LOGICAL_AXIS_RULES}
B, T, V = 2, 13, 64


def make_config(**overrides) -> MambaConfig:
  fields = dict(version=1, vocab_size=V, embed_dim=16, num_layers=2, state_size=4, expand=2,
                conv_kernel=4, chunk_size=4, max_seq_len=64, dtype="float32")
  return MambaConfig(**{**fields, **overrides})


def abstract_params(cfg: MambaConfig):
  return jax.eval_shape(lambda: Mamba(cfg).init(jax.random.key(0),
                                                jnp.zeros((1, 4), jnp.int32))["params"])


@functools.lru_cache
def random_params(cfg: MambaConfig, seed: int = 0):
  """Plain params, every entry random: scales near 1, A_log in log[1, 16], the rest normal."""
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(cfg)))
  leaves = []
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      leaves.append(1.0 + 0.2 * rng.standard_normal(leaf.shape))
    elif "A_log" in name:
      leaves.append(np.log(rng.uniform(1.0, 16.0, leaf.shape)))
    elif "dt_proj']['bias" in name:
      leaves.append(rng.uniform(-4.0, -1.0, leaf.shape))
    elif "kernel" in name and "conv" not in name:
      leaves.append(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2]))
    else:
      leaves.append(0.5 * rng.standard_normal(leaf.shape))
  return treedef.unflatten([jnp.asarray(x, jnp.float32) for x in leaves])


def forward_fn(cfg: MambaConfig):
  return lm.forward_fn(Mamba(cfg))


def decode_fn(cfg: MambaConfig):
  return lm.decode_fn(Mamba(cfg))


def random_tokens(seed, shape=(B, T), vocab=V):
  return lm.random_tokens(seed, shape, vocab)


def test_published_sizes_and_flops():
  """configs/mamba.py version=1 gives state-spaces/mamba-*-hf's shapes (130m ... 2.8b)."""
  published = {"130m": (768, 24, 130e6), "370m": (1024, 48, 370e6), "790m": (1536, 48, 790e6),
               "1.4b": (2048, 48, 1.4e9), "2.8b": (2560, 64, 2.8e9)}
  for size, (width, depth, count) in published.items():
    cfg = MambaConfig.from_dict(mamba_configs.get_config(f"size={size},version=1").model)
    assert (cfg.version, cfg.embed_dim, cfg.num_layers, cfg.state_size) == (1, width, depth, 16)
    assert cfg.vocab_size == 50_280 and cfg.inner_dim == 2 * width and cfg.tie_embeddings
    assert cfg.dt_rank == -(-width // 16)
    assert 0.9 * count < cfg.matmul_params() < 1.05 * count, (size, cfg.matmul_params())
  assert (mamba_configs.get_config("size=2.7b,version=1").model
          == mamba_configs.get_config("size=2.8b,version=1").model)
  big = MambaConfig.from_dict(mamba_configs.get_config("size=130m,version=1").model)
  assert big.sharded_sizes() == {"expand·embed_dim": ("mlp", 1536)}
  # 6·N plus the scan (3 passes x 6 FLOPs per channel and state per layer).
  assert big.train_flops_per_token(2048) == 6 * big.matmul_params() + 3 * 24 * 6 * 1536 * 16
  tiny = MambaConfig.from_dict(mamba_configs.get_config("size=tiny,version=1").model)
  assert tiny.version == 1 and tiny.dt_rank == 8
  with pytest.raises(ValueError, match="version"):
    mamba_configs.get_config("size=130m,version=3")


def test_real_size_gradient_traces_in_bfloat16():
  """mamba-130m's shapes (scanned, rematerialised as configs/mamba.py sets them) trace
  through a gradient abstractly: bfloat16 compute, float32 params and gradients."""
  cfg = MambaConfig.from_dict(mamba_configs.get_config("size=130m,version=1,seq_len=256").model)
  assert cfg.scan_layers and cfg.dtype == "bfloat16" and cfg.remat_policy != "none"
  params = nn.unbox(abstract_params(cfg))

  def loss(p, t):
    return jnp.mean(jax.nn.logsumexp(Mamba(cfg).apply({"params": p}, t), axis=-1))

  grads = jax.eval_shape(jax.grad(loss), params, jax.ShapeDtypeStruct((2, 256), jnp.int32))
  assert grads["layers"]["mixer"]["A_log"].shape == (24, 1536, 16)
  assert grads["layers"]["mixer"]["x_dt"]["kernel"].shape == (24, 1536, 48)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("fields,pattern", [
    (dict(version=3), r"model\.version=3"),
    (dict(time_step_rank="big"), r"model\.time_step_rank='big'"),
    (dict(time_step_rank=0), r"model\.time_step_rank=0"),
    (dict(expand=0), r"model\.expand=0"),
    (dict(version=2, use_bias=True), r"model\.use_bias=True applies to model\.version=1"),
    (dict(version=2, expand=3), r"model\.expand=3 applies to model\.version=1"),
])
def test_bad_config_names_the_field(fields, pattern):
  with pytest.raises(ValueError, match=pattern):
    MambaConfig.from_dict({**make_config().to_dict(), **fields})
  assert MambaConfig.from_dict({**make_config().to_dict(), "time_step_rank": "7"}).dt_rank == 7


def test_params_axes_and_cache_layout():
  cfg = make_config(use_bias=True, use_conv_bias=False, time_step_rank=3, dtype="bfloat16")
  boxed = abstract_params(cfg)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned) and set(leaf.names) <= LOGICAL_NAMES
    assert len(leaf.names) == leaf.value.ndim and leaf.value.dtype == jnp.float32
  mixer = boxed["layers"]["mixer"]
  assert mixer["in_x"]["kernel"].names == ("layers", "embed", "mlp")
  assert mixer["x_dt"]["kernel"].value.shape == (2, 32, 3)
  assert mixer["dt_proj"]["kernel"].names == ("layers", "low_rank", "mlp")
  assert mixer["A_log"].names == ("layers", "mlp", "ssm_state")
  assert "bias" in mixer["out"] and "bias" not in mixer["conv"]
  logits = jax.eval_shape(lambda p, t: Mamba(cfg).apply({"params": p}, t), boxed,
                          jax.ShapeDtypeStruct((3, 7), jnp.int32))
  assert logits.shape == (3, 7, V) and logits.dtype == jnp.float32
  # HF's initialisation: A_log = log(1..N) per channel, D = 1, dt in [1e-3, 1e-1].
  init = jax.jit(lambda: nn.unbox(Mamba(cfg).init(jax.random.key(1),
                                                  jnp.zeros((1, 4), jnp.int32))["params"]))()
  mixer = init["layers"]["mixer"]
  np.testing.assert_allclose(mixer["A_log"][0, 5], np.log(np.arange(1, 5)), rtol=1e-6)
  np.testing.assert_array_equal(mixer["D"], 1.0)
  dt = jax.nn.softplus(mixer["dt_proj"]["bias"])
  assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
  cache = nn.unbox(init_cache(cfg, 3, 100))["layers"]["mixer"]
  assert cache["conv_window"].shape == (2, 3, 3, 32) and cache["conv_window"].dtype == jnp.bfloat16
  assert cache["ssm_state"].shape == (2, 3, 32, 4) and cache["ssm_state"].dtype == jnp.float32


def test_packed_documents_equal_separate_ones():
  cfg = make_config(use_bias=True)
  lm.assert_packed_equals_separate(Mamba(cfg), random_params(cfg), random_tokens(1), (5, 3, 5))


def test_prefill_in_pieces_then_decode_equals_full_forward():
  """Prefill in several calls (cutting inside and at document boundaries), then one token
  per call: the conv window, state and segment id continue exactly."""
  cfg = make_config(use_bias=True)
  params = random_params(cfg)
  tokens = random_tokens(6)
  seg = jnp.asarray(np.repeat([1, 2, 3], (4, 5, 4))[None].repeat(B, 0), jnp.int32)
  full = forward_fn(cfg)(params, tokens, seg)
  run = decode_fn(cfg)
  cache, pieces, start = init_cache(cfg, B, T), [], 0
  for length in (4, 1, 4, 1, 1, 1, 1):
    logits, cache = run(params, cache, tokens[:, start:start + length],
                        seg[:, start:start + length])
    pieces.append(logits)
    start += length
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-5, rtol=2e-5)


def test_sharded_loss_and_grads_match_one_device():
  """Params and batch over 8 fake devices (data 2 x fsdp 2 x tensor 2: the inner width over
  'tensor') give one device's loss and gradients."""
  cfg = make_config(num_layers=1)
  params, tokens = random_params(cfg), random_tokens(7, (4, T))

  def loss(p, t):
    logits = Mamba(cfg).apply({"params": p}, t, segment_ids=jnp.ones_like(t))
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, jnp.roll(t, -1, axis=1)[..., None], -1)[..., 0])

  want_loss, want_grads = jax.jit(jax.value_and_grad(loss))(params, tokens)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2, 1, 1), MESH_AXES)
  rules = tuple(DEFAULT_LOGICAL_AXIS_RULES)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_params(cfg)), mesh,
                                          rules)
  assert tuple(shardings["layers"]["mixer"]["in_x"]["kernel"].spec) == (None, "fsdp", "tensor")
  batch = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, batch))(
        jax.device_put(params, shardings), tokens)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
               got_grads, want_grads)


# transformers parity. ----------------------------------------------------------------------

TOKENS = np.random.default_rng(0).integers(0, 300, (2, 21)).astype(np.int32)


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.numpy()


@pytest.mark.parametrize("hf_fields,scan", [
    (dict(), True),
    (dict(tie_word_embeddings=False, use_bias=True, use_conv_bias=False, time_step_rank=5), False),
])
def test_import_matches_torch_and_exports_back(hf_fields, scan, tmp_path):
  pytest.importorskip("transformers")
  model = make_mamba1(str(tmp_path), **hf_fields)
  hf_config, tensors = hf_io.read_hf_dir(str(tmp_path))
  fields = hf_mamba1.model_config_from_hf(hf_config)
  assert fields["version"] == 1 and fields["expand"] == 2
  assert fields["tie_embeddings"] == hf_fields.get("tie_word_embeddings", True)
  cfg = MambaConfig(**fields, scan_layers=scan, chunk_size=8, dtype="float32")
  params = hf_mamba1.params_from_hf(tensors, cfg)
  abstract = nn.unbox(abstract_params(cfg))
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  jax.tree.map(lambda p, a: p.shape == a.shape or pytest.fail(str(a)), params, abstract)
  logits = np.asarray(forward_fn(cfg)(params, TOKENS, None))
  diff = np.abs(logits - torch_logits(model)).max()
  assert diff <= 1e-4, diff
  back = hf_mamba1.hf_from_params(params, cfg)
  assert set(back) == set(tensors) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
  for name, value in back.items():
    np.testing.assert_array_equal(value, tensors[name], err_msg=name)
  # The original release's name for the embedding reads the same.
  renamed = {name.replace("embeddings.", "embedding."): w for name, w in tensors.items()}
  jax.tree.map(np.testing.assert_array_equal, hf_mamba1.params_from_hf(renamed, cfg), params)


def test_convert_round_trip_reloads_in_transformers(tmp_path):
  """train.convert's import -> load_model parity -> export -> MambaForCausalLM reloads it."""
  transformers = pytest.importorskip("transformers")
  hf_dir, workdir, out_dir = (str(tmp_path / n) for n in ("hf", "workdir", "out"))
  model = make_mamba1(hf_dir, tie_word_embeddings=False, time_step_rank=3)
  convert.import_checkpoint("mamba", hf_dir, workdir)
  config = checkpoint.load_config(workdir)
  assert config.model.family == "mamba" and config.model.version == 1
  loaded, variables = checkpoint.load_model(workdir, dtype="float32")
  logits = jax.jit(loaded.apply)(variables, TOKENS)
  np.testing.assert_allclose(logits, torch_logits(model), rtol=0, atol=1e-4)
  convert.export_checkpoint("mamba", workdir, out_dir)
  reloaded = transformers.MambaForCausalLM.from_pretrained(out_dir).float().eval()
  assert reloaded.config.time_step_rank == 3 and not reloaded.config.tie_word_embeddings
  np.testing.assert_allclose(torch_logits(reloaded), torch_logits(model), rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match=r"--model=mamba\b"):
    convert.export_checkpoint("mamba2", workdir, str(tmp_path / "wrong"))


def test_converters_refuse_the_other_version():
  base = dict(model_type="mamba", vocab_size=10, hidden_size=8, num_hidden_layers=1,
              state_size=4, expand=2)
  assert hf_mamba1.model_config_from_hf(base)["time_step_rank"] == "auto"
  with pytest.raises(ValueError, match="--model=mamba2"):
    hf_mamba1.model_config_from_hf({**base, "model_type": "mamba2"})
  with pytest.raises(ValueError, match="intermediate_size"):
    hf_mamba1.model_config_from_hf({**base, "intermediate_size": 12})
  with pytest.raises(ValueError, match=r"--model=mamba\)"):
    mamba2_hf.model_config_from_hf({**base, "num_heads": 4, "head_dim": 4})
  with pytest.raises(ValueError, match=r"model\.version=2.*--model=mamba2"):
    hf_mamba1.hf_config_from_model(make_config(version=2, chunk_size=64))
