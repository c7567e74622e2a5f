"""Joining a multi-host job through `jax.distributed` (never a home-made runtime)."""

import os

import jax

# Environment variables that mean a cluster launcher started this process and
# jax can find the coordinator on its own (`jax.distributed.initialize()`).
_AUTO_DETECTED = {
    "SLURM_NTASKS": lambda v: int(v) > 1,  # srun with several tasks.
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,  # mpirun.
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,  # Multi-host TPU slices.
    "MEGASCALE_COORDINATOR_ADDRESS": bool,  # Multislice TPU.
}


def cluster_detected(environ=None) -> bool:
  environ = os.environ if environ is None else environ
  return any(name in environ and check(environ[name]) for name, check in _AUTO_DETECTED.items())


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, *, timeout_s: int) -> None:
  """Starts jax.distributed when asked to or when a cluster launcher is detected.

  With `coordinator_address` all three of coordinator, count and id are used;
  without it, a detected SLURM / MPI / TPU-pod launch calls plain
  `jax.distributed.initialize()`; otherwise this is a single-process run.
  Fails within `timeout_s` seconds if the coordinator cannot be reached.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id too.")
    # Cross-process collectives on CPU devices (tests, CPU clusters); GPU and
    # TPU backends ignore this setting. Must precede any use of the backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)
  elif cluster_detected():
    jax.distributed.initialize(initialization_timeout=timeout_s)
