#!/usr/bin/env bash
# Every training-benchmark variant of docs/BENCHMARKS.md in one go, on a machine with 2 GPUs (one command, so a
# rented machine is used once). Results (JSON + logs) go to RESULTS (default /tmp/bench_results) and, when OUT is
# set, are packed into $OUT/results.tgz after each run.
#   BASELINE=path/to/plain_qlora_baseline.py  also run the plain transformers + peft + bitsandbytes loop (given
#                                              the default run's sample length as second argument)
#   RUNS="default zero2"                       only these variants
#   FRAMES, BS, ACCUM, CAP (GiB per process), WORK (checkpoint + data folder), MODEL_CONFIG
# On a machine without bitsandbytes/deepspeed, install the wheels of scripts/gather_gpu_wheels.sh first.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python3}"
MODEL_CONFIG=${MODEL_CONFIG:-configs/internvl3_8b_config.json}
FRAMES=${FRAMES:-16}; BS=${BS:-4}; ACCUM=${ACCUM:-4}; CAP=${CAP:-48}
WORK=${WORK:-/tmp/bench_work}
R=${RESULTS:-/tmp/bench_results}; mkdir -p "$R"
pack() { if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" -C "$R" .; fi; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; } > "$R/machine.txt" 2>&1
"$PYTHON" -c "import sys, torch, transformers, peft, bitsandbytes, deepspeed; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'deepspeed', deepspeed.__version__)" | tee "$R/versions.txt"
# The random 8B checkpoint is written once; later runs reuse it.
"$PYTHON" -c "from internvl.train.benchmark import prepare_checkpoint; print(prepare_checkpoint('$MODEL_CONFIG', '$WORK'))" > "$R/prepare.log" 2>&1
pack

run() {
  local name=$1 limit=$2; shift 2
  case " ${RUNS:-$name} " in *" $name "*) ;; *) return ;; esac
  SECONDS=0
  timeout -s TERM "$limit" "$PYTHON" scripts/benchmark_training.py --model-config "$MODEL_CONFIG" --work-dir "$WORK" \
    --gpu-memory-cap-gb "$CAP" --frames "$FRAMES" --max-seq-length 8192 --per-device-batch-size "$BS" \
    --grad-accum "$ACCUM" --steps 2 --warmup-steps 1 --name "$name" --output "$R/$name.json" "$@" > "$R/$name.log" 2>&1
  echo "$name rc=$? ${SECONDS}s | $(tail -1 "$R/$name.log")"
  pack
}
run default 200 --deepspeed zero_stage3_config.json
run zero2 160 --deepspeed zero_stage2_config.json
run no_offload 200 --deepspeed zero_stage3_no_offload_config.json
run bf16_lora 160 --deepspeed zero_stage2_config.json --no-4bit
run one_gpu 200 --deepspeed zero_stage3_config.json --nproc-per-node 1
if [ -n "${BASELINE:-}" ]; then
  tokens=$("$PYTHON" -c "import json; print(round(json.load(open('$R/default.json'))['results']['tokens_per_sample']))" 2>/dev/null || echo 4490)
  timeout -s TERM 200 "$PYTHON" "$BASELINE" "$R/plain_baseline.json" "$tokens" > "$R/plain_baseline.log" 2>&1
  echo "plain baseline rc=$?"; pack
fi
