#!/usr/bin/env bash
# Every accelerator figure of cnn_jax in one command (at most 8 minutes on one H100/H200, no
# network): ResNet-50 bf16 train images/s vs PyTorch (AMP + channels_last + torch.compile),
# ResNet-18 and VGG-16 at 32x32 likewise, LeNet-5 time to 99% on MNIST, MFU and peak memory.
# Writes benchmarks/results/gpu_check_<platform>.json and its section of benchmarks/RESULTS.md.
# The work is done by benchmarks/gpu_check.py (its docstring describes every phase).
#
#   benchmarks/gpu_check.sh --dry-run      # any CPU machine: every code path, tiny shapes, ~1 min
#   benchmarks/gpu_check.sh --prepare      # where pip reaches PyPI: fill .gpu_check/ (see below)
#   benchmarks/gpu_check.sh [--copy-results-to DIR] [--mnist DIR] [--budget-s S]   # on the GPU
#   benchmarks/gpu_check.sh --report DIR/gpu_check_gpu.json   # back here: table into RESULTS.md
#
# A GPU machine may lack the pure-Python packages cnn_jax imports besides JAX, Flax, Optax and
# Orbax (ml_collections, tensorflow-datasets without TensorFlow, and theirs), and the MNIST files.
# `--prepare` downloads those as Python 3.12 wheels into .gpu_check/wheels and copies MNIST from
# ../shared/data/mnist into .gpu_check/mnist (about 20 MB; git ignores .gpu_check/). Bring that
# folder along with the checkout: this script installs the wheels into a temporary folder when
# the packages are missing. Nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
export GPU_CHECK_COMMAND="benchmarks/gpu_check.sh${*:+ $*}"

if [[ -n "${PYTHON:-}" ]]; then
  py=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi

# The packages the check may lack there, at the versions this checkout's Python has (its tested
# pins); all are pure Python (promise ships only a source archive: a wheel is built from it).
WHEELS=(ml_collections tensorflow_datasets tensorflow_metadata googleapis_common_protos
        immutabledict toml)
SOURCE_ONLY=(promise)

pinned() {  # NAME... -> NAME==VERSION... as installed for $py
  "$py" - "$@" <<'PY'
import importlib.metadata as md
import sys

print(" ".join(f"{name}=={md.version(name)}" for name in sys.argv[1:]))
PY
}

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p .gpu_check/wheels .gpu_check/mnist
  printf '*\n' > .gpu_check/.gitignore  # the folder ignores itself
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --abi none --platform any -d .gpu_check/wheels $(pinned "${WHEELS[@]}")
  "$py" -m pip wheel -q --no-deps -w .gpu_check/wheels $(pinned "${SOURCE_ONLY[@]}")
  mnist=${CNN_JAX_MNIST:-../shared/data/mnist}
  if [[ -d "$mnist" ]]; then
    cp "$mnist"/*-ubyte* .gpu_check/mnist/
  else
    echo "gpu_check: no MNIST folder at $mnist (set CNN_JAX_MNIST): LeNet-5 will be skipped" >&2
  fi
  du -sh .gpu_check
  ls .gpu_check/wheels .gpu_check/mnist
  exit 0
fi

needs='import ml_collections, tensorflow_datasets, flax, optax, orbax.checkpoint'
if ! "$py" -c "$needs" 2>/dev/null; then
  if compgen -G ".gpu_check/wheels/*.whl" > /dev/null; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      .gpu_check/wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: installed $(ls .gpu_check/wheels | wc -l) wheels from .gpu_check/wheels into $site"
  fi
  if ! "$py" -c "$needs"; then
    echo "gpu_check: $py cannot import what cnn_jax needs (above); run" \
      "'benchmarks/gpu_check.sh --prepare' where pip reaches PyPI and bring .gpu_check/ along" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -u benchmarks/gpu_check.py "$@"
