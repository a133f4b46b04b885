#!/usr/bin/env bash
# The whole pipeline on a tiny random-init InternVL3 and synthetic videos, on CPU, in a few minutes:
# build the model and the videos, prepare the data, check the setup, fine-tune with QLoRA (4-bit LLM, LoRA r=32,
# DeepSpeed ZeRO-3 with CPU offload, 2 processes) through the quick-start script, evaluate, merge.
# Run it as `make demo` (which installs the environment first) or `bash scripts/demo.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHON

# Everything is written below DEMO_ROOT (default: the repository, in its git-ignored folders).
DEMO_ROOT="${DEMO_ROOT:-.}"
MODEL_DIR="$DEMO_ROOT/models/tiny-internvl3"
RAW_DIR="$DEMO_ROOT/internvl3_data/demo_videos"
DATA_DIR="$DEMO_ROOT/internvl3_data/demo"
OUTPUT_DIR="$DEMO_ROOT/work_dirs/demo_tiny_internvl3_4bit_lora"
MERGED_DIR="$DEMO_ROOT/work_dirs/demo_tiny_internvl3_merged"

echo "== 1/6 Tiny InternVL3 checkpoint -> $MODEL_DIR"
"$PYTHON" scripts/create_tiny_model.py --output-dir "$MODEL_DIR"

echo "== 2/6 Demo videos -> $RAW_DIR"
"$PYTHON" scripts/make_demo_data.py --output-dir "$RAW_DIR" --num-videos 16

echo "== 3/6 Training data -> $DATA_DIR"
"$PYTHON" scripts/prepare_internvl3_finetuning.py --input "$RAW_DIR/annotations.csv" --output-dir "$DATA_DIR" \
  --val-ratio 0.125 --no-progress

echo "== 4/6 Setup check and QLoRA fine-tuning (ZeRO-3 + CPU offload) -> $OUTPUT_DIR"
# The tiny model learns in minutes with a higher learning rate, few frames and short sequences; everything else
# is the quick start's defaults (2 processes, LoRA rank 32, ZeRO-3 with CPU offload).
GPUS=2 PER_DEVICE_BATCH_SIZE=2 BATCH_SIZE=4 EPOCHS=8 LR=2e-3 \
MODEL_PATH="$MODEL_DIR" META_PATH="$DATA_DIR/meta.json" OUTPUT_DIR="$OUTPUT_DIR" \
  bash scripts/quick_start_internvl3_4bit_lora.sh --overwrite_output_dir True --min_num_frame 4 --max_num_frame 4 \
  --max_seq_length 2048 --logging_steps 2 --eval_steps 8 --save_steps 8 --dataloader_num_workers 1

echo "== 5/6 Evaluation of the fine-tuned model -> $OUTPUT_DIR/eval"
rm -rf "$OUTPUT_DIR/eval"  # the evaluator resumes an existing folder; this is a new adapter
"$PYTHON" scripts/evaluate_internvl3.py --model "$OUTPUT_DIR" --meta-path "$DATA_DIR/meta.json" \
  --output-dir "$OUTPUT_DIR/eval" --load-in-4bit --num-frames 4 --device cpu

echo "== 6/6 Merge the adapter into a full checkpoint -> $MERGED_DIR"
"$PYTHON" scripts/merge_lora.py "$OUTPUT_DIR" "$MERGED_DIR" --overwrite

first_loss=$(grep -m1 '^step ' "$OUTPUT_DIR/training_log.txt" | sed 's/.*| loss \([^ ]*\) |.*/\1/')
last_loss=$(grep '^step ' "$OUTPUT_DIR/training_log.txt" | tail -n 1 | sed 's/.*| loss \([^ ]*\) |.*/\1/')
cat <<SUMMARY

Demo finished. Training loss: $first_loss at the first logged step, $last_loss at the last.
  tiny model        $MODEL_DIR
  demo videos       $RAW_DIR
  training data     $DATA_DIR/meta.json
  adapter + logs    $OUTPUT_DIR   (adapter_model.safetensors, training_log.txt, loss_curves.png, runs/ for TensorBoard)
  evaluation        $OUTPUT_DIR/eval   (report.md, metrics.json, predictions.jsonl)
  merged model      $MERGED_DIR
Loss per step: $OUTPUT_DIR/training_log.txt
SUMMARY
