"""Generate summaries for an evaluation set and score them (ROUGE-1/2/L, BLEU-4, CIDEr, METEOR when available).

    python scripts/evaluate_internvl3.py --model work_dirs/internvl3_8b_lora --meta-path internvl3_data/meta.json \
        --output-dir work_dirs/internvl3_8b_lora/eval --load-in-4bit [--compare models/InternVL3-8B]

--model is a model folder (base or merged) or a training output with a LoRA adapter. The evaluation set is the
_val entry of --meta-path, or --jsonl with --root. Rerunning with the same --output-dir resumes, as long as the
weights and generation settings are the same (else it starts over). Exit code 1 when records failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl.tools.evaluate import METRICS_NAME, REPORT_NAME, EvaluationConfig, run_evaluation  # noqa: E402
from internvl.tools.infer import add_model_arguments  # noqa: E402
from internvl.tools.metrics import METRIC_TITLES  # noqa: E402


def parse_args() -> EvaluationConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--compare", type=Path, metavar="BASE_MODEL", help="also evaluate this model, side by side")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--meta-path", type=Path, help="meta.json whose '_val' entries are evaluated")
    data.add_argument("--jsonl", type=Path, help="a JSONL of records in the official format")
    parser.add_argument("--root", type=Path, help="folder --jsonl media paths start from (default: its folder)")
    parser.add_argument("--output-dir", type=Path, required=True, help="predictions, metrics and report go here")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    if args.root is not None and args.jsonl is None:
        parser.error("--root goes with --jsonl (meta.json entries carry their own root)")
    return EvaluationConfig(**vars(args))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score's "Using default tokenizer."
    config = parse_args()
    try:
        metrics = run_evaluation(config)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    for label, summary in metrics["models"].items():
        scores = ", ".join(f"{METRIC_TITLES[k]} {v:.2f}" for k, v in summary["scores"].items())
        print(f"{label}: {summary['num_scored']}/{summary['num_records']} scored: {scores}")
        for name, reason in summary["skipped_metrics"].items():
            print(f"  {METRIC_TITLES[name]} skipped: {reason}")
        if summary["num_failed"]:
            print(f"  {summary['num_failed']} records failed (listed in {REPORT_NAME}); rerun to retry them")
    print(f"report: {config.output_dir / REPORT_NAME}, metrics: {config.output_dir / METRICS_NAME}")
    if any(summary["num_failed"] for summary in metrics["models"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
