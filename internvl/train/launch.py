"""Turn the launcher's environment variables into a ``torchrun`` command, and run it.

The shell launchers (``scripts/finetune_internvl3_8b_4bit_lora.sh``, the quick start and the SLURM script) are
thin wrappers around this module, so the batch arithmetic and the defaults are tested here:

    GPUS                   processes per node (default: the visible GPUs, or 2 CPU processes without GPUs)
    NNODES, NODE_RANK      multi-node layout (default 1 and 0; SLURM_NNODES / SLURM_NODEID under SLURM)
    MASTER_ADDR, MASTER_PORT  rendezvous of node 0 (default 127.0.0.1:34229; on one node, another free port when
                           34229 is taken and MASTER_PORT is not set)
    PER_DEVICE_BATCH_SIZE  micro-batch per process (default 4)
    BATCH_SIZE             samples per optimizer step over all processes (default 32); gradient accumulation
                           = BATCH_SIZE / (PER_DEVICE_BATCH_SIZE x GPUS x NNODES) and must be a whole number
    MODEL_PATH, META_PATH, OUTPUT_DIR, LORA_RANK, LR, EPOCHS, DEEPSPEED_CONFIG
    PYTORCH_CUDA_ALLOC_CONF  PyTorch's CUDA allocator settings (default on GPUs: ``expandable_segments:True``)
    TORCH_CUDA_ARCH_LIST   kept, except that forms DeepSpeed cannot parse (``9.0a``) become ones it can (``9.0``)

Arguments after the environment (``"$@"`` of the shell scripts) are appended to the training command, so they
override the defaults. Without GPUs the run uses DeepSpeed's CPU accelerator (gloo) and ``--use_cpu True``.

Before ``torchrun`` starts, the training arguments are parsed as training parses them and checked by
``internvl.train.run_guard.preflight`` (paths, output folder, resume compatibility, a run already using the
output folder): a problem is one line and exit code 1, before any model is loaded. ``torchrun`` runs in this
process, so a failed run ends with one line naming the process that failed, not a traceback of ``torchrun``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from internvl.data.dataset import has_eval_records

FINETUNE_SCRIPT = Path(__file__).with_name("internvl_chat_finetune.py")
# The training process records the command that started it (``command.txt``) from this variable.
LAUNCH_COMMAND_ENV = "INTERNVL_LAUNCH_COMMAND"
# Growable allocator segments: with fixed ones, the varying activation sizes of checkpointed video batches made the
# guide's default cache 25.1 GiB per GPU for a 15.6 GiB peak; growable ones cached 21.4 GiB and stepped 9% faster
# (docs/BENCHMARKS.md). A value the user sets is kept.
CUDA_ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
DEFAULT_CUDA_ALLOC_CONF = "expandable_segments:True"
CUDA_ARCH_LIST_ENV = "TORCH_CUDA_ARCH_LIST"
# The forms DeepSpeed's op builder parses: MAJOR.MINOR, optionally +PTX; PyTorch also takes an architecture-specific
# suffix ("9.0a", "10.0f"), which it cannot.
_ARCH_TOKEN = re.compile(r"(\d+)\.(\d+)[a-z]?(\+PTX)?")

DEFAULTS = {
    "PER_DEVICE_BATCH_SIZE": "4",
    "BATCH_SIZE": "32",
    "MODEL_PATH": "models/InternVL3-8B",
    "META_PATH": "internvl3_data/meta.json",
    "OUTPUT_DIR": "work_dirs/internvl3_8b_4bit_lora",
    "LORA_RANK": "32",
    "LR": "2e-5",
    "EPOCHS": "3",
    "DEEPSPEED_CONFIG": "zero_stage3_config.json",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "34229",
    "CPU_PROCESSES": "2",
}


@dataclass
class LaunchPlan:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    batch_size: int
    use_cpu: bool
    train_args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the launcher changed in the environment, and why

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def command(self, python: str = sys.executable) -> list[str]:
        return [
            python, "-m", "torch.distributed.run",
            "--nnodes", str(self.nnodes),
            "--node_rank", str(self.node_rank),
            "--master_addr", self.master_addr,
            "--nproc_per_node", str(self.nproc_per_node),
            "--master_port", str(self.master_port),
            str(FINETUNE_SCRIPT), *self.train_args,
        ]  # fmt: skip

    def summary(self) -> str:
        device = "CPU processes" if self.use_cpu else "GPUs"
        return (
            f"{self.nnodes} node(s) x {self.nproc_per_node} {device} x per-device batch {self.per_device_batch_size}"
            f" x gradient accumulation {self.gradient_accumulation_steps} = batch {self.batch_size} per step"
        )


def _positive_int(env: Mapping[str, str], name: str, default: str | None = None, minimum: int = 1) -> int:
    raw = env.get(name) or default or DEFAULTS[name]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number.") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}.")
    return value


def resolve_plan(env: Mapping[str, str], extra_args: list[str], visible_gpus: int) -> LaunchPlan:
    use_cpu = visible_gpus == 0
    gpus_default = env.get("SLURM_GPUS_ON_NODE") or str(visible_gpus or DEFAULTS["CPU_PROCESSES"])
    nproc = _positive_int(env, "GPUS", gpus_default)
    nnodes = _positive_int(env, "NNODES", env.get("SLURM_NNODES") or "1")
    node_rank = _positive_int(env, "NODE_RANK", env.get("SLURM_NODEID") or "0", minimum=0)
    if node_rank >= nnodes:
        raise ValueError(f"NODE_RANK={node_rank} must be smaller than NNODES={nnodes}.")
    per_device = _positive_int(env, "PER_DEVICE_BATCH_SIZE")
    batch_size = _positive_int(env, "BATCH_SIZE")
    per_step = per_device * nproc * nnodes
    if batch_size % per_step:
        raise ValueError(
            f"BATCH_SIZE={batch_size} is not a multiple of PER_DEVICE_BATCH_SIZE x GPUS x NNODES = "
            f"{per_device} x {nproc} x {nnodes} = {per_step}; change one of them."
        )
    grad_accum = batch_size // per_step

    meta_path = env.get("META_PATH") or DEFAULTS["META_PATH"]
    train_args = [
        "--model_name_or_path", env.get("MODEL_PATH") or DEFAULTS["MODEL_PATH"],
        "--conv_style", "internvl2_5",
        "--use_fast_tokenizer", "False",
        "--output_dir", env.get("OUTPUT_DIR") or DEFAULTS["OUTPUT_DIR"],
        "--meta_path", meta_path,
        "--force_image_size", "448",
        "--max_dynamic_patch", "12",
        "--down_sample_ratio", "0.5",
        "--drop_path_rate", "0.0",
        "--freeze_llm", "True",
        "--freeze_mlp", "True",
        "--freeze_backbone", "True",
        "--use_llm_lora", str(_positive_int(env, "LORA_RANK")),
        "--vision_select_layer", "-1",
        "--bf16", "True",
        "--num_train_epochs", env.get("EPOCHS") or DEFAULTS["EPOCHS"],
        "--per_device_train_batch_size", str(per_device),
        "--gradient_accumulation_steps", str(grad_accum),
        "--save_strategy", "steps",
        "--save_steps", "200",
        "--save_total_limit", "2",
        "--learning_rate", env.get("LR") or DEFAULTS["LR"],
        "--weight_decay", "0.05",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "10",
        "--max_seq_length", "8192",
        "--do_train", "True",
        "--grad_checkpoint", "True",
        "--group_by_length", "True",
        "--dynamic_image_size", "True",
        "--use_thumbnail", "True",
        "--ps_version", "v2",
        "--deepspeed", env.get("DEEPSPEED_CONFIG") or DEFAULTS["DEEPSPEED_CONFIG"],
        "--report_to", "tensorboard",
    ]  # fmt: skip
    if has_eval_records(meta_path):
        train_args += ["--do_eval", "True", "--eval_strategy", "steps", "--eval_steps", "100"]
    launch_env, notes = {}, []
    if use_cpu:
        train_args += ["--use_cpu", "True"]
        launch_env["DS_ACCELERATOR"] = "cpu"
    else:
        if CUDA_ALLOC_CONF_ENV not in env:
            launch_env[CUDA_ALLOC_CONF_ENV] = DEFAULT_CUDA_ALLOC_CONF
        arch_list = deepspeed_compatible_arch_list(env)
        if arch_list:
            launch_env[CUDA_ARCH_LIST_ENV], note = arch_list
            notes.append(note)
    return LaunchPlan(
        nnodes=nnodes,
        node_rank=node_rank,
        nproc_per_node=nproc,
        master_addr=env.get("MASTER_ADDR") or DEFAULTS["MASTER_ADDR"],
        master_port=_positive_int(env, "MASTER_PORT"),
        per_device_batch_size=per_device,
        gradient_accumulation_steps=grad_accum,
        batch_size=batch_size,
        use_cpu=use_cpu,
        train_args=train_args + list(extra_args),
        env=launch_env,
        notes=notes,
    )


def port_is_free(port: int) -> bool:
    """Whether a server can listen on ``port`` here (as torchrun's rendezvous store on node 0 does)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def choose_master_port(env: Mapping[str, str], nnodes: int, node_rank: int,
                       default: int = int(DEFAULTS["MASTER_PORT"])) -> tuple[int, str | None]:
    """The rendezvous port and a note when it is not the one asked for. Only node 0 listens, so only there can
    the port be checked; a single-node run without ``MASTER_PORT`` moves to a free port instead of failing."""
    port = _positive_int(env, "MASTER_PORT", str(default))
    if node_rank != 0 or port_is_free(port):
        return port, None
    if env.get("MASTER_PORT") or nnodes > 1:
        raise ValueError(f"MASTER_PORT={port} is in use on this machine (another training run?); set MASTER_PORT "
                         "to a free port")
    with socket.socket() as probe:
        probe.bind(("", 0))
        free = probe.getsockname()[1]
    return free, f"Port {port} is in use (another training run?): using port {free} (MASTER_PORT sets it)."


def check_before_launch(plan: LaunchPlan) -> list[str]:
    """Parse the training arguments as training does and run its pre-flight checks; ``ValueError`` / ``OSError``
    with one line for the first problem. Returns the warnings to print."""
    from internvl.train.internvl_chat_finetune import check_arguments
    from internvl.train.run_guard import parse_args_for_checks, preflight, refuse_if_in_use

    model_args, data_args, training_args = parse_args_for_checks(plan.train_args)
    check_arguments(model_args, training_args)
    _, warnings = preflight(model_args, data_args, training_args, plan.world_size)
    if training_args.do_train and plan.node_rank == 0:  # the other nodes see node 0's run holding it
        refuse_if_in_use(training_args.output_dir)
    return warnings


def run_torchrun(plan: LaunchPlan) -> None:
    """``torchrun`` with the plan's command, in this process; a failed process ends the launcher with one line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args
    from torch.distributed.run import run

    try:
        run(torchrun_args(plan.command()[3:]))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        how = (f"was killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        sys.exit(f"error: training stopped: process {rank} {how} (its message is above)")
    except SignalException as stop:
        sys.exit(f"training stopped by {stop.sigval.name}")


def zero3_speed_note(plan: LaunchPlan) -> str | None:
    """On GPUs, what a ZeRO-3 config costs against ZeRO-2 for this recipe (measured in docs/BENCHMARKS.md), and how
    to switch; None for other stages, CPU runs and configs that cannot be read (training then reports them)."""
    from internvl.train.arguments import resolve_deepspeed_config

    if plan.use_cpu:
        return None
    try:
        path = resolve_deepspeed_config(flag_values(plan.train_args).get("deepspeed"))
        with open(path, encoding="utf-8") as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if stage != 3:
        return None
    return (
        "Note: with this 4-bit model ZeRO-3 trains about 12% slower than ZeRO-2 for about the same GPU memory "
        "(2 x H200, docs/BENCHMARKS.md): the frozen 4-bit weights are small, so partitioning them saves little. "
        "For speed: DEEPSPEED_CONFIG=zero_stage2_config.json."
    )


def flag_values(args: Sequence[str]) -> dict[str, str]:
    """``--name value`` / ``--name=value`` pairs (the last occurrence wins, as in argparse); a bare flag is True."""
    values, i = {}, 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            i += 1
            continue
        name, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "True"
        values[name] = value
        i += 1
    return values


def deepspeed_compatible_arch_list(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The ``TORCH_CUDA_ARCH_LIST`` value DeepSpeed's JIT op builds can use, and a line saying what changed; None
    when the value (or its absence) already works.

    DeepSpeed 0.19 reads each entry as ``MAJOR.MINOR[+PTX]`` and crashes on the architecture-specific forms that CUDA
    images for Hopper and Blackwell set (``9.0a``: "invalid literal for int() with base 10: '0a'"), before building
    FusedAdam (ZeRO-2) or CPU Adam (offload). Its kernels use no architecture-specific instructions, so the plain
    entry (``9.0``) builds the same code. A value with entries neither tool form covers (named architectures such
    as ``Hopper``) is emptied, so DeepSpeed builds for the visible GPUs."""
    value = environ.get(CUDA_ARCH_LIST_ENV)
    if value is None:
        return None
    entries = value.replace(";", " ").split()
    matches = [_ARCH_TOKEN.fullmatch(entry) for entry in entries]
    if not all(matches):
        fixed = ""
    else:
        fixed = ";".join(dict.fromkeys(f"{m[1]}.{m[2]}{m[3] or ''}" for m in matches))
    if fixed == ";".join(entries):
        return None
    if fixed:
        return fixed, f"{CUDA_ARCH_LIST_ENV}={value!r} set to {fixed!r} for DeepSpeed's op builds, which cannot parse it"
    return "", (f"{CUDA_ARCH_LIST_ENV}={value!r} emptied for DeepSpeed's op builds, which cannot parse it: they "
                "build for the visible GPUs")


def visible_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Launch QLoRA fine-tuning with torchrun from environment variables (see module docstring).",
        usage="%(prog)s [--dry-run] [TRAINING ARGS...]",
        allow_abbrev=False,
    )
    parser.add_argument("--dry-run", action="store_true", help="Print the command instead of running it.")
    args, extra = parser.parse_known_args(argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    try:
        plan = resolve_plan(os.environ, extra, visible_gpu_count())
        port_note = None
        if not args.dry_run:
            plan.master_port, port_note = choose_master_port(os.environ, plan.nnodes, plan.node_rank)
    except ValueError as error:
        sys.exit(f"error: {error}")
    command = plan.command()
    printable = " ".join([*(f"{k}={v}" for k, v in plan.env.items()), shlex.join(command)])
    print(plan.summary(), flush=True)
    for note in [*plan.notes, port_note, zero3_speed_note(plan)]:
        if note:
            print(note, flush=True)
    print(printable, flush=True)
    if args.dry_run:
        return
    try:
        warnings = check_before_launch(plan)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    for warning in warnings:
        print(f"Warning: {warning}", flush=True)
    os.environ.update({**plan.env, LAUNCH_COMMAND_ENV: printable})
    run_torchrun(plan)


if __name__ == "__main__":
    main()
