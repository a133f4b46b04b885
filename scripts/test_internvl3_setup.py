"""Check the machine, model, data and settings before a fine-tuning run; every ❌ comes with its fix.

    python scripts/test_internvl3_setup.py                       # what the quick start would run
    GPUS=4 BATCH_SIZE=64 python scripts/test_internvl3_setup.py  # the launcher's environment variables
    python scripts/test_internvl3_setup.py --model-path models/InternVL3-8B --full --json
    python scripts/test_internvl3_setup.py -- --max_num_frame 16  # training arguments, as given to the launcher
    python scripts/test_internvl3_setup.py --preview              # then the first training sample, as the model sees it

Settings come from the environment variables of scripts/finetune_internvl3_8b_4bit_lora.sh (GPUS,
PER_DEVICE_BATCH_SIZE, BATCH_SIZE, MODEL_PATH, META_PATH, OUTPUT_DIR, LORA_RANK, DEEPSPEED_CONFIG, NNODES) with the
quick start's defaults: the launcher's, except that GPUS defaults to 2 (under SLURM, to the GPUs per node); the
options below override them. As for the launcher, relative paths in the environment are taken from the repository
root; paths given as options, from the current folder. Exit code 0 when nothing failed, 1 otherwise.
See docs/SETUP.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from internvl.tools.checks import SetupSettings, run_setup_checks  # noqa: E402
from internvl.tools.checks.preview import CONTACT_SHEET_NAME, preview_after_checks  # noqa: E402

# Options that set one of the launcher's environment variables.
ENV_OPTIONS = {
    "model_path": "MODEL_PATH",
    "meta_path": "META_PATH",
    "deepspeed_config": "DEEPSPEED_CONFIG",
    "output_dir": "OUTPUT_DIR",
    "gpus": "GPUS",
    "nnodes": "NNODES",
    "per_device_batch_size": "PER_DEVICE_BATCH_SIZE",
    "batch_size": "BATCH_SIZE",
    "lora_rank": "LORA_RANK",
}
# The quick start's process count (scripts/quick_start_internvl3_4bit_lora.sh); its other defaults are the
# launcher's, which would otherwise start one process per visible GPU.
QUICK_START_GPUS = "2"
# Options holding paths, which are taken from the current folder.
PATH_OPTIONS = ("model_path", "meta_path", "output_dir", "deepspeed_config")
# Options that become training arguments.
TRAINING_OPTIONS = {
    "max_seq_length": "--max_seq_length",
    "max_num_frame": "--max_num_frame",
    "save_total_limit": "--save_total_limit",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s [options] [-- TRAINING ARGS]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults are the quick start's: see scripts/quick_start_internvl3_4bit_lora.sh.",
    )
    paths = parser.add_argument_group("paths")
    paths.add_argument("--model-path", "--model_name_or_path", help="model folder (env MODEL_PATH)")
    paths.add_argument("--meta-path", "--meta_path", help="data meta.json (env META_PATH)")
    paths.add_argument("--deepspeed-config", "--deepspeed", help="DeepSpeed JSON, a path or a name in configs/ "
                       "(env DEEPSPEED_CONFIG)")  # fmt: skip
    paths.add_argument("--output-dir", "--output_dir", help="training output folder (env OUTPUT_DIR)")
    batch = parser.add_argument_group("batch and training settings")
    batch.add_argument("--gpus", type=int, help="processes per node (env GPUS; default 2, as in the quick start)")
    batch.add_argument("--nnodes", type=int, help="number of nodes (env NNODES)")
    batch.add_argument("--per-device-batch-size", type=int, help="micro-batch per GPU (env PER_DEVICE_BATCH_SIZE)")
    batch.add_argument("--batch-size", type=int, help="samples per optimizer step over all GPUs (env BATCH_SIZE)")
    batch.add_argument("--lora-rank", type=int, help="LoRA rank of the LLM (env LORA_RANK)")
    batch.add_argument("--max-seq-length", type=int, help="tokens per sample (training --max_seq_length)")
    batch.add_argument("--max-num-frame", type=int, help="frames per video (training --max_num_frame)")
    batch.add_argument("--save-total-limit", type=int, help="checkpoints kept (training --save_total_limit)")
    parser.add_argument("--full", action="store_true", help="check every referenced video/image, not a sample")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--preview", action="store_true",
                        help="then print the first training sample as the model sees it (prompt with the supervised "
                             f"span marked, token counts) and draw its frames to OUTPUT_DIR/{CONTACT_SHEET_NAME}")
    parser.add_argument("training_args", nargs="*", help="training arguments after --, as given to the launcher")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    environ = dict(os.environ)
    if not (environ.get("GPUS") or environ.get("SLURM_GPUS_ON_NODE")):
        environ["GPUS"] = QUICK_START_GPUS
    for option, variable in ENV_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            # A DeepSpeed config may also be a bare name from configs/: only existing paths are made absolute.
            is_path = option in PATH_OPTIONS and (option != "deepspeed_config" or Path(value).exists())
            environ[variable] = str(Path(value).absolute()) if is_path else str(value)
    # The launchers run from the repository root; so do the checks, to resolve paths the same way.
    os.chdir(REPO_ROOT)
    training_args = list(args.training_args)
    for option, flag in TRAINING_OPTIONS.items():
        if getattr(args, option) is not None:
            training_args += [flag, str(getattr(args, option))]
    # Libraries log to stdout (DeepSpeed does); with --json, stdout carries the JSON only.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        try:
            settings = SetupSettings.from_launcher(environ, training_args)
        except ValueError as error:
            print(f"❌ settings: {error}", file=sys.stderr)
            return 2
        settings.full_media_check = args.full
        report = run_setup_checks(settings)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_text())
    if args.preview:
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            print("\n" + preview_after_checks(report, settings, settings.output_dir / CONTACT_SHEET_NAME))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
