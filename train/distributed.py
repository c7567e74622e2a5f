"""Joining a multi-host job through `jax.distributed` (never a home-made runtime).

Before handing over to `jax.distributed.initialize`, whose failures end the
process with a C++ fatal check and a stack dump, the flags are checked and the
coordinator's address is probed, so the common mistakes end in one line that
names the flag (a `DistributedSetupError`):
  process 0 hosts the coordinator service: its port must be free to bind;
  the other processes connect to it: they retry a TCP connection until the
  coordinator answers or the timeout passes.
"""

import errno
import math
import os
import socket
import time

import jax

# Environment variables that mean a cluster launcher started this process and
# jax can find the coordinator on its own (`jax.distributed.initialize()`).
_AUTO_DETECTED = {
    "SLURM_NTASKS": lambda v: int(v) > 1,  # srun with several tasks.
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,  # mpirun.
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,  # Multi-host TPU slices.
    "MEGASCALE_COORDINATOR_ADDRESS": bool,  # Multislice TPU.
}
_RETRY_S = 0.5  # Pause between connection attempts to the coordinator.


class DistributedSetupError(RuntimeError):
  """Bad distributed flags or an unreachable coordinator; the message is one line
  naming the flag and what to check."""


def cluster_detected(environ=None) -> bool:
  environ = os.environ if environ is None else environ
  return any(name in environ and check(environ[name]) for name, check in _AUTO_DETECTED.items())


def split_address(address: str) -> tuple[str, int]:
  """'host:port' or '[ipv6]:port' -> (host, port)."""
  host, _, port = address.rpartition(":")
  host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedSetupError(
        f"--coordinator_address={address} is not host:port (e.g. 10.0.0.1:1234, or "
        "[::1]:1234 for an IPv6 address).")
  return host, int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once a TCP connection to `address` succeeds; retries until `timeout_s`.

  Raises:
    DistributedSetupError: naming --coordinator_address, the timeout and what to check.
  """
  host, port = split_address(address)
  deadline = time.monotonic() + timeout_s
  while True:
    remaining = deadline - time.monotonic()
    try:
      with socket.create_connection((host, port), timeout=max(min(remaining, 5.0), 0.1)):
        return
    except OSError as error:
      last_error = error
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise DistributedSetupError(
          f"No coordinator answered at --coordinator_address={address} within "
          f"--distributed_timeout={timeout_s:g} s (last attempt: {last_error}). Check that "
          "process 0 (--process_id=0) is running with the same --coordinator_address, that "
          f"{host} is its machine and that port {port} is open between the hosts.")
    time.sleep(min(_RETRY_S, remaining))


def check_port_free(address: str) -> None:
  """Process 0 binds the coordinator to every interface at the address's port:
  raises DistributedSetupError when that port is taken (or needs privileges)."""
  _, port = split_address(address)
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As gRPC's listener.
        if family == socket.AF_INET6:
          probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # Dual stack, as [::].
        probe.bind((host, port))
      return
    except OSError as error:
      if error.errno in (errno.EADDRINUSE, errno.EACCES):
        raise DistributedSetupError(
            f"Process 0 cannot host the coordinator on port {port} of "
            f"--coordinator_address={address} ({error}): stop the process that holds it "
            "(a previous run?) or choose a free port above 1023.") from None
      # Otherwise this family is unavailable here (e.g. no IPv6): try the next.


def _check_flags(num_processes: int | None, process_id: int | None) -> None:
  if num_processes is None or process_id is None:
    raise DistributedSetupError(
        "--coordinator_address needs --num_processes and --process_id too.")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise DistributedSetupError(
        f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, *, timeout_s: int) -> None:
  """Starts jax.distributed when asked to or when a cluster launcher is detected.

  With `coordinator_address` all three of coordinator, count and id are used;
  without it, a detected SLURM / MPI / TPU-pod launch calls plain
  `jax.distributed.initialize()`; otherwise this is a single-process run.
  Fails within about `timeout_s` seconds if the coordinator cannot be reached.

  Raises:
    DistributedSetupError: for bad flags, a taken coordinator port (process 0)
      or a coordinator that does not answer (other processes).
  """
  if coordinator_address:
    _check_flags(num_processes, process_id)
    deadline = time.monotonic() + timeout_s
    if process_id == 0:
      if "JAX_COORDINATOR_BIND_ADDRESS" not in os.environ:
        check_port_free(coordinator_address)
    else:
      wait_for_coordinator(coordinator_address, timeout_s)
    # Cross-process collectives on CPU devices (tests, CPU clusters); GPU and
    # TPU backends ignore this setting. Must precede any use of the backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    remaining_s = max(math.ceil(deadline - time.monotonic()), 1)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=remaining_s)
  elif cluster_detected():
    jax.distributed.initialize(initialization_timeout=timeout_s)
