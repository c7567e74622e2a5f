r"""Trains a Treadle model: the binary behind every config.

  python -m train.main --config=configs/llama_tiny.py --workdir=/tmp/tiny
  python -m train.main --config=configs/llama.py:size=1b --workdir=DIR \
      --config.mesh.fsdp=8 --config.train.num_steps=1000

Rerunning on the same --workdir resumes from its latest checkpoint. The console
shows Treadle's own lines and library warnings; `--verbosity=0` adds the INFO
logs of Orbax, TFDS and grain.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from train import distributed
from train import run_summary
from train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llama_tiny.py",
                                          "Experiment config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here.",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for the coordinator before failing.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (hundreds of lines per run) stay off unless asked for.
    logging.set_verbosity(logging.WARNING)
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           timeout_s=_DISTRIBUTED_TIMEOUT.value)
  except distributed.DistributedSetupError as error:
    sys.exit(f"Error: {error}")  # One line and exit status 1, no traceback.
  if jax.process_index() == 0:  # A few lines here; the whole config to WORKDIR/config.json.
    run_summary.announce(_CONFIG.value, _WORKDIR.value,
                         source=config_flags.get_config_filename(flags.FLAGS["config"]),
                         overrides=config_flags.get_override_values(flags.FLAGS["config"]),
                         num_devices=jax.device_count())
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
