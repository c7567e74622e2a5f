r"""One command for every foreign checkpoint format: import into and export from workdirs.

  python -m train.convert list
  python -m train.convert import --model=NAME SRC WORKDIR
  python -m train.convert export --model=NAME WORKDIR DST

NAME is a format a family registers (`python -m train.convert list`): llama
(transformers LlamaForCausalLM), mixtral (MixtralForCausalLM), qwen2_moe
(Qwen2MoeForCausalLM), mamba (MambaForCausalLM), mamba2 (Mamba2ForCausalLM) and
rwkv7 (BlinkDL's RWKV-7 .pth) today; SRC and DST are that format's files (a
transformers `save_pretrained` directory for the first five, a .pth file for rwkv7). The
converters live with their family (models/<family>/hf.py, pth.py); this module
adds the checkpoint side.

`import` writes a params-only checkpoint whose config holds the imported
model's `config.model` and the run sections of `--config` (default
configs/<family>_tiny.py: the family's tiny CPU run settings), with the
settings the source carries besides weights (a diffusers scheduler config's
noise schedule) applied over them; `python -m train.main
--config=configs/finetune.py:workdir=WORKDIR --workdir=WORKDIR` then fine-tunes
it. `export` writes the workdir's latest checkpoint in the format.
"""

import importlib

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from models.family import Converter
from train import checkpoint
from train import families

_MODEL = flags.DEFINE_string("model", None, "Foreign format name (see `list`).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Run settings saved with an import (its model section is replaced by the import's); "
    "default configs/<family>_tiny.py.")


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


def default_run_config(family: str) -> ml_collections.ConfigDict:
  """configs/<family>_tiny.py: the run settings an import gets without --config."""
  return importlib.import_module(f"configs.{family}_tiny").get_config()


def import_checkpoint(name: str, src: str, workdir: str,
                      run_config: ml_collections.ConfigDict | None = None) -> list[str]:
  """Converts `src` (format `name`) into a params-only checkpoint in `workdir`.

  The saved config is `run_config` (default: the family's tiny config) with
  its model section replaced by the imported model's and the run settings the
  source carries (`Converter.read_run_settings`) applied.
  """
  family, converter = get_converter(name)
  model_config, params = converter.read(src)
  run_config = default_run_config(family) if run_config is None else run_config
  config = ml_collections.ConfigDict(run_config.to_dict())  # An unlocked copy.
  if model_config.modality != ("images" if "diffusion" in config else "text"):
    raise ValueError(f"--config holds the run settings of a different kind of model than "
                     f"--model={name} ({model_config.modality}); pass a "
                     f"configs/{family}*.py config or none.")
  config.model = ml_collections.ConfigDict({"family": model_config.family,
                                            **model_config.to_dict()})
  if converter.read_run_settings is not None:
    for key, value in converter.read_run_settings(src).items():
      section, field = key.split(".")
      config[section][field] = value
  checkpoint.save_imported(workdir, params, config)
  return [str(checkpoint.checkpoint_dir(workdir))]


def export_checkpoint(name: str, workdir: str, dst: str) -> list[str]:
  """Writes the latest checkpoint in `workdir` as format `name`; returns the paths."""
  family, converter = get_converter(name)
  config = checkpoint.load_config(workdir)
  if config.model.family != family:
    raise ValueError(f"{workdir} holds a {config.model.family!r} model; --model={name} exports "
                     f"the {family!r} family.")
  _, variables = checkpoint.load_model(workdir)  # The EMA where the run kept one.
  written = converter.write(dst, families.model_config(config.model), variables)
  if converter.write_run_settings is not None:
    written += converter.write_run_settings(dst, config)
  return written


_USAGE = """usage:
  python -m train.convert list
  python -m train.convert import --model=NAME SRC WORKDIR [--config=configs/<family>_tiny.py]
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
