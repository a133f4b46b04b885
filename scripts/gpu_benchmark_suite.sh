#!/usr/bin/env bash
# Training-benchmark variants of docs/BENCHMARKS.md, so that all figures come from one machine. Results (JSON reports,
# logs, nvidia-smi samples, profile tables, summary.md) go to RESULTS (default /tmp/bench_results); when OUT is set,
# they are packed into $OUT/results.tgz after each run (profile traces, which can be large, beside it when < 15 MB).
#   RUNS="default zero2"   these variants, in this order (default: the 2-GPU set, as before); names below
#   BASELINE=plain.py      the plain transformers + peft + bitsandbytes loop (run "baseline"): NF4 at the recipe's
#                          micro-batch (4 x the default run's tokens per sample), or unmodified with BASELINE_FULL=1;
#                          with 2 GPUs or more it runs on GPU 0 beside the one-GPU run ("one_gpu") on GPU 1
#   NPROC=1                processes per run (default: the visible GPUs; "one_gpu*" runs always use 1)
#   WHEELS=.whl            install the wheels of scripts/gather_gpu_wheels.sh (bitsandbytes, deepspeed, liger-kernel,
#                          ...) into SITE (default /tmp/site) unless already there, and import from there
#   FRAMES, BS, ACCUM, CAP (GiB per process), WORK (checkpoint + data folder), MODEL_CONFIG, PYTHON
# The one-lease plans (issue 11: 1 x H200; issue 16: 2, 4 and 8 x H200, three commands of under 10 minutes each) are
# in docs/BENCHMARKS.md. One-GPU runs ("one_gpu*") run in the background, each on the next GPU from GPU 1 on, beside
# the plain loop on GPU 0; any other run waits for them first.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python3}"
MODEL_CONFIG=${MODEL_CONFIG:-configs/internvl3_8b_config.json}
FRAMES=${FRAMES:-16}; BS=${BS:-4}; ACCUM=${ACCUM:-4}; CAP=${CAP:-48}
RUNS=${RUNS:-"default persistent zero2 default_24gb zero2_24gb default_cached no_offload bf16_lora one_gpu baseline"}
if [ -z "${WORK:-}" ]; then  # the 16 GB checkpoint loads fastest from memory
  shm_free=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
  if [ "${shm_free:-0}" -gt 60 ]; then WORK=/dev/shm/bench_work; else WORK=/tmp/bench_work; fi
fi
R=${RESULTS:-/tmp/bench_results}; mkdir -p "$R"
if [ -n "${WHEELS:-}" ]; then
  SITE=${SITE:-/tmp/site}
  [ -d "$SITE/deepspeed" ] || "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
pack() {
  "$PYTHON" -m internvl.bench.summary "$R" > /dev/null 2>&1
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results.tgz" -C "$R" --exclude='*.trace.json.gz' .
    for trace in "$R"/*.trace.json.gz; do
      if [ -f "$trace" ] && [ "$(stat -c %s "$trace")" -lt 15000000 ]; then cp "$trace" "$OUT/"; fi
    done
  fi
}
# Tokens per sample of the default shape (4,490 for 16 frames), from the first run that reported it.
tokens_per_sample() {
  "$PYTHON" -c "import glob, json
for path in sorted(glob.glob('$R/*.json')):
    try: print(round(json.load(open(path))['results']['tokens_per_sample'])); break
    except Exception: pass
else: print(4490)"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; } >> "$R/machine.txt" 2>&1
"$PYTHON" -c "import sys, torch, transformers, peft, bitsandbytes, deepspeed; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'deepspeed', deepspeed.__version__)" | tee "$R/versions.txt"
"$PYTHON" -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" >> "$R/versions.txt" 2>&1
git rev-parse --short HEAD >> "$R/versions.txt" 2>/dev/null
# DeepSpeed JIT-compiles its CPU Adam (offload) and FusedAdam (ZeRO-2) on first use: build them while the checkpoint
# is written (cached for later commands on the same machine), with the launcher's TORCH_CUDA_ARCH_LIST fix.
"$PYTHON" -c "import os
from internvl.train.launch import CUDA_ARCH_LIST_ENV, deepspeed_compatible_arch_list
fixed = deepspeed_compatible_arch_list(os.environ)
if fixed: os.environ[CUDA_ARCH_LIST_ENV] = fixed[0]
from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder
CPUAdamBuilder().load(); FusedAdamBuilder().load()" > "$R/build_adam.log" 2>&1 &
SECONDS=0
timeout 300 "$PYTHON" -c "from internvl.bench.inputs import prepare_checkpoint; print(prepare_checkpoint('$MODEL_CONFIG', '$WORK'))" > "$R/prepare.log" 2>&1
wait; echo "checkpoint and DeepSpeed's Adam ready after ${SECONDS}s"; pack
# ZeRO-3 + offload with every parameter of the 8B model under the persistence threshold: the frozen 4-bit base stays
# whole on each GPU, only the LoRA weights and their optimizer state are partitioned and offloaded.
"$PYTHON" -c "import json, sys; c = json.load(open('configs/zero_stage3_config.json')); c['zero_optimization']['stage3_param_persistence_threshold'] = 1e9; json.dump(c, open(sys.argv[1], 'w'), indent=2)" "$R/zero3_persistent.json"
# ZeRO-3 + offload fetching each decoder layer and the vision tower as one unit (DeepSpeed's leaf modules), so that
# their sub-modules get no fetch/release hooks of their own.
"$PYTHON" -c "import json, sys; c = json.load(open('configs/zero_stage3_config.json')); c['zero_optimization']['leaf_module'] = {'classes': ['Qwen2DecoderLayer', 'InternVisionModel']}; json.dump(c, open(sys.argv[1], 'w'), indent=2)" "$R/zero3_layer_leaf.json"

run() {  # NAME TIME_LIMIT_S [benchmark options] [-- recipe flags]
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  # What the GPUs really hold (CUDA context and NCCL buffers included), next to PyTorch's own figures.
  # Only the GPU a one-GPU run was given, when it was given one.
  nvidia-smi ${CUDA_VISIBLE_DEVICES:+-i "$CUDA_VISIBLE_DEVICES"} --query-gpu=index,memory.used \
    --format=csv,noheader,nounits -l 2 > "$R/$name.nvidia-smi.csv" 2>&1 &
  local monitor=$!
  timeout -s TERM "$limit" "$PYTHON" scripts/benchmark_training.py --model-config "$MODEL_CONFIG" --work-dir "$WORK" \
    --gpu-memory-cap-gb "$CAP" --frames "$FRAMES" --max-seq-length 8192 --per-device-batch-size "$BS" \
    --grad-accum "$ACCUM" --steps 2 --warmup-steps 1 --name "$name" --output "$R/$name.json" ${NPROC:+--nproc-per-node "$NPROC"} \
    "$@" > "$R/$name.log" 2>&1
  local rc=$?
  kill "$monitor" 2>/dev/null
  cp "$WORK/runs/$name.profile.md" "$WORK/runs/$name.trace.json.gz" "$R/" 2>/dev/null
  local most=$(sort -t, -k2 -n "$R/$name.nvidia-smi.csv" | tail -1)
  echo "$name rc=$rc $((SECONDS - start))s | $(tail -2 "$R/$name.log" | tr '\n' ' ') | nvidia-smi max (gpu, MiB): $most"
  pack
}

baseline() {
  if [ -z "${BASELINE:-}" ]; then echo "baseline: skipped (set BASELINE=path/to/plain_qlora_baseline.py)"; return; fi
  local tokens start=$SECONDS; tokens=$(tokens_per_sample)
  if [ -n "${BASELINE_FULL:-}" ]; then
    CUDA_VISIBLE_DEVICES=0 timeout -s TERM 600 "$PYTHON" "$BASELINE" "$R/plain_baseline.json" > "$R/plain_baseline.log" 2>&1
  else
    CUDA_VISIBLE_DEVICES=0 timeout -s TERM 300 "$PYTHON" -m internvl.bench.baseline "$BASELINE" "$R/plain_baseline.json" \
      "$tokens" --batch 4 > "$R/plain_baseline.log" 2>&1
  fi
  echo "baseline rc=$? $((SECONDS - start))s | $(tail -1 "$R/plain_baseline.log")"
  pack
}

BACKGROUND=(); NEXT_GPU=1
wait_background() { if [ ${#BACKGROUND[@]} -gt 0 ]; then wait "${BACKGROUND[@]}"; fi; BACKGROUND=(); NEXT_GPU=1; }
one_gpu_run() {  # NAME TIME_LIMIT_S [options]: one process; in the background on the next free GPU when there are 2+
  if [ "$GPUS" -ge 2 ]; then
    [ "$NEXT_GPU" -lt "$GPUS" ] || wait_background
    CUDA_VISIBLE_DEVICES=$NEXT_GPU run "$1" "$2" --nproc-per-node 1 "${@:3}" & BACKGROUND+=($!)
    NEXT_GPU=$((NEXT_GPU + 1))
  else
    run "$1" "$2" --nproc-per-node 1 "${@:3}"
  fi
}

# Distributed checks (item 3 of issue 16: collectives, the saved adapter against DeepSpeed's fp32 copy, resume after
# a killed rank) with all visible GPUs, on the tiny model or on the 8B shape.
distributed_check() {  # NAME TIME_LIMIT_S [options]
  local name=$1 limit=$2 start=$SECONDS; shift 2
  timeout -s TERM "$limit" "$PYTHON" -m internvl.bench.distributed_checks --work-dir "$WORK" \
    ${NPROC:+--nproc-per-node "$NPROC"} --output "$R/$name.checks.json" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  # Keep the runs' logs; the 8B runs' checkpoints would fill /dev/shm.
  for log in "$WORK"/distributed_checks/runs/*.log; do [ -f "$log" ] && cp "$log" "$R/$name.$(basename "$log")"; done
  rm -rf "$WORK/distributed_checks/runs"
  echo "$name rc=$rc $((SECONDS - start))s | $(tail -5 "$R/$name.log" | tr '\n' ' ')"
  pack
}

variant() {  # one named variant of the benchmark
  local tokens
  case $1 in
    one_gpu*|baseline) ;;
    *) wait_background ;;
  esac
  case $1 in
    # The 2-GPU set of 2026-11-28.
    default) run default 200 --deepspeed zero_stage3_config.json ;;
    persistent) run persistent 200 --deepspeed "$R/zero3_persistent.json" ;;
    zero2) run zero2 180 --deepspeed zero_stage2_config.json ;;
    # A 24 GB card (24,564 MiB) less the CUDA context and NCCL (1.5-2 GiB): 22.5 GiB for PyTorch. Compare the
    # nvidia-smi peak, which includes them, with the card's 24,564 MiB.
    default_24gb) run default_24gb 200 --deepspeed zero_stage3_config.json --gpu-memory-cap-gb 22.5 ;;
    zero2_24gb) run zero2_24gb 180 --deepspeed zero_stage2_config.json --gpu-memory-cap-gb 22.5 ;;
    default_cached) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False run default_cached 200 --deepspeed zero_stage3_config.json ;;
    no_offload) run no_offload 200 --deepspeed zero_stage3_no_offload_config.json ;;
    bf16_lora) run bf16_lora 180 --deepspeed zero_stage2_config.json --no-4bit ;;
    one_gpu) one_gpu_run one_gpu 240 --deepspeed zero_stage3_config.json ;;
    baseline) baseline ;;
    # Issue 11: where the time goes (one more step under torch.profiler, not measured).
    default_profile) run default_profile 300 --deepspeed zero_stage3_config.json --profile ;;
    zero2_profile) run zero2_profile 240 --deepspeed zero_stage2_config.json --profile ;;
    # One lever each, against zero2_profile's measured steps.
    zero2_liger) run zero2_liger 200 --deepspeed zero_stage2_config.json -- --use_liger True ;;
    zero2_compile) run zero2_compile 300 --deepspeed zero_stage2_config.json --warmup-steps 2 -- --compile_llm_layers True ;;
    # Batch 1 x GA 16: the loader's prefetch as before (2 per worker) and by the new default (one step: 4 per worker),
    # then the memory-budget mode, planned for the real sample length.
    zero2_b1_prefetch2) run zero2_b1_prefetch2 200 --deepspeed zero_stage2_config.json --per-device-batch-size 1 --grad-accum 16 -- --dataloader_prefetch_factor 2 ;;
    zero2_b1) run zero2_b1 200 --deepspeed zero_stage2_config.json --per-device-batch-size 1 --grad-accum 16 ;;
    zero2_b1_auto) tokens=$(tokens_per_sample); run zero2_b1_auto 200 --deepspeed zero_stage2_config.json --per-device-batch-size 1 --grad-accum 16 --max-seq-length "$tokens" -- --grad_checkpoint_skip_layers auto ;;
    zero2_b2_auto) tokens=$(tokens_per_sample); run zero2_b2_auto 200 --deepspeed zero_stage2_config.json --per-device-batch-size 2 --grad-accum 8 --max-seq-length "$tokens" -- --grad_checkpoint_skip_layers auto ;;
    # ZeRO-3's own cost: whole decoder layers fetched at once, against default_profile.
    default_layer_leaf) run default_layer_leaf 240 --deepspeed "$R/zero3_layer_leaf.json" ;;
    # ZeRO-2 with both levers: the candidate best mode.
    zero2_levers) tokens=$(tokens_per_sample); run zero2_levers 240 --deepspeed zero_stage2_config.json --max-seq-length "$tokens" -- --use_liger True --grad_checkpoint_skip_layers auto ;;
    # The guide's default with the levers, on a 48 GB and a 24 GB card.
    default_levers) tokens=$(tokens_per_sample); run default_levers 240 --deepspeed zero_stage3_config.json --max-seq-length "$tokens" -- --use_liger True --grad_checkpoint_skip_layers auto ;;
    default_levers_24gb) tokens=$(tokens_per_sample); run default_levers_24gb 240 --deepspeed zero_stage3_config.json --gpu-memory-cap-gb 22.5 --max-seq-length "$tokens" -- --use_liger True --grad_checkpoint_skip_layers auto ;;
    # Issue 16: the fast mode (zero2_levers) on a 24 GB card, on one GPU (the reference of per-GPU efficiency), and
    # profiled; the default profiled is default_profile, on one GPU one_gpu.
    zero2_levers_24gb) tokens=$(tokens_per_sample); run zero2_levers_24gb 240 --deepspeed zero_stage2_config.json --gpu-memory-cap-gb 22.5 --max-seq-length "$tokens" -- --use_liger True --grad_checkpoint_skip_layers auto ;;
    one_gpu_levers) tokens=$(tokens_per_sample); one_gpu_run one_gpu_levers 240 --deepspeed zero_stage2_config.json --max-seq-length "$tokens" -- --use_liger True --grad_checkpoint_skip_layers auto ;;
    zero2_levers_profile) tokens=$(tokens_per_sample); run zero2_levers_profile 300 --deepspeed zero_stage2_config.json --max-seq-length "$tokens" --profile -- --use_liger True --grad_checkpoint_skip_layers auto ;;
    check_tiny) distributed_check check_tiny 300 --model-config tiny ;;
    check_8b) distributed_check check_8b 540 --model-config "$MODEL_CONFIG" ;;
    # Variable-length data on one GPU: 8-32 frames (the recipe's draw from 32-frame videos), summaries of 20-200
    # tokens; one sample per row, then packed (same seed: the same samples).
    varlen_unpacked) run varlen_unpacked 300 "${varlen[@]}" -- --min_num_frame 8 ;;
    varlen_packed) run varlen_packed 300 "${varlen[@]}" -- --min_num_frame 8 --use_packed_ds True ;;
    *) echo "unknown run '$1'" ;;
  esac
}

varlen=(--deepspeed zero_stage3_config.json --nproc-per-node 1 --frames 32 --summary-tokens 20 200 --steps 4)
for name in $RUNS; do variant "$name"; done
wait_background
pack
cat "$R/summary.md" 2>/dev/null
