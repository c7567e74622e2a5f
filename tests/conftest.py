"""Test setup, before JAX starts: eight fake CPU devices, quick XLA compiles and a compilation
cache for the run.

The cache: most of the suite's time is XLA compilation, and many tests compile
the same programs in other processes (the two pytest-xdist workers, and the
binaries that tests launch: train.main, train.sample, resume after SIGKILL,
two-process multi-host). JAX's persistent compilation cache, in one temporary
directory per run that every process inherits through the environment, lets
them reuse each other's executables. Entries are keyed by the program and the
compiler options, so a hit runs exactly what a fresh compile would; the size
limit turns on JAX's file lock between concurrent writers. A directory named
by the caller (JAX_COMPILATION_CACHE_DIR already set) is used as is and kept.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  # LLVM without its optimisation passes: the suite's programs are small and run a few
  # times, so compiling them is most of its time; measured side by side, compile-bound
  # files take 25-45% less CPU, a few interpreted Pallas kernels up to 40% more, and the
  # whole mix about 23% less. No fast math either way (XLA:CPU's default), so results can
  # differ from an optimised build only in the last bits (say, a multiply-add fused or not).
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CACHE_OWNER = "TREADLE_TEST_CACHE_OWNER_PID"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # The first process to get here (pytest itself, or the xdist controller) makes the
  # directory; xdist workers and launched binaries inherit it with the environment.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="treadle-test-xla-cache-")
  os.environ[_CACHE_OWNER] = str(os.getpid())
  # Only programs that took a while to compile: writing every small one costs more
  # (file writes, the lock) than it saves.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


# The longest files (about half a minute or more each on a quiet 2-core box), longest first.
# With --dist loadfile a file runs whole on one worker, and files are handed out in
# collection order (pytest.ini: --no-loadscope-reorder); these start first so that the
# short files fill in at the end and both workers finish together, instead of one idling
# while the other runs a long file it was handed last.
_LONGEST_FILES = (
    "tests/train/tasks/test_diffusion_task.py",
    "tests/colabs/test_colabs.py",
    "tests/train/test_trainer.py",
    "tests/pallas_kernels/flash_attention/test_flash_attention.py",
    "tests/train/test_multihost.py",
    "tests/models/rwkv/test_rwkv.py",
    "tests/models/moe/test_moe_train.py",
    "tests/pallas_kernels/block_sparse/test_block_sparse_attention.py",
    "tests/colabs/test_mamba_colab.py",
    "tests/colabs/test_rwkv_colab.py",
    "tests/train/test_resume.py",
)


def pytest_collection_modifyitems(session, config, items):
  """Moves the tests of _LONGEST_FILES to the front (a stable sort: the order within a
  file and of the other files is kept)."""
  del session, config
  rank = {path: i for i, path in enumerate(_LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_unconfigure(config):
  """The process that made the cache directory removes it when the run ends."""
  del config
  if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
