"""Continue training the model a workdir holds, e.g. one imported from Hugging Face.

  python -m train.convert import --model=llama HF_DIR DIR
  python -m train.main --config=configs/finetune.py:workdir=DIR --workdir=DIR \
      --config.train.num_steps=200 --config.opt.lr=1e-4

The config saved with the workdir's latest checkpoint is the starting point;
command-line overrides apply on top as for any config.
"""

from configs import base
from configs import common
from train import checkpoint
from train import families


def _as_declared(value, declared):
  """JSON turns tuples into lists; give back the declared container type."""
  if isinstance(declared, tuple) and isinstance(value, list):
    return tuple(_as_declared(v, declared[0] if declared else None) for v in value)
  return value


def get_config(arg=None):
  args = common.parse_arg(arg, workdir="")
  if not args.workdir:
    raise ValueError("configs/finetune.py needs the workdir to continue from: "
                     "--config=configs/finetune.py:workdir=DIR")
  saved = checkpoint.load_config(args.workdir).to_dict()
  model_config = families.model_config(saved["model"])
  config = base.get_base_config(model_config)
  for key, value in saved.items():
    if key == "model":
      continue
    if isinstance(value, dict):
      for field, field_value in value.items():
        config[key][field] = _as_declared(field_value, config[key][field])
    else:
      config[key] = _as_declared(value, config[key])
  config.lock()
  return config
