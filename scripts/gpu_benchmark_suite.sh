#!/usr/bin/env bash
# Every training-benchmark variant of docs/BENCHMARKS.md, on a machine with 2 GPUs, so that all figures come from one
# machine. Results (JSON + logs) go to RESULTS (default /tmp/bench_results) and, when OUT is set, are packed into
# $OUT/results.tgz after each run.
#   RUNS="default zero2"   only these variants (names below); the random checkpoint is written once per WORK folder
#   BASELINE=plain.py      also run a plain transformers + peft + bitsandbytes loop on GPU 0 beside the one-GPU run on
#                          GPU 1 (run "baseline"); it gets the output JSON and the default run's sample length
#   NPROC=1                processes per run (default: the visible GPUs; "one_gpu" always uses 1)
#   FRAMES, BS, ACCUM, CAP (GiB per process), WORK (checkpoint + data folder), MODEL_CONFIG, PYTHON
# On a machine without bitsandbytes/deepspeed, install the wheels of scripts/gather_gpu_wheels.sh first.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python3}"
MODEL_CONFIG=${MODEL_CONFIG:-configs/internvl3_8b_config.json}
FRAMES=${FRAMES:-16}; BS=${BS:-4}; ACCUM=${ACCUM:-4}; CAP=${CAP:-48}
if [ -z "${WORK:-}" ]; then  # the 16 GB checkpoint loads fastest from memory
  shm_free=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
  if [ "${shm_free:-0}" -gt 60 ]; then WORK=/dev/shm/bench_work; else WORK=/tmp/bench_work; fi
fi
R=${RESULTS:-/tmp/bench_results}; mkdir -p "$R"
pack() { if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" -C "$R" .; fi; }
wanted() { case " ${RUNS:-$1} " in *" $1 "*) return 0;; *) return 1;; esac; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; } >> "$R/machine.txt" 2>&1
"$PYTHON" -c "import sys, torch, transformers, peft, bitsandbytes, deepspeed; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'deepspeed', deepspeed.__version__)" | tee "$R/versions.txt"
# DeepSpeed JIT-compiles its CPU Adam on first use: build it while the checkpoint is written.
"$PYTHON" -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" > "$R/build_cpu_adam.log" 2>&1 &
SECONDS=0
"$PYTHON" -c "from internvl.bench.inputs import prepare_checkpoint; print(prepare_checkpoint('$MODEL_CONFIG', '$WORK'))" > "$R/prepare.log" 2>&1
wait; echo "checkpoint and CPU Adam ready after ${SECONDS}s"; pack
# ZeRO-3 + offload with every parameter of the 8B model under the persistence threshold: the frozen 4-bit base stays
# whole on each GPU, only the LoRA weights and their optimizer state are partitioned and offloaded.
"$PYTHON" -c "import json, sys; c = json.load(open('configs/zero_stage3_config.json')); c['zero_optimization']['stage3_param_persistence_threshold'] = 1e9; json.dump(c, open(sys.argv[1], 'w'), indent=2)" "$R/zero3_persistent.json"

run() {  # NAME TIME_LIMIT_S [benchmark options]
  local name=$1 limit=$2; shift 2
  wanted "$name" || return 0
  local start=$SECONDS
  # What the GPUs really hold (CUDA context and NCCL buffers included), next to PyTorch's own figures.
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -l 2 > "$R/$name.nvidia-smi.csv" 2>&1 &
  local monitor=$!
  timeout -s TERM "$limit" "$PYTHON" scripts/benchmark_training.py --model-config "$MODEL_CONFIG" --work-dir "$WORK" \
    --gpu-memory-cap-gb "$CAP" --frames "$FRAMES" --max-seq-length 8192 --per-device-batch-size "$BS" \
    --grad-accum "$ACCUM" --steps 2 --warmup-steps 1 --name "$name" --output "$R/$name.json" ${NPROC:+--nproc-per-node "$NPROC"} \
    "$@" > "$R/$name.log" 2>&1
  local rc=$?
  kill "$monitor" 2>/dev/null
  local most=$(sort -t, -k2 -n "$R/$name.nvidia-smi.csv" | tail -1)
  echo "$name rc=$rc $((SECONDS - start))s | $(tail -1 "$R/$name.log") | nvidia-smi max (gpu, MiB): $most"
  pack
}
run default 200 --deepspeed zero_stage3_config.json
run persistent 200 --deepspeed "$R/zero3_persistent.json"
run zero2 180 --deepspeed zero_stage2_config.json
# A 24 GB card (24,564 MiB) less the CUDA context and NCCL (1.5-2 GiB): 22.5 GiB for PyTorch. Compare the
# nvidia-smi peak, which includes them, with the card's 24,564 MiB.
run default_24gb 200 --deepspeed zero_stage3_config.json --gpu-memory-cap-gb 22.5
run zero2_24gb 180 --deepspeed zero_stage2_config.json --gpu-memory-cap-gb 22.5
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False run default_cached 200 --deepspeed zero_stage3_config.json
run no_offload 200 --deepspeed zero_stage3_no_offload_config.json
run bf16_lora 180 --deepspeed zero_stage2_config.json --no-4bit
CUDA_VISIBLE_DEVICES=1 run one_gpu 240 --deepspeed zero_stage3_config.json --nproc-per-node 1 &
if [ -n "${BASELINE:-}" ] && wanted baseline; then
  tokens=$("$PYTHON" -c "import json; print(round(json.load(open('$R/default.json'))['results']['tokens_per_sample']))" 2>/dev/null || echo 4490)
  CUDA_VISIBLE_DEVICES=0 timeout -s TERM 240 "$PYTHON" "$BASELINE" "$R/plain_baseline.json" "$tokens" > "$R/plain_baseline.log" 2>&1
  echo "baseline rc=$? | $(tail -1 "$R/plain_baseline.log")"
fi
wait; pack
# Variable-length data on one GPU: 8-32 frames (the recipe's draw from 32-frame videos), summaries of 20-200 tokens;
# one sample per row, then packed (same seed: the same samples).
varlen=(--deepspeed zero_stage3_config.json --nproc-per-node 1 --frames 32 --summary-tokens 20 200 --steps 4)
run varlen_unpacked 300 "${varlen[@]}" -- --min_num_frame 8
run varlen_packed 300 "${varlen[@]}" -- --min_num_frame 8 --use_packed_ds True
