#!/usr/bin/env bash
# QLoRA fine-tuning on a SLURM cluster: one torchrun per node, started by srun.
#
#   sbatch --nodes=2 --gres=gpu:8 scripts/slurm_finetune_internvl3_8b_4bit_lora.sh [extra training args]
#
# Submit it from the repository root: SLURM runs a copy of this script, so the job starts in SLURM_SUBMIT_DIR.
# The node count, node rank and GPUs per node come from SLURM (SLURM_NNODES, SLURM_NODEID, SLURM_GPUS_ON_NODE);
# node 0 of the allocation is the rendezvous host. The variables of scripts/finetune_internvl3_8b_4bit_lora.sh
# (BATCH_SIZE, MODEL_PATH, OUTPUT_DIR, ...) apply; OUTPUT_DIR must be on a file system shared by the nodes.
#SBATCH --job-name=internvl3-qlora
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_ADDR
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash scripts/finetune_internvl3_8b_4bit_lora.sh "$@"
