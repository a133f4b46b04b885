#!/usr/bin/env bash
# Download an InternVL3 checkpoint into models/ and verify it.
#
#   bash scripts/download_internvl3_models.sh                          # OpenGVLab/InternVL3-8B -> models/InternVL3-8B
#   bash scripts/download_internvl3_models.sh OpenGVLab/InternVL3-2B   # another checkpoint -> models/InternVL3-2B
#   bash scripts/download_internvl3_models.sh --source modelscope      # from ModelScope (or MODEL_SOURCE=modelscope)
#   bash scripts/download_internvl3_models.sh --local-dir /data/InternVL3-8B
#   bash scripts/download_internvl3_models.sh --verify-only            # check a folder copied from elsewhere
#
# Hugging Face downloads use `hf download` (or the older `huggingface-cli download`), which honour HF_ENDPOINT
# (a mirror, e.g. HF_ENDPOINT=https://hf-mirror.com) and HF_TOKEN; ModelScope downloads use `modelscope download`.
# Downloads resume: after an interruption, run the same command again. A folder that already verifies is not
# downloaded again. The verification is python -m internvl.tools.download (see docs/SETUP.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

MODEL_ID="OpenGVLab/InternVL3-8B"
SOURCE="${MODEL_SOURCE:-huggingface}"
LOCAL_DIR=""
VERIFY_ONLY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --source) SOURCE="${2:?--source needs huggingface or modelscope}"; shift 2 ;;
    --source=*) SOURCE="${1#*=}"; shift ;;
    --local-dir) LOCAL_DIR="${2:?--local-dir needs a folder}"; shift 2 ;;
    --local-dir=*) LOCAL_DIR="${1#*=}"; shift ;;
    --verify-only) VERIFY_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    *) MODEL_ID="$1"; shift ;;
  esac
done
LOCAL_DIR="${LOCAL_DIR:-models/${MODEL_ID##*/}}"
# This command again, for the messages below.
RERUN="bash scripts/download_internvl3_models.sh $MODEL_ID --local-dir $LOCAL_DIR"

verify() { "$PYTHON" -m internvl.tools.download "$LOCAL_DIR" "$@"; }

if [[ "$VERIFY_ONLY" == 1 ]]; then
  verify
  exit
fi
if [[ -d "$LOCAL_DIR" ]] && verify --quiet; then
  echo "$LOCAL_DIR already holds a complete checkpoint; nothing to download."
  echo "Use it with: MODEL_PATH=$LOCAL_DIR"
  exit 0
elif [[ -d "$LOCAL_DIR" ]]; then
  echo "$LOCAL_DIR is incomplete; downloading what is missing."
fi

# The endpoint without any user:password@ part, so that nothing secret is printed.
HF_HOST="$(printf '%s' "${HF_ENDPOINT:-https://huggingface.co}" | sed -E 's#//[^/@]*@#//#')"

offline_help() {
  cat >&2 <<EOF

Could not download $MODEL_ID ($1).
If this machine is offline or cannot reach the hub:
  - copy the folder from a machine that has it (or download it there with this script), e.g.
      rsync -a other-host:path/to/${MODEL_ID##*/}/ $LOCAL_DIR/
    then check it with: $RERUN --verify-only
  - use a Hugging Face mirror: HF_ENDPOINT=https://hf-mirror.com $RERUN
  - use ModelScope: $RERUN --source modelscope
  - if HF_HUB_OFFLINE=1 is set, unset it to allow downloads.
Files already downloaded are kept; running the same command again resumes.
EOF
}

case "$SOURCE" in
  huggingface|hf)
    if [[ "${HF_HUB_OFFLINE:-0}" == 1 ]]; then
      offline_help "HF_HUB_OFFLINE=1: downloads are disabled"
      exit 1
    fi
    if command -v hf >/dev/null 2>&1; then
      DOWNLOAD=(hf download "$MODEL_ID" --local-dir "$LOCAL_DIR")
    elif command -v huggingface-cli >/dev/null 2>&1; then
      DOWNLOAD=(huggingface-cli download "$MODEL_ID" --local-dir "$LOCAL_DIR")
    else
      echo "Neither 'hf' nor 'huggingface-cli' is installed: pip install -U huggingface_hub" >&2
      exit 1
    fi
    echo "Downloading $MODEL_ID from $HF_HOST into $LOCAL_DIR with ${DOWNLOAD[0]} (resumable)"
    ;;
  modelscope|ms)
    if ! command -v modelscope >/dev/null 2>&1; then
      echo "The 'modelscope' command is not installed: pip install modelscope" >&2
      exit 1
    fi
    DOWNLOAD=(modelscope download --model "$MODEL_ID" --local_dir "$LOCAL_DIR")
    echo "Downloading $MODEL_ID from ModelScope into $LOCAL_DIR (resumable)"
    ;;
  *)
    echo "unknown source '$SOURCE': use huggingface or modelscope" >&2
    exit 2
    ;;
esac

if ! "${DOWNLOAD[@]}"; then
  offline_help "${DOWNLOAD[0]} failed; its error is above"
  exit 1
fi
if ! verify; then
  echo "The download finished but $LOCAL_DIR is incomplete (see above); run the same command again to resume." >&2
  exit 1
fi
echo "Use it with: MODEL_PATH=$LOCAL_DIR"
