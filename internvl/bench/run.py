"""Running a training benchmark: settings, the ``torchrun`` command and the run itself.

``run_benchmark`` writes what a run needs into a work folder (``internvl.bench.inputs``), then starts the recipe
under ``torchrun`` exactly as ``scripts/finetune_internvl3_8b_4bit_lora.sh`` does (the launcher's plan: same
flags, same ``main()``, same Trainer and DeepSpeed config), with ``internvl.bench.worker`` as each process's entry
point, and returns the report the main process wrote. With ``profile``, one more step runs under ``torch.profiler``
(not measured): its trace and its tables (``internvl.bench.profiling``) are written beside the report.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from internvl.bench import worker
from internvl.bench.flops import DEFAULT_PEAK_TFLOPS
from internvl.bench.inputs import prepare_checkpoint, prepare_videos
from internvl.bench.profiling import profile_markdown
from internvl.constants import INTERNVL3_8B_CONFIG
from internvl.data.files import atomic_write_text
from internvl.model.loading import load_tokenizer
from internvl.train.launch import CUDA_ALLOC_CONF_ENV, resolve_plan, visible_gpu_count
from internvl.train.launch import DEFAULTS as LAUNCH_DEFAULTS

DEFAULT_MODEL_CONFIG = INTERNVL3_8B_CONFIG
REPORT_NAME = "report.json"


@dataclass
class BenchmarkSettings:
    deepspeed: str = "zero_stage3_config.json"
    nproc_per_node: int | None = None  # default: the visible GPUs (2 CPU processes without GPUs)
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    frames: int = 16
    summary_tokens: tuple[int, int] | None = None  # (fewest, most) summary tokens; default: one fixed summary
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
    profile: bool = False  # one more step, under torch.profiler
    recipe_args: list[str] = field(default_factory=list)  # appended to the recipe's flags (they win)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps + (1 if self.profile else 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_module_command(plan, module: str, module_args: list[str]) -> list[str]:
    """``torchrun`` on this machine for the launcher's ``plan``, with ``python -m module`` as each process's entry
    point: its own options, then the recipe's flags after ``--``."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--node_rank", "0", "--master_addr", plan.master_addr,
        "--nproc_per_node", str(plan.nproc_per_node), "--master_port", str(plan.master_port),
        "-m", module, *module_args, "--", *plan.train_args,
    ]  # fmt: skip


def trace_path(report: Path) -> Path:
    """The profile trace of the run whose report is ``report``."""
    return report.with_name(report.name.removesuffix(REPORT_NAME) + "trace.json.gz")


def process_count(requested: int | None) -> int:
    """Processes per run: as requested, else the visible GPUs, else the launcher's CPU processes."""
    return requested or visible_gpu_count() or int(LAUNCH_DEFAULTS["CPU_PROCESSES"])


def launcher_env(nproc: int, per_device_batch_size: int, gradient_accumulation_steps: int, **paths) -> dict[str, str]:
    """The launcher's variables (``internvl.train.launch``) for one node of ``nproc`` processes on a free port;
    ``paths``: model_path, meta_path, output_dir, deepspeed_config and any other variable, by lower-case name."""
    return {
        "GPUS": str(nproc),
        "PER_DEVICE_BATCH_SIZE": str(per_device_batch_size),
        "BATCH_SIZE": str(per_device_batch_size * gradient_accumulation_steps * nproc),
        "MASTER_PORT": str(free_port()),
        **{name.upper(): str(value) for name, value in paths.items()},
    }


def benchmark_command(settings: BenchmarkSettings, checkpoint: Path, meta_path: Path, report: Path):
    """``(command, environment, plan)``: the launcher's plan for these settings (the guide's flags, then the
    benchmark's overrides, then ``recipe_args``), started with the benchmark worker as the entry point."""
    gpus = visible_gpu_count()
    env = launcher_env(
        process_count(settings.nproc_per_node), settings.per_device_batch_size, settings.gradient_accumulation_steps,
        model_path=checkpoint, meta_path=meta_path, output_dir=Path(settings.work_dir) / "runs" / settings.name,
        lora_rank=settings.lora_rank, deepspeed_config=settings.deepspeed,
    )  # fmt: skip
    if CUDA_ALLOC_CONF_ENV in os.environ:  # the caller's allocator settings win over the launcher's default
        env[CUDA_ALLOC_CONF_ENV] = os.environ[CUDA_ALLOC_CONF_ENV]
    total_steps = settings.total_steps
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
    options = worker.worker_options(
        str(report),
        warmup_steps=settings.warmup_steps,
        peak_tflops=settings.peak_tflops,
        gpu_memory_cap_gb=settings.gpu_memory_cap_gb,
        profile_trace=str(trace_path(report)) if settings.profile else None,
    )
    command = torchrun_module_command(plan, worker.__name__, options)
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
        num_samples=settings.total_steps * plan.batch_size,
        summary_tokens=settings.summary_tokens,
        tokenizer=load_tokenizer(checkpoint) if settings.summary_tokens else None,
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
        if "profile" in report:
            table = runs_dir / f"{settings.name}.profile.md"
            atomic_write_text(table, profile_markdown(report["profile"], settings.name))
            report["profile"]["table"] = str(table)
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
