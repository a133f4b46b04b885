"""Training throughput and memory of the real recipe, on random weights and synthetic videos.

``run_benchmark`` writes what a run needs into a work folder (a random-weight checkpoint with the tiny model's
tokenizer, and frame-folder videos with their ``meta.json``), then starts the recipe under ``torchrun`` exactly as
``scripts/finetune_internvl3_8b_4bit_lora.sh`` does (same flags, same ``main()``, same Trainer and DeepSpeed config),
only with a trainer that also times every optimizer step. Each process runs this module as its entry point
(``python -m internvl.train.benchmark --report R.json -- RECIPE ARGS``); the main process writes the report.

Measured per optimizer step, after the warm-up steps: wall time (the GPU is synchronised at each step end),
time spent waiting for the next batch, tokens and samples over all processes, and peak GPU memory per process.
MFU counts the FLOPs the model needs (``training_flops``) against ``peak_tflops`` per GPU.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from internvl.constants import IGNORE_INDEX, INTERNVL3_8B_CONFIG
from internvl.data.files import atomic_directory, atomic_write_text
from internvl.train.launch import CUDA_ALLOC_CONF_ENV, resolve_plan, visible_gpu_count
from internvl.train.launch import DEFAULTS as LAUNCH_DEFAULTS
from internvl.train.trainer import InternVLTrainer

DEFAULT_MODEL_CONFIG = INTERNVL3_8B_CONFIG
TINY_MODEL = "tiny"
# Dense BF16 tensor-core rate of an H100 / H200 SXM (vendor datasheet), per GPU.
DEFAULT_PEAK_TFLOPS = 989.0
REPORT_NAME = "report.json"
GIB = 2**30

VIDEO_QUESTION = "<video>\nSummarize what happens in this video."
# One fixed answer: every sample then has the same length, so tokens per step follow from the batch shape.
VIDEO_SUMMARY = (
    "A red circle starts in the top left corner of a white frame and moves slowly to the bottom right corner, "
    "while a blue square in the centre grows larger and then turns green. Near the end a yellow triangle rotates "
    "once and a black line crosses the screen from left to right. Nothing else happens and the background stays "
    "white for the whole video."
)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: a random-weight checkpoint and synthetic videos


def prepare_checkpoint(model_config: str | Path, work_dir: str | Path) -> Path:
    """A checkpoint folder for ``model_config`` (a config.json path, or ``"tiny"``) with random weights and the tiny
    model's tokenizer, written once into ``work_dir`` and reused afterwards.

    An 8B checkpoint is built on the first GPU when there is one, in a child process, so this process never holds
    GPU memory while the benchmark runs.
    """
    work_dir = Path(work_dir)
    if str(model_config) == TINY_MODEL:
        target = work_dir / "checkpoint-tiny"
    else:
        text = Path(model_config).read_text(encoding="utf-8")
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        target = work_dir / f"checkpoint-{Path(model_config).stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    context = torch.multiprocessing.get_context("spawn")
    writer = context.Process(target=write_random_checkpoint, args=(str(model_config), str(target)))
    writer.start()
    writer.join()
    if writer.exitcode != 0:
        raise RuntimeError(f"writing the random checkpoint {target} failed (exit code {writer.exitcode})")
    return target


def write_random_checkpoint(model_config: str, output_dir: str) -> None:
    """Random-init ``InternVLChatModel`` weights (bf16, safetensors) plus the tiny tokenizer, written atomically.

    The tokenizer has fewer tokens than the model's vocabulary, which loading allows; the token ids of the
    synthetic samples then use the first rows of the embedding only, which costs the same compute.
    """
    from internvl.model.configuration import InternVLChatConfig
    from internvl.model.internvl_chat import InternVLChatModel
    from internvl.model.tiny import build_tiny_tokenizer, create_tiny_model

    if model_config == TINY_MODEL:
        create_tiny_model(output_dir)
        return
    with open(model_config, encoding="utf-8") as f:
        config = InternVLChatConfig(**json.load(f))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = InternVLChatModel(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        build_tiny_tokenizer().save_pretrained(staging)


def prepare_videos(output_dir: str | Path, *, num_frames: int, num_samples: int, num_videos: int = 8) -> Path:
    """``num_videos`` frame-folder clips of ``num_frames`` 448-px JPEG frames and ``num_samples`` summarization
    records cycling over them; returns the ``meta.json`` path. Rewritten on every call (it takes a second)."""
    from internvl.data.demo import COLOURS, MOTIONS, SHAPES, MovingShape, render_frames

    output_dir = Path(output_dir)
    colours, motions = list(COLOURS), list(MOTIONS)
    with atomic_directory(output_dir) as staging:
        for index in range(num_videos):
            item = MovingShape(
                SHAPES[index % len(SHAPES)], colours[index % len(colours)], motions[index % len(motions)]
            )
            clip_dir = staging / f"clip_{index:03d}"
            clip_dir.mkdir()
            for frame_index, frame in enumerate(render_frames([item], frames=num_frames, size=448)):
                frame.save(clip_dir / f"frame_{frame_index:05d}.jpg", quality=90)
        records = [
            {
                "id": i,
                "video": f"clip_{i % num_videos:03d}/",
                "conversations": [
                    {"from": "human", "value": VIDEO_QUESTION},
                    {"from": "gpt", "value": VIDEO_SUMMARY},
                ],
            }
            for i in range(num_samples)
        ]
        (staging / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        meta = {
            "benchmark_videos": {
                "root": ".",
                "annotation": "train.jsonl",
                "data_augment": False,
                "repeat_time": 1,
                "length": num_samples,
            }
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return output_dir / "meta.json"


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs


@dataclass
class BatchCounts:
    """What the measured batches held, summed (one process)."""

    samples: int = 0
    tokens: int = 0  # non-padding tokens
    squared_lengths: int = 0  # sum of L^2 over samples (causal attention cost)
    supervised_tokens: int = 0  # positions whose next token is trained
    frames: int = 0  # real image tiles / video frames (image_flags == 1)

    def add(self, batch: dict) -> None:
        lengths = batch["attention_mask"].sum(dim=1).long().cpu()
        self.samples += int(lengths.numel())
        self.tokens += int(lengths.sum())
        self.squared_lengths += int((lengths**2).sum())
        self.supervised_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.frames += int(batch["image_flags"].sum()) if "image_flags" in batch else 0

    def __iadd__(self, other: BatchCounts) -> BatchCounts:
        for name in asdict(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


def llm_linear_parameters(llm_config) -> int:
    """Weights of the attention and MLP projections of all decoder layers (no embeddings, no LM head)."""
    hidden, inter = llm_config.hidden_size, llm_config.intermediate_size
    head_dim = getattr(llm_config, "head_dim", None) or hidden // llm_config.num_attention_heads
    q_width = llm_config.num_attention_heads * head_dim
    kv_width = llm_config.num_key_value_heads * head_dim
    per_layer = hidden * q_width + 2 * hidden * kv_width + q_width * hidden + 3 * hidden * inter
    return per_layer * llm_config.num_hidden_layers


def llm_lora_parameters(llm_config, rank: int) -> int:
    """LoRA A and B weights on q/k/v/o/gate/up/down: ``rank * (in + out)`` per projection."""
    hidden, inter = llm_config.hidden_size, llm_config.intermediate_size
    head_dim = getattr(llm_config, "head_dim", None) or hidden // llm_config.num_attention_heads
    q_width = llm_config.num_attention_heads * head_dim
    kv_width = llm_config.num_key_value_heads * head_dim
    per_layer = (hidden + q_width) * 2 + (hidden + kv_width) * 2 + (hidden + inter) * 3
    return rank * per_layer * llm_config.num_hidden_layers


def training_flops(config, counts: BatchCounts, *, lora_rank: int, recompute: bool) -> float:
    """Model FLOPs of one training pass over ``counts`` with a frozen base, LoRA on the LLM, frozen vision tower.

    - LLM projections (frozen): forward 2N per token, backward to the inputs 2N (no weight gradient), plus a
      second forward when activations are recomputed: 6N (4N without recomputation).
    - LoRA (trained): forward 2N, backward 4N, recomputation 2N: 8N (6N).
    - causal attention, per layer and sample of length L: forward 2 * width * L^2 (QK^T and AV over the lower
      triangle), backward twice that, plus the recomputed forward: 8 * width * L^2 (6 *).
    - LM head, only at supervised positions (the model computes no other logits): forward and backward to its
      input, 4 * vocab * hidden per position.
    - vision tower and projector (frozen, no gradient): forward only, 2N per patch token plus non-causal
      attention 4 * width * T^2 per layer and frame of T tokens.
    """
    llm = config.llm_config
    passes = 3 if recompute else 2
    head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
    attention_width = llm.num_attention_heads * head_dim
    per_token = 2 * passes * llm_linear_parameters(llm) + (2 * passes + 2) * llm_lora_parameters(llm, lora_rank)
    flops = counts.tokens * per_token
    flops += (2 * passes + 2) * attention_width * counts.squared_lengths * llm.num_hidden_layers
    flops += 4 * llm.vocab_size * llm.hidden_size * counts.supervised_tokens

    vision = config.vision_config
    vit_tokens = (config.image_size // vision.patch_size) ** 2 + 1
    vit_layer = 4 * vision.hidden_size**2 + 2 * vision.hidden_size * vision.intermediate_size  # qkv, proj, fc1, fc2
    vit_linear = vit_layer * vision.num_hidden_layers
    vit_attention = 4 * vision.hidden_size * vit_tokens**2 * vision.num_hidden_layers
    shuffled = vision.hidden_size * int(round(1 / config.downsample_ratio)) ** 2
    projector = 2 * (shuffled * llm.hidden_size + llm.hidden_size**2) * config.num_image_token
    flops += counts.frames * (2 * vit_linear * vit_tokens + vit_attention + projector)
    return float(flops)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring inside the training processes


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _TimedBatches:
    """Wraps the trainer's batch iterator: time spent waiting in ``next()``, and what the batches hold."""

    def __init__(self, iterator, meter: StepMeter):
        self.iterator, self.meter = iterator, meter

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.iterator)
        self.meter.data_wait += time.perf_counter() - start
        self.meter.counts.add(batch)
        return batch


@dataclass
class StepRecord:
    seconds: float
    data_wait_seconds: float
    counts: BatchCounts


@dataclass
class StepMeter:
    """Per optimizer step: wall time between step ends (GPU synchronised), batch wait, batch contents."""

    steps: list[StepRecord] = field(default_factory=list)
    data_wait: float = 0.0
    counts: BatchCounts = field(default_factory=BatchCounts)
    load_peak_bytes: int = 0
    _last: float | None = None

    def start(self) -> None:
        _synchronize()
        if torch.cuda.is_available():
            self.load_peak_bytes = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.data_wait, self.counts = 0.0, BatchCounts()
        self._last = time.perf_counter()

    def end_step(self) -> None:
        _synchronize()
        now = time.perf_counter()
        self.steps.append(StepRecord(now - self._last, self.data_wait, self.counts))
        self.data_wait, self.counts, self._last = 0.0, BatchCounts(), now


class _BenchmarkCallback(TrainerCallback):
    def __init__(self, trainer: BenchmarkTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.meter.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.meter.end_step()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.write_report(args, state)


class BenchmarkTrainer(InternVLTrainer):
    """The recipe's trainer, timing each optimizer step and writing a JSON report when training ends."""

    def __init__(
        self, *args, report_path: str, warmup_steps: int, peak_tflops: float, memory_cap_gib: float | None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.report_path = Path(report_path)
        self.warmup_steps = warmup_steps
        self.peak_tflops = peak_tflops
        self.memory_cap_gib = memory_cap_gib
        self.meter = StepMeter()
        self.add_callback(_BenchmarkCallback(self))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return super().get_batch_samples(_TimedBatches(epoch_iterator, self.meter), num_batches, device)

    def _process_summary(self) -> dict:
        measured = self.meter.steps[self.warmup_steps :]
        counts = BatchCounts()
        for step in measured:
            counts += step.counts
        summary = {
            "step_seconds": [step.seconds for step in self.meter.steps],
            "measured_seconds": sum(step.seconds for step in measured),
            "measured_data_wait_seconds": sum(step.data_wait_seconds for step in measured),
            "counts": asdict(counts),
            "bad_samples": self.train_dataset.bad_samples,
        }
        if torch.cuda.is_available():
            summary.update(
                device=torch.cuda.get_device_name(),
                peak_load_bytes=self.meter.load_peak_bytes,
                peak_train_bytes=torch.cuda.max_memory_allocated(),
                peak_train_reserved_bytes=torch.cuda.max_memory_reserved(),
            )
        return summary

    def write_report(self, args, state) -> None:
        """Gather every process's measurements; the main process writes the report (atomically)."""
        summary = self._process_summary()
        if dist.is_available() and dist.is_initialized():
            summaries = [None] * dist.get_world_size()
            dist.all_gather_object(summaries, summary)
        else:
            summaries = [summary]
        if args.process_index == 0:
            report = build_report(self, args, state, summaries)
            atomic_write_text(self.report_path, json.dumps(report, indent=2) + "\n")

    def describe_run(self, args) -> dict:
        model = self.model
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
            "steps": len(self.meter.steps),
            "warmup_steps": self.warmup_steps,
            "gpu_memory_cap_gib": self.memory_cap_gib,
            "cuda_alloc_conf": os.environ.get(CUDA_ALLOC_CONF_ENV),
            "peak_tflops_per_gpu": self.peak_tflops,
        }


def _is_checkpointing(llm) -> bool:
    # transformers >= 5.23 renamed the property (the old name warns).
    if hasattr(type(llm), "is_activation_checkpointing"):
        return bool(llm.is_activation_checkpointing)
    return bool(llm.is_gradient_checkpointing)


def build_report(trainer: BenchmarkTrainer, args, state, summaries: list[dict]) -> dict:
    """The JSON report: run settings, environment, and per-GPU / per-step figures over the measured steps."""
    run = trainer.describe_run(args)
    world = args.world_size
    counts = BatchCounts()
    for summary in summaries:
        counts += BatchCounts(**summary["counts"])
    main = summaries[0]
    measured_steps = len(main["step_seconds"]) - trainer.warmup_steps
    seconds = main["measured_seconds"]
    if measured_steps < 1 or seconds <= 0:
        raise ValueError(f"no measured steps: {len(main['step_seconds'])} steps ran, {trainer.warmup_steps} warm-up")
    flops = training_flops(
        trainer.model.config, counts, lora_rank=run["lora_rank"] or 0, recompute=run["gradient_checkpointing"]
    )
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
    return {"status": status, "run": run, "environment": environment(main.get("device")), "results": results}


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


def cap_gpu_memory(cap_gib: float) -> None:
    """Limit this process's PyTorch allocations on its GPU to ``cap_gib`` (CUDA context and NCCL buffers come on
    top), to stand in for a smaller card."""
    device = int(os.environ.get("LOCAL_RANK", "0"))
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gib * GIB > total:
        raise ValueError(f"--gpu-memory-cap-gb {cap_gib} is more than GPU {device} holds ({total / GIB:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total, device)


def worker_main(argv: list[str] | None = None) -> None:
    """Entry point of each ``torchrun`` process: ``--report R.json [options] -- RECIPE ARGS``."""
    from internvl.train import internvl_chat_finetune

    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description="One benchmark training process (started by torchrun).")
    parser.add_argument("--report", required=True)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS)
    parser.add_argument("--gpu-memory-cap-gb", type=float, default=None)
    options = parser.parse_args(argv[:split])
    if options.gpu_memory_cap_gb and torch.cuda.is_available():
        cap_gpu_memory(options.gpu_memory_cap_gb)
    trainer_class = functools.partial(
        BenchmarkTrainer,
        report_path=options.report,
        warmup_steps=options.warmup_steps,
        peak_tflops=options.peak_tflops,
        memory_cap_gib=options.gpu_memory_cap_gb,
    )
    internvl_chat_finetune.main(argv[split + 1 :], trainer_class=trainer_class)


# ---------------------------------------------------------------------------------------------------------------------
# Launching


@dataclass
class BenchmarkSettings:
    deepspeed: str = "zero_stage3_config.json"
    nproc_per_node: int | None = None  # default: the visible GPUs (2 CPU processes without GPUs)
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    frames: int = 16
    max_seq_length: int = 8192
    steps: int = 2  # measured optimizer steps
    warmup_steps: int = 1
    load_in_4bit: bool = True
    lora_rank: int = 32
    gpu_memory_cap_gb: float | None = None
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    model_config: str = str(DEFAULT_MODEL_CONFIG)
    work_dir: str = "work_dirs/benchmark"
    name: str = "run"
    recipe_args: list[str] = field(default_factory=list)  # appended to the recipe's flags (they win)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def benchmark_command(settings: BenchmarkSettings, checkpoint: Path, meta_path: Path, report: Path):
    """``(command, environment, plan)``: the launcher's plan for these settings (the guide's flags, then the
    benchmark's overrides, then ``recipe_args``), started with this module as the entry point."""
    gpus = visible_gpu_count()
    nproc = settings.nproc_per_node or gpus or int(LAUNCH_DEFAULTS["CPU_PROCESSES"])
    env = {
        "GPUS": str(nproc),
        "PER_DEVICE_BATCH_SIZE": str(settings.per_device_batch_size),
        "BATCH_SIZE": str(settings.per_device_batch_size * settings.gradient_accumulation_steps * nproc),
        "MODEL_PATH": str(checkpoint),
        "META_PATH": str(meta_path),
        "OUTPUT_DIR": str(Path(settings.work_dir) / "runs" / settings.name),
        "LORA_RANK": str(settings.lora_rank),
        "DEEPSPEED_CONFIG": settings.deepspeed,
        "MASTER_PORT": str(_free_port()),
    }
    if CUDA_ALLOC_CONF_ENV in os.environ:  # the caller's allocator settings win over the launcher's default
        env[CUDA_ALLOC_CONF_ENV] = os.environ[CUDA_ALLOC_CONF_ENV]
    total_steps = settings.warmup_steps + settings.steps
    overrides = [
        "--max_steps", str(total_steps),
        "--logging_steps", str(total_steps),  # one log, after the last timed step
        "--save_strategy", "no",
        "--report_to", "none",
        "--overwrite_output_dir", "True",
        "--min_num_frame", str(settings.frames),
        "--max_num_frame", str(settings.frames),
        "--max_seq_length", str(settings.max_seq_length),
        "--load_in_4bit", str(settings.load_in_4bit),
    ]  # fmt: skip
    plan = resolve_plan(env, overrides + list(settings.recipe_args), gpus)
    worker = [
        "--report", str(report),
        "--warmup-steps", str(settings.warmup_steps),
        "--peak-tflops", str(settings.peak_tflops),
    ]  # fmt: skip
    if settings.gpu_memory_cap_gb:
        worker += ["--gpu-memory-cap-gb", str(settings.gpu_memory_cap_gb)]
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--node_rank", "0", "--master_addr", plan.master_addr,
        "--nproc_per_node", str(plan.nproc_per_node), "--master_port", str(plan.master_port),
        "-m", __name__, *worker, "--", *plan.train_args,
    ]  # fmt: skip
    return command, {**plan.env, "PYTHONUNBUFFERED": "1"}, plan


def run_benchmark(settings: BenchmarkSettings, log=print) -> dict:
    """Prepare the inputs, run the recipe under torchrun and return the report. ``status`` is "ok", or
    "bad_samples" (some samples could not be built, so the figures do not describe the requested shape), "oom" or
    "failed" (with the end of the log)."""
    work_dir = Path(settings.work_dir)
    runs_dir = work_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    report_path = runs_dir / f"{settings.name}.{REPORT_NAME}"
    report_path.unlink(missing_ok=True)
    log_path = runs_dir / f"{settings.name}.log"
    checkpoint = prepare_checkpoint(settings.model_config, work_dir)
    meta_path = work_dir / f"videos-{settings.name}" / "meta.json"
    command, env, plan = benchmark_command(settings, checkpoint, meta_path, report_path)
    prepare_videos(
        meta_path.parent,
        num_frames=settings.frames,
        num_samples=(settings.warmup_steps + settings.steps) * plan.batch_size,
    )
    log(" ".join(command))
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            for line in process.stdout:
                log_file.write(line)
                log(line.rstrip("\n"))
            returncode = process.wait()
        finally:
            if process.poll() is None:  # interrupted: torchrun stops its workers on SIGTERM
                process.terminate()
                process.wait()
    if returncode == 0 and report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        return {**report, "settings": asdict(settings)}
    tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-60:]
    out_of_memory = any("OutOfMemoryError" in line or "CUDA out of memory" in line for line in tail)
    return {
        "status": "oom" if out_of_memory else "failed",
        "returncode": returncode,
        "settings": asdict(settings),
        "log": str(log_path),
        "log_tail": tail,
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
    return line


if __name__ == "__main__":
    worker_main()
