"""Training-time measurements and the human-readable training log.

``ThroughputMeter`` turns the trainer's counters into tokens/s, samples/s and peak GPU memory for each logging
step; ``InternVLTrainer.log`` adds them to the logged values, so TensorBoard, ``trainer_state.json`` and
``training_log.txt`` all carry them. ``TrainingLogCallback`` writes ``training_log.txt``: one line per logging
step, one per evaluation (its loss and, with ``--eval_generate``, ROUGE / BLEU / CIDEr) and a closing summary; at
the start it warns when ``--logging_steps`` would log nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from internvl.tools.metrics import METRIC_NAMES
from internvl.train.run_warnings import logging_steps_warning

TRAINING_LOG_NAME = "training_log.txt"


def peak_gpu_memory_gib() -> float | None:
    """Peak allocated GPU memory of any rank since start, in GiB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    peak = torch.tensor(float(torch.cuda.max_memory_allocated()), device="cuda")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item() / 2**30


class ThroughputMeter(TrainerCallback):
    """Tokens/s and samples/s over the training time between two logging steps.

    Evaluation and checkpoint saving happen right after a log; the clock restarts when they end, so they do not
    count as training time. Tokens are the non-padding input tokens of all ranks (``num_input_tokens_seen``);
    samples are the samples of all ranks this run has trained on so far (the trainer counts them: a step can hold
    fewer than the nominal batch, e.g. the last one of an epoch or every step of a set smaller than a batch).
    """

    def __init__(self):
        self._time = self._tokens = self._samples = None

    def _restart(self, state, samples_seen: int) -> None:
        self._time, self._tokens, self._samples = time.perf_counter(), state.num_input_tokens_seen, samples_seen

    def on_train_begin(self, args, state, control, **kwargs):
        self._restart(state, samples_seen=0)

    def on_evaluate(self, args, state, control, **kwargs):
        self._time = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self._time = time.perf_counter()

    def measure(self, state, samples_seen: int) -> dict[str, float]:
        """Throughput since the previous call (or the start of training); restarts the measurement.
        ``samples_seen``: the samples trained on by all ranks since this run started."""
        if self._time is None:
            return {}
        elapsed = max(time.perf_counter() - self._time, 1e-9)
        values = {
            "tokens_per_second": (state.num_input_tokens_seen - self._tokens) / elapsed,
            "samples_per_second": (samples_seen - self._samples) / elapsed,
        }
        peak = peak_gpu_memory_gib()
        if peak is not None:
            values["peak_gpu_memory_gib"] = peak
        self._restart(state, samples_seen)
        return values


def format_train_line(step: int, max_steps: int, logs: dict) -> str:
    peak = logs.get("peak_gpu_memory_gib")
    fields = [
        f"step {step}/{max_steps}",
        f"epoch {logs.get('epoch', 0.0):.2f}",
        f"loss {logs['loss']:.4f}",
        f"lr {logs.get('learning_rate', 0.0):.3e}",
        f"grad_norm {logs['grad_norm']:.4f}" if "grad_norm" in logs else "grad_norm n/a",
        f"tokens/s {logs.get('tokens_per_second', 0.0):.1f}",
        f"samples/s {logs.get('samples_per_second', 0.0):.3f}",
        f"peak_gpu_mem {peak:.2f} GiB" if peak is not None else "peak_gpu_mem n/a (cpu)",
    ]
    return " | ".join(fields)


def format_eval_line(step: int, max_steps: int, logs: dict) -> str:
    """The evaluation's loss and, with ``--eval_generate``, its generation metrics."""
    fields = [f"eval  step {step}/{max_steps}", f"eval_loss {logs['eval_loss']:.4f}"]
    fields += [f"{name} {logs['eval_' + name]:.2f}" for name in METRIC_NAMES if f"eval_{name}" in logs]
    return " | ".join(fields)


class TrainingLogCallback(TrainerCallback):
    """Appends readable lines to ``<output_dir>/training_log.txt`` (main process only)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / TRAINING_LOG_NAME
        # Loss summed over this run's logged optimizer steps (the trainer's own train_loss divides by every step
        # since the start of training, so it is too small after a resume).
        self._loss_sum = 0.0
        self._first_step = self._last_step = 0

    def _write(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self._loss_sum, self._first_step, self._last_step = 0.0, state.global_step, state.global_step
        if state.is_world_process_zero:
            start = f"resuming at step {state.global_step}" if state.global_step else "starting"
            self._write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {start}, {state.max_steps} optimizer steps in all")
            warning = logging_steps_warning(args, state)
            if warning:
                print(warning, flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            # The logged loss is the mean over the steps since the previous log.
            self._loss_sum += logs["loss"] * (state.global_step - self._last_step)
            self._last_step = state.global_step
            self._write(format_train_line(state.global_step, state.max_steps, logs))
        elif "eval_loss" in logs:
            self._write(format_eval_line(state.global_step, state.max_steps, logs))
        elif "train_runtime" in logs:
            logged_steps = self._last_step - self._first_step
            mean = f"{self._loss_sum / logged_steps:.4f}" if logged_steps else "n/a (no step logged)"
            self._write(
                f"# done: step {state.global_step}/{state.max_steps}, {state.global_step - self._first_step} steps in "
                f"{logs['train_runtime']:.1f} s this run, mean loss {mean}"
            )
