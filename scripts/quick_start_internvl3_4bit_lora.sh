#!/usr/bin/env bash
# Quick start: check the setup, then fine-tune InternVL3-8B with QLoRA using the guide's defaults
# (2 GPUs, 4 samples per GPU, batch 32, LoRA rank 32, learning rate 2e-5, 3 epochs, ZeRO-3 with CPU offload).
# Every variable of scripts/finetune_internvl3_8b_4bit_lora.sh can be overridden; extra args go to training.
set -euo pipefail
cd "$(dirname "$0")/.."
export GPUS="${GPUS:-2}"
export PER_DEVICE_BATCH_SIZE="${PER_DEVICE_BATCH_SIZE:-4}"
export BATCH_SIZE="${BATCH_SIZE:-32}"
export LORA_RANK="${LORA_RANK:-32}"
export LR="${LR:-2e-5}"
export EPOCHS="${EPOCHS:-3}"
PYTHON="${PYTHON:-python}"

echo "== Checking the setup"
"$PYTHON" scripts/test_internvl3_setup.py -- "$@"
echo "== Training"
exec bash scripts/finetune_internvl3_8b_4bit_lora.sh "$@"
