"""What the Mamba-1 and Mamba-2 Hugging Face converters share: everything around the blocks.

transformers' `MambaForCausalLM` and `Mamba2ForCausalLM` name the backbone alike
(backbone.embeddings, backbone.layers.{k}.{norm, mixer...}, backbone.norm_f,
lm_head); only the mixer's tensors differ, so each converter (hf.py for Mamba-2,
hf_mamba1.py for Mamba-1) passes its own block functions to these.

Shapes (layers/__init__.py): e embed, v vocab, L layers.
"""

from typing import Callable

import jax
import numpy as np

from models import hf_io
from models.family import Converter
from models.llama.hf import TensorReader, as_numpy
from models.mamba.config import MambaConfig

BlockFromHf = Callable[[TensorReader, str, MambaConfig], dict]
BlockToHf = Callable[[dict, str, MambaConfig], dict]


def params_from_hf(tensors: dict[str, np.ndarray], cfg: MambaConfig,
                   block_from_hf: BlockFromHf) -> dict:
  """HF state dict (name -> array) -> plain Treadle params in `param_dtype`.

  The tree matches `nn.unbox(Mamba(cfg).init(...)['params'])` (blocks stacked
  under 'layers' when cfg.scan_layers). A tied model ignores any lm_head.weight.
  The original state-spaces release's `backbone.embedding.weight` is read too.

  Raises:
    ValueError: naming a tensor that is missing, has the wrong shape, or is unused.
  """
  if "backbone.embedding.weight" in tensors and "backbone.embeddings.weight" not in tensors:
    tensors = {("backbone.embeddings.weight" if name == "backbone.embedding.weight" else name): w
               for name, w in tensors.items()}
  reader = TensorReader(tensors)
  v, e = cfg.vocab_size, cfg.embed_dim
  blocks = [block_from_hf(reader, f"backbone.layers.{k}.", cfg) for k in range(cfg.num_layers)]
  params = {"embed": {"embedding": reader.take("backbone.embeddings.weight", (v, e))},
            "final_norm": {"scale": reader.take("backbone.norm_f.weight", (e,))}}
  if cfg.tie_embeddings:
    reader.used.add("lm_head.weight")
  else:
    params["lm_head"] = {"kernel": reader.take("lm_head.weight", (v, e)).T}
  if cfg.scan_layers:
    params["layers"] = jax.tree.map(lambda *ws: np.stack(ws), *blocks)
  else:
    params.update({f"layers_{k}": block for k, block in enumerate(blocks)})
  reader.check_all_used("Mamba")
  return as_numpy(params, np.dtype(jax.numpy.dtype(cfg.param_dtype)))


def hf_from_params(params, cfg: MambaConfig, block_to_hf: BlockToHf) -> dict[str, np.ndarray]:
  """Treadle params (boxed or plain, any device) -> HF state dict of float32 arrays
  (no lm_head.weight when tied)."""
  params = as_numpy(params, np.float32)
  out = {"backbone.embeddings.weight": params["embed"]["embedding"],
         "backbone.norm_f.weight": params["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = params["lm_head"]["kernel"].T
  for k in range(cfg.num_layers):
    block = (jax.tree.map(lambda w, k=k: w[k], params["layers"]) if cfg.scan_layers
             else params[f"layers_{k}"])
    out.update(block_to_hf(block, f"backbone.layers.{k}.", cfg))
  return {name: np.ascontiguousarray(w) for name, w in out.items()}


def converter(description: str, model_config_from_hf: Callable[[dict], dict],
              hf_config_from_model: Callable[[MambaConfig], dict],
              block_from_hf: BlockFromHf, block_to_hf: BlockToHf) -> Converter:
  """A `Converter` reading and writing `save_pretrained` directories of one version."""

  def read_checkpoint(hf_dir: str) -> tuple[MambaConfig, dict]:
    hf_config, tensors = hf_io.read_hf_dir(hf_dir)
    cfg = MambaConfig.from_dict(model_config_from_hf(hf_config))
    return cfg, params_from_hf(tensors, cfg, block_from_hf)

  def write_checkpoint(hf_dir: str, cfg: MambaConfig, variables: dict) -> list[str]:
    """Writes config.json and float32 safetensors that transformers loads."""
    return hf_io.write_hf_dir(hf_dir, hf_config_from_model(cfg),
                              hf_from_params(variables["params"], cfg, block_to_hf))

  return Converter(description, read_checkpoint, write_checkpoint)
