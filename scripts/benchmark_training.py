"""Training throughput and memory of the fine-tuning recipe on InternVL3-8B's shape, with random weights.

    python scripts/benchmark_training.py --deepspeed zero_stage3_config.json --per-device-batch-size 4 \
        --grad-accum 4 --frames 16 --max-seq-length 8192 --steps 2 --gpu-memory-cap-gb 48 --output default.json

Writes a random-weight checkpoint of --model-config (once, into --work-dir) and synthetic 16-frame videos, then
runs the recipe itself (same flags as scripts/finetune_internvl3_8b_4bit_lora.sh, same Trainer and DeepSpeed
config) under torchrun for --warmup-steps + --steps optimizer steps. Reports tokens/s per GPU, samples/s, step
time, peak GPU memory per GPU, the share of time spent waiting for data and MFU, as JSON (see docs/BENCHMARKS.md).
Arguments after "--" are passed to the training script and override its flags. Without GPUs it runs CPU
processes (use --model-config tiny there).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl.bench.flops import DEFAULT_PEAK_TFLOPS  # noqa: E402
from internvl.bench.report import format_summary  # noqa: E402
from internvl.bench.run import DEFAULT_MODEL_CONFIG, BenchmarkSettings, run_benchmark  # noqa: E402
from internvl.data.files import atomic_write_text  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], usage="%(prog)s [options] [-- RECIPE ARGS]"
    )
    parser.add_argument(
        "--deepspeed", default="zero_stage3_config.json", help="a path or a name in configs/ (default: %(default)s)"
    )
    parser.add_argument("--nproc-per-node", type=int, help="processes (default: the visible GPUs, or 2 CPU processes)")
    parser.add_argument("--per-device-batch-size", type=int, default=4, help="default: %(default)s")
    parser.add_argument("--grad-accum", type=int, default=4, help="gradient accumulation steps (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video sample (default: %(default)s)")
    parser.add_argument(
        "--summary-tokens", type=int, nargs=2, metavar=("FEWEST", "MOST"),
        help="summaries of FEWEST to MOST tokens, spread evenly (default: one 77-token summary for all samples)",
    )  # fmt: skip
    parser.add_argument("--max-seq-length", type=int, default=8192, help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="unmeasured first steps (default: %(default)s)")
    parser.add_argument(
        "--load-in-4bit", action=argparse.BooleanOptionalAction, default=True, help="NF4 LLM (QLoRA; default)"
    )
    parser.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", help="bf16 LoRA")
    parser.add_argument("--lora-rank", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--gpu-memory-cap-gb", type=float, help="cap each process's PyTorch memory (GiB)")
    parser.add_argument(
        "--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="per-GPU peak for MFU (default: %(default)s)"
    )
    parser.add_argument(
        "--model-config", default=str(DEFAULT_MODEL_CONFIG), help="model config.json or 'tiny' (default: InternVL3-8B)"
    )
    parser.add_argument("--work-dir", default="work_dirs/benchmark", help="inputs and runs (default: %(default)s)")
    parser.add_argument("--name", default="run", help="run name, used for its files (default: %(default)s)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run one more step under torch.profiler (not measured): a Chrome trace and the step's time by "
        "category (GEMM, NF4 dequantization, LoRA, attention, ...) beside the report, in it, and as Markdown",
    )
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv[:split])
    for name in ("per_device_batch_size", "grad_accum", "frames", "max_seq_length", "steps", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.summary_tokens and not 1 <= args.summary_tokens[0] <= args.summary_tokens[1]:
        parser.error("--summary-tokens FEWEST MOST needs 1 <= FEWEST <= MOST")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be 0 or more")
    return args, argv[split + 1 :]


def main(argv: list[str] | None = None) -> int:
    args, recipe_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = BenchmarkSettings(
        deepspeed=args.deepspeed,
        nproc_per_node=args.nproc_per_node,
        per_device_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        frames=args.frames,
        summary_tokens=tuple(args.summary_tokens) if args.summary_tokens else None,
        max_seq_length=args.max_seq_length,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        load_in_4bit=args.load_in_4bit,
        lora_rank=args.lora_rank,
        gpu_memory_cap_gb=args.gpu_memory_cap_gb,
        peak_tflops=args.peak_tflops,
        model_config=args.model_config,
        work_dir=args.work_dir,
        name=args.name,
        profile=args.profile,
        recipe_args=recipe_args,
    )
    # A SIGTERM (e.g. from `timeout`) unwinds normally, so the training processes are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report = run_benchmark(settings)
    text = json.dumps(report, indent=2) + "\n"
    if args.output:
        atomic_write_text(args.output, text)
    else:
        print(text)
    print(format_summary(report), flush=True)
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
