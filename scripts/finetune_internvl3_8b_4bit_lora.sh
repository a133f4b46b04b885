#!/usr/bin/env bash
# QLoRA fine-tuning of InternVL3-8B (4-bit NF4 LLM, LoRA, DeepSpeed ZeRO-3 with CPU offload) through torchrun.
#
#   GPUS=2 PER_DEVICE_BATCH_SIZE=4 BATCH_SIZE=32 MODEL_PATH=models/InternVL3-8B \
#   META_PATH=internvl3_data/meta.json OUTPUT_DIR=work_dirs/internvl3_8b_4bit_lora \
#     bash scripts/finetune_internvl3_8b_4bit_lora.sh [extra training args, e.g. --max_num_frame 16]
#
# Other variables: LORA_RANK, LR, EPOCHS, DEEPSPEED_CONFIG, MASTER_PORT, and NNODES / NODE_RANK / MASTER_ADDR for
# several nodes (run the script once per node). Gradient accumulation is BATCH_SIZE / (PER_DEVICE_BATCH_SIZE x
# GPUS x NNODES). Without GPUs it trains with CPU processes. --dry-run prints the command without running it.
# Rerunning with the same OUTPUT_DIR resumes from the last checkpoint; add --overwrite_output_dir True to restart.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" -m internvl.train.launch "$@"
