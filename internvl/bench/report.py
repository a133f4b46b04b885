"""The benchmark's JSON report: run settings, environment, per-GPU and per-step figures; and its one-line summary."""

from __future__ import annotations

import os
import platform
import time
from typing import TYPE_CHECKING

import torch

from internvl.bench.flops import BatchCounts, training_flops
from internvl.model.checkpointing import checkpointed_layers
from internvl.model.dims import ModelDims
from internvl.train.launch import CUDA_ALLOC_CONF_ENV

if TYPE_CHECKING:
    from internvl.bench.meter import BenchmarkTrainer

GIB = 2**30


def describe_run(trainer: BenchmarkTrainer, args) -> dict:
    """What ran: DeepSpeed settings, batch shape, 4-bit, LoRA, checkpointing, steps and the benchmark's options."""
    model = trainer.model
    ds_config = args.hf_deepspeed_config.config if getattr(args, "hf_deepspeed_config", None) else {}
    zero = ds_config.get("zero_optimization", {})
    return {
        "deepspeed_config": args.deepspeed if isinstance(args.deepspeed, str) else None,
        "zero_stage": zero.get("stage"),
        "offload_param": zero.get("offload_param", {}).get("device", "none"),
        "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none"),
        "param_persistence_threshold": zero.get("stage3_param_persistence_threshold"),
        "world_size": args.world_size,
        "per_device_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "load_in_4bit": any(type(p).__name__ == "Params4bit" for p in model.parameters()),
        "lora_rank": model.config.use_llm_lora,
        "gradient_checkpointing": _is_checkpointing(model.base_language_model),
        "checkpointed_layers": len(checkpointed_layers(model)) if _is_checkpointing(model.base_language_model) else 0,
        "steps": len(trainer.meter.steps),
        "warmup_steps": trainer.warmup_steps,
        "profiled_steps": 1 if trainer.profile_trace else 0,
        "gpu_memory_cap_gib": trainer.memory_cap_gib,
        "cuda_alloc_conf": os.environ.get(CUDA_ALLOC_CONF_ENV),
        "peak_tflops_per_gpu": trainer.peak_tflops,
    }


def _is_checkpointing(llm) -> bool:
    # transformers >= 5.23 renamed the property (the old name warns).
    if hasattr(type(llm), "is_activation_checkpointing"):
        return bool(llm.is_activation_checkpointing)
    return bool(llm.is_gradient_checkpointing)


def build_report(trainer: BenchmarkTrainer, args, state, summaries: list[dict]) -> dict:
    """The JSON report: run settings, environment, and per-GPU / per-step figures over the measured steps."""
    run = describe_run(trainer, args)
    world = args.world_size
    counts = BatchCounts()
    for summary in summaries:
        counts += BatchCounts(**summary["counts"])
    main = summaries[0]
    measured_steps = main["measured_steps"]
    seconds = main["measured_seconds"]
    if measured_steps < 1 or seconds <= 0:
        raise ValueError(f"no measured steps: {len(main['step_seconds'])} steps ran, {trainer.warmup_steps} warm-up")
    dims = ModelDims.from_config(trainer.model.config)
    flops = training_flops(dims, counts, lora_rank=run["lora_rank"] or 0, recomputed_layers=run["checkpointed_layers"])
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    results = {
        "measured_steps": measured_steps,
        "step_time_s": seconds / measured_steps,
        "samples_per_step": counts.samples / measured_steps,
        "tokens_per_step": counts.tokens / measured_steps,
        "tokens_per_sample": counts.tokens / max(counts.samples, 1),
        "supervised_tokens_per_sample": counts.supervised_tokens / max(counts.samples, 1),
        "frames_per_sample": counts.frames / max(counts.samples, 1),
        "tokens_per_second_per_gpu": counts.tokens / seconds / world,
        "samples_per_second": counts.samples / seconds,
        "dataloader_wait_share": max(s["measured_data_wait_seconds"] / s["measured_seconds"] for s in summaries),
        "flops_per_step": flops / measured_steps,
        "mfu": flops / seconds / world / (trainer.peak_tflops * 1e12),
        "step_times_s": main["step_seconds"],
        "loss": losses[-1] if losses else None,
        # Unreadable samples are replaced by others (the recipe's policy); here any of them spoils the figures.
        "bad_samples": sum(summary["bad_samples"] for summary in summaries),
    }
    if "peak_train_bytes" in main:
        results.update(
            peak_gpu_memory_gib=[max(s["peak_load_bytes"], s["peak_train_bytes"]) / GIB for s in summaries],
            peak_train_gpu_memory_gib=[s["peak_train_bytes"] / GIB for s in summaries],
            peak_train_gpu_reserved_gib=[s["peak_train_reserved_bytes"] / GIB for s in summaries],
        )
    status = "ok" if results["bad_samples"] == 0 else "bad_samples"
    report = {"status": status, "run": run, "environment": environment(main.get("device")), "results": results}
    if trainer.profile is not None:
        report["profile"] = trainer.profile
    return report


def environment(device: str | None) -> dict:
    import bitsandbytes
    import deepspeed
    import peft
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": device or platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "deepspeed": deepspeed.__version__,
    }


def format_summary(report: dict) -> str:
    """One line for people: the headline figures of a report."""
    name = report.get("settings", {}).get("name", "run")
    if "results" not in report:
        return f"{name}: {report['status'].upper()} (exit code {report.get('returncode')}, log {report.get('log')})"
    r = report["results"]
    peak = r.get("peak_gpu_memory_gib")
    memory = f"peak {max(peak):.2f} GiB/GPU" if peak else "peak n/a (cpu)"
    line = (
        f"{name}: {r['tokens_per_second_per_gpu']:,.0f} tokens/s/GPU | {r['samples_per_second']:.3f} samples/s | "
        f"step {r['step_time_s']:.2f} s | {r['tokens_per_sample']:.0f} tokens/sample | {memory} | "
        f"data wait {100 * r['dataloader_wait_share']:.1f}% | MFU {100 * r['mfu']:.1f}%"
    )
    if report["status"] != "ok":
        line += f" | {report['status'].upper()}: {r['bad_samples']} samples could not be built (see the log)"
    if "profile" in report:
        shares = sorted(report["profile"]["categories"].items(), key=lambda item: -item[1]["share"])[:4]
        line += "\nprofiled step: " + ", ".join(f"{name} {100 * value['share']:.0f}%" for name, value in shares)
        line += f" (tables: {report['profile'].get('table')}, trace: {report['profile']['trace']})"
    return line
