"""Entry point of each benchmark training process (started by ``internvl.bench.run`` under ``torchrun``):

    python -m internvl.bench.worker --report R.json [options] -- RECIPE ARGS

runs the recipe's own ``main()`` (same flags, Trainer and DeepSpeed config as the launcher's) with the
``BenchmarkTrainer``, which times every optimizer step; the main process writes the report.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

from internvl.bench.flops import DEFAULT_PEAK_TFLOPS
from internvl.bench.report import GIB


def worker_options(
    report: str,
    *,
    warmup_steps: int,
    peak_tflops: float,
    gpu_memory_cap_gb: float | None,
    profile_trace: str | None = None,
) -> list[str]:
    """The worker's own flags (before ``--``), as ``main`` parses them."""
    options = [
        "--report", str(report),
        "--warmup-steps", str(warmup_steps),
        "--peak-tflops", str(peak_tflops),
    ]  # fmt: skip
    if gpu_memory_cap_gb:
        options += ["--gpu-memory-cap-gb", str(gpu_memory_cap_gb)]
    if profile_trace:
        options += ["--profile-trace", str(profile_trace)]
    return options


def cap_gpu_memory(cap_gib: float) -> None:
    """Limit this process's PyTorch allocations on its GPU to ``cap_gib`` (CUDA context and NCCL buffers come on
    top), to stand in for a smaller card."""
    device = int(os.environ.get("LOCAL_RANK", "0"))
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gib * GIB > total:
        raise ValueError(f"--gpu-memory-cap-gb {cap_gib} is more than GPU {device} holds ({total / GIB:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total, device)


def main(argv: list[str] | None = None) -> None:
    """``--report R.json [options] -- RECIPE ARGS``: the recipe's training run, measured."""
    from internvl.bench.meter import BenchmarkTrainer
    from internvl.train import internvl_chat_finetune

    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description="One benchmark training process (started by torchrun).")
    parser.add_argument("--report", required=True)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS)
    parser.add_argument("--gpu-memory-cap-gb", type=float, default=None)
    parser.add_argument("--profile-trace", default=None, help="profile the last step into this .json.gz trace")
    options = parser.parse_args(argv[:split])
    if options.gpu_memory_cap_gb and torch.cuda.is_available():
        cap_gpu_memory(options.gpu_memory_cap_gb)
    trainer_class = functools.partial(
        BenchmarkTrainer,
        report_path=options.report,
        warmup_steps=options.warmup_steps,
        peak_tflops=options.peak_tflops,
        memory_cap_gib=options.gpu_memory_cap_gb,
        profile_trace=options.profile_trace,
    )
    internvl_chat_finetune.main(argv[split + 1 :], trainer_class=trainer_class)


if __name__ == "__main__":
    main()
