r"""One command for every foreign checkpoint format: import into and export from workdirs.

  python -m train.convert list
  python -m train.convert import --model=NAME SRC WORKDIR
  python -m train.convert export --model=NAME WORKDIR DST

NAME is a format a family registers (`python -m train.convert list`): llama
(transformers LlamaForCausalLM), mixtral (MixtralForCausalLM), qwen2_moe
(Qwen2MoeForCausalLM), mamba2 (Mamba2ForCausalLM) and rwkv7_pth (BlinkDL's
RWKV-7 .pth) today; SRC and DST are that format's files (a transformers
`save_pretrained` directory for the first four, a .pth file for rwkv7_pth). The
converters live with their family (models/<family>/hf.py, pth.py); this module
adds the checkpoint side.

`import` writes a params-only checkpoint whose config holds the imported
model's `config.model` and the run sections of `--config` (default
configs/llama_tiny.py: the tiny CPU run settings); `python -m train.main
--config=configs/finetune.py:workdir=WORKDIR --workdir=WORKDIR` then fine-tunes
it. `export` writes the workdir's latest checkpoint in the format.
"""

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from models.family import Converter
from train import checkpoint
from train import families

_MODEL = flags.DEFINE_string("model", None, "Foreign format name (see `list`).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/llama_tiny.py",
    "Run settings saved with an import (its model section is replaced by the import's).")


def converters() -> dict[str, tuple[str, Converter]]:
  """Format name -> (family, Converter), over every registered family."""
  found = {}
  for family_name in families.REGISTRY:
    for name, converter in families.get_family(family_name).model.converters.items():
      found[name] = (family_name, converter)
  return found


def get_converter(name: str) -> tuple[str, Converter]:
  """(family, Converter) of format `name`, or an error listing the known ones."""
  known = converters()
  if name not in known:
    raise ValueError(f"--model={name!r} is not a known format; choose one of {sorted(known)} "
                     "(python -m train.convert list).")
  return known[name]


def import_checkpoint(name: str, src: str, workdir: str,
                      run_config: ml_collections.ConfigDict) -> list[str]:
  """Converts `src` (format `name`) into a params-only checkpoint in `workdir`.

  The saved config is `run_config` with its model section replaced by the
  imported model's.
  """
  _, converter = get_converter(name)
  model_config, params = converter.read(src)
  config = ml_collections.ConfigDict(run_config.to_dict())  # An unlocked copy.
  config.model = ml_collections.ConfigDict({"family": model_config.family,
                                            **model_config.to_dict()})
  checkpoint.save_imported(workdir, params, config)
  return [str(checkpoint.checkpoint_dir(workdir))]


def export_checkpoint(name: str, workdir: str, dst: str) -> list[str]:
  """Writes the latest checkpoint in `workdir` as format `name`; returns the paths."""
  family, converter = get_converter(name)
  config = checkpoint.load_config(workdir)
  if config.model.family != family:
    raise ValueError(f"{workdir} holds a {config.model.family!r} model; --model={name} exports "
                     f"the {family!r} family.")
  _, variables = checkpoint.load_model(workdir)
  return converter.write(dst, families.model_config(config.model), variables)


_USAGE = """usage:
  python -m train.convert list
  python -m train.convert import --model=NAME SRC WORKDIR [--config=configs/llama_tiny.py]
  python -m train.convert export --model=NAME WORKDIR DST"""


def main(argv):
  command, paths = (argv[1] if len(argv) > 1 else None), argv[2:]
  if command == "list" and not paths:
    for name, (family, converter) in sorted(converters().items()):
      print(f"{name:12s} family {family:6s} {converter.description}")
    return
  if command not in ("import", "export") or len(paths) != 2 or not _MODEL.value:
    raise app.UsageError(_USAGE)
  if command == "import":
    written = import_checkpoint(_MODEL.value, *paths, run_config=_CONFIG.value)
  else:
    written = export_checkpoint(_MODEL.value, *paths)
  for path in written:
    print(path)


if __name__ == "__main__":
  app.run(main)
