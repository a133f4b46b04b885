"""Entry point of each training process of the distributed checks (``internvl.bench.distributed_checks``):

    python -m internvl.bench.distributed_worker --record-dir DIR -- RECIPE ARGS

runs the recipe's own ``main()`` (the launcher's flags, Trainer and DeepSpeed config) with the ``CheckedTrainer``,
which records into ``DIR``, per process:

- ``collectives-rank{R}.json``, when training begins (DeepSpeed's engine is built, no step has run): the process
  group's backend, whether all-reduce, all-gather, reduce-scatter and broadcast gave the right values on the
  training device, the bus bandwidth of a large all-gather and reduce-scatter, and how much of the trainable
  parameters this process holds (the ZeRO-3 partition) against their full size;
- ``steps-rank{R}.jsonl``, one line per micro-batch as soon as its backward pass is done: the optimizer step, the
  micro-batch's place in it, a fingerprint of its inputs (SHA-256 of the token ids and pixels) and its loss at full
  precision. A run killed mid-step keeps every line written before the kill.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from internvl.data.files import atomic_write_text
from internvl.train.trainer import InternVLTrainer

# Large enough to reach an interconnect's bus bandwidth (NVLink: hundreds of GB/s) and small beside a GPU; gloo on
# a CPU takes seconds per GiB, so it gets less.
BANDWIDTH_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}
BANDWIDTH_REPEATS = 5


def collectives_path(record_dir: str | Path, rank: int) -> Path:
    return Path(record_dir) / f"collectives-rank{rank}.json"


def steps_path(record_dir: str | Path, rank: int) -> Path:
    return Path(record_dir) / f"steps-rank{rank}.jsonl"


def expected_backend(device: torch.device) -> str:
    """The backend a process group must have: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def backend_for_device(backend: str, device: torch.device) -> str:
    """The backend that serves ``device`` in a group's backend string, also a per-device one ("cuda:nccl,cpu:gloo")."""
    for entry in backend.split(","):
        kind, sep, name = entry.partition(":")
        if sep and kind == device.type:
            return name
    return backend


def training_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_collective_values(device: torch.device) -> dict[str, bool]:
    """Each collective on small tensors whose right result is known, in the dtypes ZeRO moves (bf16, fp32)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}

    total = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(total)
    results["all_reduce_sum"] = bool(torch.all(total == world * (world + 1) / 2))

    gathered = torch.empty(3 * world, dtype=torch.bfloat16, device=device)
    dist.all_gather_into_tensor(gathered, torch.full((3,), float(rank), dtype=torch.bfloat16, device=device))
    expected = torch.arange(world, device=device).repeat_interleave(3).to(torch.bfloat16)
    results["all_gather_bf16"] = bool(torch.equal(gathered, expected))

    # Rank q contributes chunk c = [2c, 2c + 1] + 100 q; rank r receives the sum of chunk r over all ranks.
    contribution = torch.arange(2 * world, dtype=torch.float32, device=device) + 100 * rank
    scattered = torch.empty(2, dtype=torch.float32, device=device)
    dist.reduce_scatter_tensor(scattered, contribution)
    own_chunk = torch.arange(2 * rank, 2 * rank + 2, dtype=torch.float32, device=device)
    results["reduce_scatter_sum"] = bool(torch.equal(scattered, world * own_chunk + 100 * world * (world - 1) / 2))

    value = torch.arange(5, dtype=torch.float32, device=device) * 7 if rank == 0 else torch.zeros(5, device=device)
    dist.broadcast(value, src=0)
    results["broadcast"] = bool(torch.equal(value, torch.arange(5, dtype=torch.float32, device=device) * 7))
    return results


def _time_collective(run, device: torch.device) -> float:
    run()  # warm-up: the first call sets up the communicator's buffers
    dist.barrier()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(BANDWIDTH_REPEATS):
        run()
    _synchronize(device)
    return (time.perf_counter() - start) / BANDWIDTH_REPEATS


def collective_bandwidth(device: torch.device) -> dict[str, float]:
    """Bus bandwidth (GB/s, nccl-tests' definition: bytes x (N - 1) / N / time) of an all-gather and a
    reduce-scatter of ``BANDWIDTH_BYTES`` of bf16 in all: the two collectives ZeRO runs every step."""
    world = dist.get_world_size()
    total_bytes = BANDWIDTH_BYTES[device.type]
    elements = total_bytes // 2 // world * world
    full = torch.ones(elements, dtype=torch.bfloat16, device=device)
    part = torch.ones(elements // world, dtype=torch.bfloat16, device=device)
    gather_s = _time_collective(lambda: dist.all_gather_into_tensor(full, part), device)
    scatter_s = _time_collective(lambda: dist.reduce_scatter_tensor(part, full), device)
    share = (world - 1) / world
    return {
        "bytes": elements * 2,
        "all_gather_seconds": gather_s,
        "all_gather_bus_gb_per_s": elements * 2 * share / gather_s / 1e9,
        "reduce_scatter_seconds": scatter_s,
        "reduce_scatter_bus_gb_per_s": elements * 2 * share / scatter_s / 1e9,
    }


def trainable_partition(model: torch.nn.Module) -> dict[str, int]:
    """Elements of the trainable parameters this process holds, against their full size: under ZeRO-3 a
    partitioned parameter keeps only its ``ds_tensor`` share here."""
    held = full = 0
    for param in model.parameters():
        if param.requires_grad:
            full += getattr(param, "ds_numel", param.numel())
            held += param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
    return {"held_elements": held, "full_elements": full}


def collectives_report(model: torch.nn.Module) -> dict:
    """What this process's training sees of the process group (see the module docstring)."""
    device = training_device()
    backend = str(dist.get_backend())
    report = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "device": str(device),
        "group_backend": backend,
        "backend": backend_for_device(backend, device),
        "expected_backend": expected_backend(device),
        "values": check_collective_values(device),
        "bandwidth": collective_bandwidth(device),
        "trainable": trainable_partition(model),
    }
    try:
        from deepspeed.accelerator import get_accelerator

        report["deepspeed_backend"] = get_accelerator().communication_backend_name()
    except ImportError:
        report["deepspeed_backend"] = None
    return report


def input_fingerprint(inputs: dict) -> str:
    """SHA-256 (first 16 hex digits) of a micro-batch's token ids and pixels: equal for the same samples."""
    digest = hashlib.sha256()
    for key in ("input_ids", "pixel_values"):
        if key in inputs:
            tensor = inputs[key].detach().contiguous().cpu()
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class _CollectivesCheck(TrainerCallback):
    def __init__(self, record_dir: Path):
        self.record_dir = record_dir

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        report = collectives_report(model)
        atomic_write_text(collectives_path(self.record_dir, report["rank"]), json.dumps(report, indent=2) + "\n")


class CheckedTrainer(InternVLTrainer):
    """The recipe's trainer, recording each micro-batch's inputs and loss (see the module docstring)."""

    def __init__(self, *args, record_dir: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.record_dir = Path(record_dir)
        self.record_dir.mkdir(parents=True, exist_ok=True)
        self._micro_batch = self._recorded_step = 0
        self.add_callback(_CollectivesCheck(self.record_dir))

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
        if step != self._recorded_step:
            self._recorded_step, self._micro_batch = step, 0
        fingerprint = input_fingerprint(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        record = {
            "step": step,
            "micro_batch": self._micro_batch,
            "rank": self.args.process_index,
            "inputs": fingerprint,
            "loss": float(loss.detach().float().cpu()),
        }
        self._micro_batch += 1
        with open(steps_path(self.record_dir, self.args.process_index), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return loss


def main(argv: list[str] | None = None) -> None:
    """``--record-dir DIR -- RECIPE ARGS``: the recipe's training run, recorded."""
    from internvl.train import internvl_chat_finetune

    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description="One training process of the distributed checks (torchrun).")
    parser.add_argument("--record-dir", required=True, help="where each process writes what it saw")
    options = parser.parse_args(argv[:split])
    os.makedirs(options.record_dir, exist_ok=True)
    trainer_class = functools.partial(CheckedTrainer, record_dir=options.record_dir)
    internvl_chat_finetune.main(argv[split + 1 :], trainer_class=trainer_class)


if __name__ == "__main__":
    main()
