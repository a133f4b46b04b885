"""What only several processes show, checked through the recipe itself: the launcher's plan, ``torchrun`` with N
processes, the recipe's ``main()`` and Trainer, 4-bit + LoRA, DeepSpeed ZeRO-3 with CPU offload.

    python -m internvl.bench.distributed_checks --nproc-per-node 2 --model-config tiny --output checks.json

Three runs of the same seed, each process started as ``internvl.bench.distributed_worker`` (the recipe's own
``main()`` with a trainer that records what each process saw):

1. **uninterrupted**: ``--steps`` optimizer steps over two epochs, a checkpoint after every step. It answers
   (a) *collectives*: every process's group has the backend it must have (NCCL between GPUs, gloo between CPU
   processes), and all-reduce, all-gather, reduce-scatter and broadcast give the right values on the training
   device (with the bus bandwidth of a large all-gather and reduce-scatter beside them);
   *epochs*: over all processes, every epoch trains each sample once; and
   (b) *adapter*: the adapter the recipe saved (at the end and in the last checkpoint) equals DeepSpeed's fp32
   master copy of the LoRA weights, consolidated from the ZeRO-3 checkpoint by DeepSpeed's own ``zero_to_fp32``,
   after the bf16 cast the save applies, bit for bit: the save copies the bf16 weights DeepSpeed derives from its
   fp32 partitions by that same cast, so any difference means the save is not what was trained. The DeepSpeed
   config is the shipped one with ``stage3_param_persistence_threshold`` 0 (``--persistence-threshold``), so that
   ZeRO-3 partitions every parameter, LoRA's included: the shipped threshold (1e7) keeps the LoRA weights whole on
   every process, and a save from an un-gathered partition would go unnoticed there.
2. **killed**: the same run, with one non-zero rank (``--kill-rank``) sent SIGKILL once checkpoint
   ``--kill-after-step`` is complete (by default inside the second epoch). (c) *kill*: ``torchrun`` must end the whole job within ``--exit-timeout``
   seconds (no hang), exit non-zero, name the killed rank and the signal in its failure summary, and leave no
   process of the job behind.
3. **resumed**: the same command in the killed run's folder, which resumes from its last complete checkpoint.
   (c) *resume*: every micro-batch of every rank (before the kill from run 2, after the resume from run 3) saw
   the same inputs as in run 1 (SHA-256 fingerprints: skipped or repeated data fails here, on any device), no
   step ran twice or was left out, and the per-micro-batch losses and the final adapter and fp32 weights equal
   run 1's within ``RESUME_TOLERANCE``.

The samples are built so that their content depends on their index alone (one frame per video segment, no
random frame draw) and differs between any two (summaries of different lengths), so a resumed run can repeat the
uninterrupted one and the fingerprints tell every sample apart. The report (JSON) holds every
check's figures and ``status`` "ok" or "failed"; the command exits with 1 unless it is "ok".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from internvl.bench import distributed_worker
from internvl.bench.inputs import TINY_MODEL, prepare_checkpoint, prepare_videos
from internvl.bench.run import launcher_env, process_count, torchrun_module_command
from internvl.data.files import atomic_write_text
from internvl.model.loading import load_tokenizer
from internvl.train.arguments import resolve_deepspeed_config
from internvl.train.checkpoint import TRAINER_STATE_NAME
from internvl.train.launch import resolve_plan, visible_gpu_count

ADAPTER_FILE = "adapter_model.safetensors"
RESUMED_AT = re.compile(r"resuming at step (\d+)")
# torchrun's failure summary (torch.distributed.elastic): one block per failed process.
FAILURE_BLOCK = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
LEFTOVER_GRACE_S = 15  # DataLoader workers notice their parent is gone within 5 s (PyTorch's status check)


@dataclass(frozen=True)
class Tolerance:
    loss_rtol: float  # per micro-batch loss, relative
    weight_rel: float  # |resumed - uninterrupted| / |uninterrupted| of the trained lora_B weights (zero at start)


# Not bit for bit, even on a CPU, where two runs of the same seed are (the steps before the kill show it):
# ZeRO-Offload's CPU Adam keeps beta^t as a running product while it runs, and recomputes it with pow() when a
# checkpoint is loaded (DeepSpeed's csrc/includes/cpu_adam.h, IncrementStep). The bias corrections then differ in
# their last bit, the first update after the resume by 1 fp32 ulp in some weights, a few bf16 weights round the
# other way, and the later gradients differ by about 1e-4: measured on the CPU, losses 2e-5 apart (relative) and
# lora_B 6e-4 apart after 2 steps. Skipped or repeated data shows in the inputs, which are compared exactly (and
# moved losses by 10-18%, lora_B by 1.3-2.6% a step later on the CPU). On GPUs some kernels also accumulate with
# atomics (attention's backward pass), so runs of the same seed already drift apart.
RESUME_TOLERANCE = {"cpu": Tolerance(loss_rtol=1e-4, weight_rel=1e-2), "cuda": Tolerance(loss_rtol=1e-3, weight_rel=3e-2)}


@dataclass
class CheckSettings:
    nproc_per_node: int | None = None  # default: the visible GPUs (2 CPU processes without GPUs)
    model_config: str = TINY_MODEL  # "tiny" or a config.json (configs/internvl3_8b_config.json: the 8B shape)
    work_dir: str = "work_dirs/benchmark"  # shares the benchmark's checkpoints
    deepspeed: str = "zero_stage3_config.json"
    persistence_threshold: float | None = 0  # None: the config's own
    steps: int = 4  # two epochs of steps // 2 steps each
    kill_after_step: int = 3  # the resume then starts inside the second epoch
    kill_rank: int | None = None  # default: the last rank
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 2
    frames: int = 2
    lora_rank: int = 32
    learning_rate: float = 2e-3  # the tiny model's adapter moves visibly within a few steps
    loader_workers: int | None = None  # default: the recipe's
    resume: bool = True  # runs 2 and 3
    exit_timeout_s: float = 120.0
    run_timeout_s: float = 900.0  # the first DeepSpeed run on a machine JIT-compiles its CPU ops
    recipe_args: list[str] = field(default_factory=list)


def check_dir(settings: CheckSettings) -> Path:
    """The checks' own folder in the work folder (which may hold a benchmark's checkpoint and runs too)."""
    return Path(settings.work_dir) / "distributed_checks"


class CheckError(RuntimeError):
    """A run did not get as far as its check needs (it failed, or ended before it could be killed)."""


# ---------------------------------------------------------------------------------------------------------------
# Runs


def _log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


@dataclass
class Launch:
    name: str
    output_dir: Path
    record_dir: Path
    log_path: Path
    command: list[str]
    env: dict[str, str]

    def start(self) -> subprocess.Popen:
        self.record_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "w", encoding="utf-8")
        try:
            return subprocess.Popen(
                self.command, env={**os.environ, **self.env}, stdout=log_file, stderr=subprocess.STDOUT
            )
        finally:
            log_file.close()

    def run(self, timeout_s: float) -> float:
        """Run to the end; returns the seconds it took."""
        start = time.monotonic()
        process = self.start()
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise CheckError(f"run '{self.name}' did not end within {timeout_s:.0f} s:\n{_log_tail(self.log_path)}")
        finally:
            if process.poll() is None:  # timed out, or interrupted
                _kill_tree(process)
        if returncode != 0:
            raise CheckError(f"run '{self.name}' failed (exit {returncode}):\n{_log_tail(self.log_path)}")
        return time.monotonic() - start


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process under it (each worker runs in a session of its own, so killing
    torchrun's process group would leave them running)."""
    for _ in range(2):  # a second pass for any process started while the first one killed
        for pid in process_tree(process.pid) or [process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    process.wait()


def check_deepspeed_config(settings: CheckSettings, target: Path) -> Path:
    """The DeepSpeed config of the runs: the named one, with the persistence threshold set (module docstring)."""
    config = json.loads(Path(resolve_deepspeed_config(settings.deepspeed)).read_text(encoding="utf-8"))
    zero = config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError(f"{settings.deepspeed} is not a ZeRO-3 config; the checks are about ZeRO-3's partitions.")
    if settings.persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = settings.persistence_threshold
    atomic_write_text(target, json.dumps(config, indent=2) + "\n")
    return target


def plan_launch(settings: CheckSettings, name: str, checkpoint: Path, meta: Path, ds_config: Path, *,
                fresh: bool, output_name: str | None = None) -> Launch:  # fmt: skip
    """The launcher's plan for the check runs (the guide's flags, then the check's), under torchrun with the
    distributed worker as each process's entry point."""
    runs = check_dir(settings) / "runs"
    output_dir = runs / (output_name or name)
    record_dir = runs / f"{name}.records"
    env = launcher_env(
        process_count(settings.nproc_per_node), settings.per_device_batch_size, settings.gradient_accumulation_steps,
        model_path=checkpoint, meta_path=meta, output_dir=output_dir, lora_rank=settings.lora_rank,
        lr=settings.learning_rate, deepspeed_config=ds_config,
    )  # fmt: skip
    overrides = [
        "--max_steps", str(settings.steps),
        "--save_steps", "1",
        "--logging_steps", "1",
        "--report_to", "none",
        "--min_num_frame", str(settings.frames),
        "--max_num_frame", str(settings.frames),
    ]  # fmt: skip
    if settings.loader_workers is not None:
        overrides += ["--dataloader_num_workers", str(settings.loader_workers)]
    if fresh:
        overrides += ["--overwrite_output_dir", "True"]
    plan = resolve_plan(env, overrides + list(settings.recipe_args), visible_gpu_count())
    command = torchrun_module_command(plan, distributed_worker.__name__, ["--record-dir", str(record_dir)])
    return Launch(name, output_dir, record_dir, runs / f"{name}.log", command, {**plan.env, "PYTHONUNBUFFERED": "1"})


# ---------------------------------------------------------------------------------------------------------------
# (a) collectives


def check_collectives(record_dir: Path, world_size: int) -> dict:
    """Every rank's report of run 1: right backend, right values; and whether ZeRO-3 partitioned the LoRA weights."""
    reports = []
    for rank in range(world_size):
        path = distributed_worker.collectives_path(record_dir, rank)
        reports.append(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None)
    present = [r for r in reports if r is not None]
    problems = [f"rank {rank} wrote no report" for rank, r in enumerate(reports) if r is None]
    for r in present:
        if r["world_size"] != world_size:
            problems.append(f"rank {r['rank']} sees a world of {r['world_size']} processes, not {world_size}")
        if r["backend"] != r["expected_backend"]:
            problems.append(f"rank {r['rank']} on {r['device']} has backend {r['backend']}, not {r['expected_backend']}")
        problems += [f"rank {r['rank']}: {name} gave a wrong result" for name, ok in r["values"].items() if not ok]
    held = [r["trainable"]["held_elements"] for r in present]
    full = present[0]["trainable"]["full_elements"] if present else 0
    return {
        "ok": not problems,
        "problems": problems,
        "backends": sorted({r["backend"] for r in present}),
        "devices": [r["device"] for r in present],
        "bandwidth": {str(r["rank"]): r["bandwidth"] for r in present},
        # Under ZeRO-3 each process holds only its share of a partitioned parameter.
        "lora_partitioned": bool(present) and all(h < full for h in held) and sum(held) >= full,
        "trainable_elements": full,
        "trainable_elements_held_per_rank": held,
    }


def check_epochs(records: dict[tuple[int, int, int], dict], steps_per_epoch: int, samples: int) -> dict:
    """Over all processes, every epoch of the uninterrupted run trains each of the ``samples`` once: the processes
    split one order between them (each drawing its own would train some samples twice and others not at all)."""
    epochs: dict[int, list[str]] = {}
    for (step, _, _), record in sorted(records.items()):
        epochs.setdefault((step - 1) // steps_per_epoch + 1, []).append(record["inputs"])
    problems = [
        f"epoch {epoch}: {len(inputs) - len(set(inputs))} micro-batches repeat a sample of the same epoch, "
        f"{samples - len(set(inputs))} of {samples} samples left out"
        for epoch, inputs in epochs.items()
        if len(inputs) == samples and len(set(inputs)) != samples
    ]
    return {"ok": not problems and bool(epochs), "problems": problems,
            "distinct_samples_per_epoch": {str(e): len(set(inputs)) for e, inputs in epochs.items()}}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# (b) the saved adapter against DeepSpeed's fp32 master copy


def adapter_key(master_name: str) -> str | None:
    """The key peft saves for a LoRA weight of the training model (``language_model.`` and the adapter's name
    dropped); None for other parameters."""
    if not master_name.startswith("language_model.") or ".lora_" not in master_name:
        return None
    return re.sub(r"\.(lora_[AB])\.default\.", r".\1.", master_name.removeprefix("language_model."))


def consolidated_master_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 master copy of the trained parameters, gathered from every rank's ZeRO partition of a
    checkpoint by DeepSpeed's own ``zero_to_fp32`` (the checkpoint is this run's own)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), exclude_frozen_parameters=True)


def compare_adapter(saved: dict[str, torch.Tensor], master: dict[str, torch.Tensor]) -> dict:
    """The saved adapter against the master weights cast to the saved dtype: same tensors, same shapes, every
    element equal; and trained (some lora_B, zero at the start, is not zero)."""
    expected = {key: value for name, value in master.items() if (key := adapter_key(name))}
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    wrong_shape, differing_elements, max_difference = [], 0, 0.0
    for key in sorted(expected.keys() & saved.keys()):
        value, reference = saved[key], expected[key]
        if value.shape != reference.shape:
            wrong_shape.append(f"{key}: saved {tuple(value.shape)}, trained {tuple(reference.shape)}")
            continue
        difference = (value.float() - reference.to(value.dtype).float()).abs()
        differing_elements += int((difference > 0).sum())
        max_difference = max(max_difference, float(difference.max()) if difference.numel() else 0.0)
    trained = any(value.abs().max() > 0 for key, value in expected.items() if ".lora_B." in key)
    problems = [f"{len(items)} {what}, e.g. {items[0]}" for what, items in (
        ("trained tensors not saved", missing), ("saved tensors not trained", unexpected),
        ("tensors saved with another shape than trained (an un-gathered ZeRO-3 partition?)", wrong_shape)) if items]
    if differing_elements:
        problems.append(f"{differing_elements} elements differ from the fp32 master cast (largest {max_difference:.3g})")
    if not trained:
        problems.append("no lora_B weight moved from zero: nothing was trained")
    return {
        "ok": not problems and bool(expected),
        "problems": problems,
        "tensors": len(expected),
        "elements": sum(v.numel() for v in expected.values()),
        "saved_dtypes": sorted({str(v.dtype) for v in saved.values()}),
        "missing": missing[:5],
        "unexpected": unexpected[:5],
        "wrong_shape": wrong_shape[:5],
        "differing_elements": differing_elements,
        "max_abs_difference": max_difference,
        "trained": trained,
    }


def check_saved_adapter(output_dir: Path, steps: int) -> dict:
    """The final adapter and the last checkpoint's, against that checkpoint's consolidated fp32 master copy."""
    from safetensors.torch import load_file

    checkpoint = output_dir / f"checkpoint-{steps}"
    master = consolidated_master_weights(checkpoint)
    results = {
        where: compare_adapter(load_file(folder / ADAPTER_FILE), master)
        for where, folder in (("final", output_dir), (checkpoint.name, checkpoint))
    }
    problems = [f"{where}: {problem}" for where, r in results.items() for problem in r["problems"]]
    return {"ok": all(r["ok"] for r in results.values()), "problems": problems, "checkpoint": str(checkpoint),
            **results}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# (c) kill one rank, resume


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(child) for child in path.read_text().split()]
    except OSError:
        return []


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): tells a live process from a new one with its PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> dict[int, str]:
    """``pid`` and all its descendants, with their start times."""
    tree, queue = {}, [pid]
    while queue:
        current = queue.pop()
        start = _start_time(current)
        if start is not None:
            tree[current] = start
            queue += _children(current)
    return tree


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"RANK="):
            return int(entry[5:])
    return None


def worker_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> PID of the training processes torchrun started (its direct children; their DataLoader workers
    inherit RANK too, one level further down)."""
    ranks = {}
    for child in _children(torchrun_pid):
        rank = _rank_of(child)
        if rank is not None:
            ranks[rank] = child
    return ranks


def checkpoint_complete(output_dir: Path, step: int, world_size: int) -> bool:
    """The trainer state (written by rank 0 last) and every rank's RNG state of ``checkpoint-step`` exist: a
    resume from it then restores every rank's dropout stream."""
    folder = output_dir / f"checkpoint-{step}"
    return (folder / TRAINER_STATE_NAME).is_file() and all(
        (folder / f"rng_state_{rank}.pth").is_file() for rank in range(world_size)
    )


def failed_processes(log_text: str) -> list[tuple[int, int]]:
    """(rank, exit code) of every process torchrun's failure summary lists."""
    return [(int(rank), int(code)) for rank, code in FAILURE_BLOCK.findall(log_text)]


def judge_kill(*, returncode: int | None, exit_seconds: float, timeout_s: float, log_text: str, kill_rank: int,
               leftovers: list[int], finished: bool) -> dict:  # fmt: skip
    """Whether torchrun ended the whole job clearly after one rank was killed."""
    failures = failed_processes(log_text)
    summary = [line.strip() for line in log_text.splitlines() if re.search(r"rank\s*:|exitcode\s*:|Signal \d+", line)]
    problems = []
    if returncode is None:
        problems.append(f"torchrun did not end within {timeout_s:.0f} s after rank {kill_rank} was killed (hang)")
    elif returncode == 0:
        problems.append("torchrun exited with 0 although a rank was killed")
    if (kill_rank, -signal.SIGKILL) not in failures:
        problems.append(f"torchrun's failure summary does not name rank {kill_rank} with exit code -9: {failures}")
    if "SIGKILL" not in log_text:
        problems.append("torchrun's failure summary does not name the signal (SIGKILL)")
    if leftovers:
        problems.append(f"processes of the job still running after torchrun ended: {leftovers}")
    if finished:
        problems.append("the killed run wrote its final trainer state: it was not interrupted")
    return {
        "ok": not problems,
        "problems": problems,
        "returncode": returncode,
        "exit_seconds": exit_seconds,
        "failed_processes": failures,
        "summary": summary[:12],
    }


def kill_one_rank(launch: Launch, settings: CheckSettings, world_size: int) -> dict:
    """Start the run, SIGKILL ``kill_rank`` once checkpoint ``kill_after_step`` is complete, then watch the job end."""
    kill_rank = world_size - 1 if settings.kill_rank is None else settings.kill_rank
    process = launch.start()
    deadline = time.monotonic() + settings.run_timeout_s
    try:
        while not checkpoint_complete(launch.output_dir, settings.kill_after_step, world_size):
            if process.poll() is not None:
                raise CheckError(f"run '{launch.name}' ended (exit {process.returncode}) before checkpoint-"
                                 f"{settings.kill_after_step} was complete:\n{_log_tail(launch.log_path)}")  # fmt: skip
            if time.monotonic() > deadline:
                raise CheckError(f"no checkpoint-{settings.kill_after_step} within {settings.run_timeout_s:.0f} s")
            time.sleep(0.05)
        victim = worker_pids(process.pid).get(kill_rank)
        if victim is None:
            raise CheckError(f"no training process of rank {kill_rank} under torchrun (PID {process.pid})")
        tree = process_tree(process.pid)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            returncode = process.wait(timeout=settings.exit_timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        exit_seconds = time.monotonic() - killed_at
    finally:
        if process.poll() is None:
            _kill_tree(process)
    grace = time.monotonic() + LEFTOVER_GRACE_S
    leftovers = [pid for pid, start in tree.items() if _start_time(pid) == start]
    while leftovers and time.monotonic() < grace:
        time.sleep(0.5)
        leftovers = [pid for pid in leftovers if _start_time(pid) == tree[pid]]
    for pid in leftovers:  # do not leave them running
        os.kill(pid, signal.SIGKILL)
    result = judge_kill(
        returncode=returncode,
        exit_seconds=exit_seconds,
        timeout_s=settings.exit_timeout_s,
        log_text=launch.log_path.read_text(encoding="utf-8", errors="replace"),
        kill_rank=kill_rank,
        leftovers=leftovers,
        finished=(launch.output_dir / TRAINER_STATE_NAME).is_file(),
    )
    return {**result, "kill_rank": kill_rank, "killed_after_checkpoint": settings.kill_after_step}


def read_step_records(record_dir: Path) -> dict[tuple[int, int, int], dict]:
    """(step, micro-batch, rank) -> record, from every rank's ``steps-rank*.jsonl``. A line cut by a kill is left out."""
    records = {}
    for path in sorted(record_dir.glob("steps-rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[(record["step"], record["micro_batch"], record["rank"])] = record
    return records


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare_resumed_steps(uninterrupted: dict, killed: dict, resumed: dict, resumed_at: int) -> dict:
    """The killed run's micro-batches up to the resumed step, then the resumed run's, against the uninterrupted
    run's: the same keys, the same inputs, and the loss differences (before the kill: two uninterrupted runs, the
    noise floor; after: the resume)."""
    repeated = sorted(key for key in resumed if key[0] <= resumed_at)
    combined = {key: r for key, r in killed.items() if key[0] <= resumed_at}
    combined.update({key: r for key, r in resumed.items() if key[0] > resumed_at})
    missing = sorted(uninterrupted.keys() - combined.keys())
    extra = sorted(combined.keys() - uninterrupted.keys())
    common = sorted(uninterrupted.keys() & combined.keys())
    other_inputs = [key for key in common if combined[key]["inputs"] != uninterrupted[key]["inputs"]]
    non_finite = sum(not math.isfinite(r["loss"]) for r in [*combined.values(), *uninterrupted.values()])
    before = [_relative(combined[k]["loss"], uninterrupted[k]["loss"]) for k in common if k[0] <= resumed_at]
    after = [_relative(combined[k]["loss"], uninterrupted[k]["loss"]) for k in common if k[0] > resumed_at]
    return {
        "micro_batches": len(uninterrupted),
        "repeated": repeated[:5],
        "missing": missing[:5],
        "extra": extra[:5],
        "other_inputs": other_inputs[:5],
        "other_inputs_count": len(other_inputs),
        "non_finite_losses": non_finite,
        "loss_rel_difference_before_kill": max(before, default=0.0),
        "loss_rel_difference_after_resume": max(after, default=0.0),
        "resumed_micro_batches": len(after),
    }


def compare_weights(resumed: dict[str, torch.Tensor], uninterrupted: dict[str, torch.Tensor]) -> dict:
    """Largest element difference, and the relative difference of the lora_B weights (all zero at the start, so
    their norm is how far training moved them)."""
    if resumed.keys() != uninterrupted.keys():
        return {"same_tensors": False, "max_abs_difference": float("inf"), "lora_B_rel_difference": float("inf")}
    max_difference, diff_sq, norm_sq = 0.0, 0.0, 0.0
    for key, reference in uninterrupted.items():
        if resumed[key].shape != reference.shape:
            return {"same_tensors": False, "max_abs_difference": float("inf"), "lora_B_rel_difference": float("inf")}
        difference = (resumed[key].float() - reference.float()).abs()
        max_difference = max(max_difference, float(difference.max()) if difference.numel() else 0.0)
        if ".lora_B." in key:
            diff_sq += float((difference**2).sum())
            norm_sq += float((reference.float() ** 2).sum())
    return {
        "same_tensors": True,
        "max_abs_difference": max_difference,
        "lora_B_rel_difference": (diff_sq / norm_sq) ** 0.5 if norm_sq else float("inf"),
    }


def judge_resume(steps: dict, adapter: dict, master: dict, tolerance: Tolerance, *, resumed_at: int,
                 kill_after_step: int, final_step: int, planned_steps: int) -> dict:  # fmt: skip
    problems = []
    if resumed_at < kill_after_step:
        problems.append(f"resumed at step {resumed_at}, before the complete checkpoint-{kill_after_step}")
    if final_step != planned_steps:
        problems.append(f"the resumed run ended at step {final_step}, not {planned_steps}")
    for what in ("repeated", "missing", "extra"):
        if steps[what]:
            problems.append(f"micro-batches {what} against the uninterrupted run (step, micro-batch, rank): {steps[what]}")
    if steps["other_inputs_count"]:
        problems.append(f"{steps['other_inputs_count']} micro-batches saw other inputs than in the uninterrupted run "
                        f"(step, micro-batch, rank): {steps['other_inputs']}")  # fmt: skip
    if steps["non_finite_losses"]:
        problems.append(f"{steps['non_finite_losses']} micro-batch losses are not finite: nothing to compare")
    if steps["loss_rel_difference_after_resume"] > tolerance.loss_rtol:
        problems.append(f"losses after the resume differ by {steps['loss_rel_difference_after_resume']:.3g} "
                        f"(relative; tolerance {tolerance.loss_rtol:g})")  # fmt: skip
    for name, weights in (("final adapter", adapter), ("fp32 master weights", master)):
        if not weights["same_tensors"]:
            problems.append(f"the resumed run's {name} hold other tensors than the uninterrupted run's")
        elif not weights["lora_B_rel_difference"] <= tolerance.weight_rel:  # NaN fails too
            problems.append(f"the resumed run's {name} differ by {weights['lora_B_rel_difference']:.3g} (relative, "
                            f"lora_B; tolerance {tolerance.weight_rel:g})")  # fmt: skip
    return {"ok": not problems, "problems": problems, "resumed_at": resumed_at, "tolerance": asdict(tolerance),
            "steps": steps, "adapter": adapter, "master": master}  # fmt: skip


def check_resume(reference: Launch, killed: Launch, resumed: Launch, settings: CheckSettings) -> dict:
    from safetensors.torch import load_file

    log = (resumed.output_dir / "training_log.txt").read_text(encoding="utf-8")
    starts = RESUMED_AT.findall(log)
    resumed_at = int(starts[-1]) if starts else 0
    state = json.loads((resumed.output_dir / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    steps = compare_resumed_steps(read_step_records(reference.record_dir), read_step_records(killed.record_dir),
                                  read_step_records(resumed.record_dir), resumed_at)  # fmt: skip
    adapter = compare_weights(load_file(resumed.output_dir / ADAPTER_FILE), load_file(reference.output_dir / ADAPTER_FILE))
    final = f"checkpoint-{settings.steps}"
    master = compare_weights(consolidated_master_weights(resumed.output_dir / final),
                             consolidated_master_weights(reference.output_dir / final))  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return judge_resume(steps, adapter, master, RESUME_TOLERANCE[device], resumed_at=resumed_at,
                        kill_after_step=settings.kill_after_step, final_step=state["global_step"],
                        planned_steps=settings.steps)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------


def environment() -> dict:
    import deepspeed
    import transformers

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def run_checks(settings: CheckSettings, log=print) -> dict:
    """Prepare the inputs, make the three runs and check them (module docstring); returns the report."""
    world_size = process_count(settings.nproc_per_node)
    if world_size < 2:
        raise ValueError("The distributed checks need at least 2 processes (--nproc-per-node).")
    if not 1 <= settings.kill_after_step < settings.steps:
        raise ValueError(f"--kill-after-step must be between 1 and --steps - 1 = {settings.steps - 1}.")
    kill_rank = world_size - 1 if settings.kill_rank is None else settings.kill_rank
    if not 1 <= kill_rank < world_size:
        raise ValueError(f"--kill-rank must be a non-zero rank below {world_size}.")
    folder = check_dir(settings)
    shutil.rmtree(folder / "runs", ignore_errors=True)
    checkpoint = prepare_checkpoint(settings.model_config, settings.work_dir)
    # Two epochs, so that the runs cross an epoch boundary and the default kill resumes inside the second; as many
    # videos as samples, each of `frames` frames (one per segment: the frames drawn do not depend on a random draw).
    samples_per_step = settings.per_device_batch_size * settings.gradient_accumulation_steps * world_size
    steps_per_epoch = max(settings.steps // 2, 1)
    samples = samples_per_step * steps_per_epoch
    # Summaries of different lengths make every sample's tokens its own (the rendered clips repeat every 6), so the
    # input fingerprints tell every sample apart.
    meta = prepare_videos(folder / "videos", num_frames=settings.frames, num_samples=samples, num_videos=samples,
                          summary_tokens=(8, 8 + 2 * (samples - 1)), tokenizer=load_tokenizer(checkpoint))  # fmt: skip
    ds_config = check_deepspeed_config(settings, folder / "zero3_check_config.json")
    report = {"settings": asdict(settings), "world_size": world_size, "environment": environment(), "checks": {}}
    checks = report["checks"]

    reference = plan_launch(settings, "uninterrupted", checkpoint, meta, ds_config, fresh=True)
    log(f"[1/3] uninterrupted run: {world_size} processes, {settings.steps} steps, a checkpoint after each")
    log("      " + " ".join(reference.command))
    seconds = report["run_seconds"] = {"uninterrupted": reference.run(settings.run_timeout_s)}
    checks["collectives"] = check_collectives(reference.record_dir, world_size)
    checks["epochs"] = check_epochs(read_step_records(reference.record_dir), steps_per_epoch, samples)
    checks["adapter"] = check_saved_adapter(reference.output_dir, settings.steps)
    log(f"      collectives: {_verdict(checks['collectives'])}; every sample once per epoch: "
        f"{_verdict(checks['epochs'])}; adapter = fp32 master: {_verdict(checks['adapter'])}")  # fmt: skip

    if settings.resume:
        killed = plan_launch(settings, "killed", checkpoint, meta, ds_config, fresh=True, output_name="resumed")
        log(f"[2/3] the same run, rank {kill_rank} killed (SIGKILL) after checkpoint-{settings.kill_after_step}")
        start = time.monotonic()
        checks["kill"] = kill_one_rank(killed, settings, world_size)
        seconds["killed"] = time.monotonic() - start
        log(f"      torchrun ended the job after {checks['kill']['exit_seconds']:.1f} s: {_verdict(checks['kill'])}")
        resumed = plan_launch(settings, "resumed", checkpoint, meta, ds_config, fresh=False)
        log("[3/3] the same command again: resumes from the last complete checkpoint")
        seconds["resumed"] = resumed.run(settings.run_timeout_s)
        checks["resume"] = check_resume(reference, killed, resumed, settings)
        log(f"      resumed at step {checks['resume']['resumed_at']}: {_verdict(checks['resume'])}")
    report["status"] = "ok" if all(check["ok"] for check in checks.values()) else "failed"
    return report


def _verdict(check: dict) -> str:
    return "ok" if check["ok"] else "FAILED: " + "; ".join(check.get("problems") or ["see the report"])


def format_summary(report: dict) -> str:
    """A few lines for the terminal: each check's verdict and its key figures."""
    checks = report["checks"]
    runs = ", ".join(f"{name} {value:.0f} s" for name, value in report.get("run_seconds", {}).items())
    lines = [f"Distributed checks, {report['world_size']} processes on {report['environment']['device']}: "
             f"{report['status']} (runs: {runs})"]  # fmt: skip
    if "collectives" in checks:
        c = checks["collectives"]
        bandwidth = next(iter(c["bandwidth"].values()), {})
        lines.append(
            f"  collectives   {_verdict(c)}: backend {', '.join(c['backends'])}; all-gather "
            f"{bandwidth.get('all_gather_bus_gb_per_s', 0):.1f} GB/s, reduce-scatter "
            f"{bandwidth.get('reduce_scatter_bus_gb_per_s', 0):.1f} GB/s (bus, rank 0); LoRA partitioned over the "
            f"ranks: {c['lora_partitioned']} ({c['trainable_elements_held_per_rank']} of {c['trainable_elements']})"
        )
    if "epochs" in checks:
        e = checks["epochs"]
        lines.append(f"  epochs        {_verdict(e)}: distinct samples per epoch (all processes) "
                     f"{e['distinct_samples_per_epoch']}")  # fmt: skip
    if "adapter" in checks:
        a = checks["adapter"]
        final = a["final"]
        lines.append(
            f"  adapter       {_verdict(a)}: {final['tensors']} tensors, {final['elements']:,} elements "
            f"({', '.join(final['saved_dtypes'])}), {final['differing_elements']} differ from the fp32 master cast"
        )
    if "kill" in checks:
        k = checks["kill"]
        lines.append(f"  kill          {_verdict(k)}: exit {k['returncode']} after {k['exit_seconds']:.1f} s; "
                     f"failed (rank, exit code): {k['failed_processes']}")  # fmt: skip
    if "resume" in checks:
        r = checks["resume"]
        s = r["steps"]
        lines.append(
            f"  resume        {_verdict(r)}: at step {r['resumed_at']}; {s['micro_batches']} micro-batches, "
            f"{s['other_inputs_count']} with other inputs; loss difference {s['loss_rel_difference_after_resume']:.2g}"
            f" after the resume ({s['loss_rel_difference_before_kill']:.2g} before the kill); lora_B difference "
            f"{r['adapter']['lora_B_rel_difference']:.2g} (adapter), {r['master']['lora_B_rel_difference']:.2g} (fp32)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="python -m internvl.bench.distributed_checks",
        description="Check NCCL/gloo collectives, the saved adapter against DeepSpeed's fp32 master copy under "
        "ZeRO-3, and resuming after one rank is killed, through the recipe with N processes (see "
        "docs/BENCHMARKS.md).",
        usage="%(prog)s [options] [-- RECIPE ARGS]",
    )
    defaults = CheckSettings()
    parser.add_argument("--nproc-per-node", type=int, help="processes (default: the visible GPUs, or 2 on a CPU)")
    parser.add_argument("--model-config", default=defaults.model_config,
                        help="'tiny' (default) or a model config.json, e.g. configs/internvl3_8b_config.json")  # fmt: skip
    parser.add_argument("--work-dir", default=defaults.work_dir, help="inputs and runs (default: %(default)s)")
    parser.add_argument("--deepspeed", default=defaults.deepspeed, help="a ZeRO-3 config (default: %(default)s)")
    parser.add_argument("--persistence-threshold", type=float, default=defaults.persistence_threshold,
                        help="stage3_param_persistence_threshold for the runs (default: %(default)s: every "
                        "parameter partitioned); a negative value keeps the config's")  # fmt: skip
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="optimizer steps, over two epochs (default: %(default)s)")  # fmt: skip
    parser.add_argument("--kill-after-step", type=int, default=defaults.kill_after_step,
                        help="kill once this checkpoint is complete (default: %(default)s)")  # fmt: skip
    parser.add_argument("--kill-rank", type=int, help="the rank to kill (default: the last)")
    parser.add_argument("--per-device-batch-size", type=int, default=defaults.per_device_batch_size,
                        help="default: %(default)s")  # fmt: skip
    parser.add_argument("--grad-accum", type=int, default=defaults.gradient_accumulation_steps,
                        help="gradient accumulation steps (default: %(default)s)")  # fmt: skip
    parser.add_argument("--frames", type=int, default=defaults.frames, help="frames per sample (default: %(default)s)")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="default: %(default)s")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="default: %(default)s")
    parser.add_argument("--loader-workers", type=int, help="DataLoader workers per process (default: the recipe's)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="run 1 only: collectives, epochs, adapter")
    parser.add_argument("--exit-timeout", type=float, default=defaults.exit_timeout_s,
                        help="seconds torchrun may take to end the job after the kill (default: %(default)s)")  # fmt: skip
    parser.add_argument("--run-timeout", type=float, default=defaults.run_timeout_s,
                        help="seconds a run may take (default: %(default)s)")  # fmt: skip
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv[:split])
    return args, argv[split + 1 :]


def main(argv: list[str] | None = None) -> int:
    args, recipe_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = CheckSettings(
        nproc_per_node=args.nproc_per_node,
        model_config=args.model_config,
        work_dir=args.work_dir,
        deepspeed=args.deepspeed,
        persistence_threshold=None if args.persistence_threshold < 0 else args.persistence_threshold,
        steps=args.steps,
        kill_after_step=args.kill_after_step,
        kill_rank=args.kill_rank,
        per_device_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        frames=args.frames,
        lora_rank=args.lora_rank,
        learning_rate=args.learning_rate,
        loader_workers=args.loader_workers,
        resume=args.resume,
        exit_timeout_s=args.exit_timeout,
        run_timeout_s=args.run_timeout,
        recipe_args=recipe_args,
    )
    # A SIGTERM (e.g. from `timeout`) unwinds normally, so a running job is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        report = run_checks(settings)
    except (CheckError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2) + "\n"
    if args.output:
        atomic_write_text(args.output, text)
    print(format_summary(report), flush=True)
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
