#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with the Python 3.12 x86-64 wheels that a borrowed GPU
# machine lacks for benchmarks/hardware_check.py: the trainer's data and config
# packages and their own needs. jax, flax, optax, orbax, numpy, protobuf, absl, etils
# and the other common packages are already there, so they are not fetched.
#
#   bash benchmarks/prepare_device_wheels.sh      # here, where PyPI is reachable
#
# Then, on the machine (no network), the README's "Hardware check" section:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#
# Versions are pinned to the ones checked together; every wheel is fetched with
# --no-deps, so this list is the whole set (one version of each).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl

python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    ml-collections==1.1.0 grain==0.2.18 tensorflow-datasets==4.9.10 array-record==0.8.6 \
    dm-tree==0.1.10 immutabledict==4.3.1 portpicker==1.6.0 \
    simple-parsing==0.1.9 docstring-parser==0.18.0 tensorflow-metadata==1.21.0 \
    googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2

# promise (a tensorflow-datasets need) is published only as source: build its
# pure-Python wheel here.
python -m pip wheel -q --no-deps -w .whl promise==2.3

ls .whl
du -sh .whl
