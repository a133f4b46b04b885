#!/usr/bin/env bash
# Collect the wheels a GPU machine without internet needs on top of a stock CUDA PyTorch image
# (one that already has torch with triton, transformers, peft, accelerate, timm, einops, tensorboard):
# bitsandbytes, deepspeed and DeepSpeed's pure-Python dependencies, and liger-kernel (requirements_gpu.txt; it needs
# triton, which the CUDA torch wheels bring). Run it where pip reaches PyPI,
# copy WHEEL_DIR to the GPU machine, then there:
#   python3 -m pip install --no-index --no-deps --target /tmp/site WHEEL_DIR/*.whl && export PYTHONPATH=/tmp/site
# Usage: scripts/gather_gpu_wheels.sh [WHEEL_DIR] (default: wheels/), PYTHON_VERSION (default 3.12).
set -euo pipefail
WHEEL_DIR="${1:-wheels}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PIP="${PIP:-python3 -m pip}"
mkdir -p "$WHEEL_DIR"

platform_args=(--only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# Binary wheels, pinned to the versions the toolkit is tested with.
$PIP download --no-deps "${platform_args[@]}" -d "$WHEEL_DIR" \
  bitsandbytes==0.50.2 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 liger-kernel==0.8.5
# DeepSpeed ships only a source distribution; its wheel is pure Python (ops are JIT-compiled on first use).
$PIP wheel --no-deps --no-build-isolation -w "$WHEEL_DIR" deepspeed==0.19.8 2>/dev/null \
  || $PIP wheel --no-deps -w "$WHEEL_DIR" deepspeed==0.19.8
ls -la "$WHEEL_DIR"
du -sh "$WHEEL_DIR"
