"""Measuring inside the training processes: the recipe's trainer, timing each optimizer step.

Per optimizer step: wall time between step ends (the GPU is synchronised at each step end), time spent waiting for
the next batch, and what the batches held. With a profile trace requested, one more step runs after the measured
ones under ``torch.profiler`` in the main process (``internvl.bench.profiling``); it is not measured. When training
ends, every process's figures are gathered and the main process writes the report (``internvl.bench.report``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function
from transformers import TrainerCallback

from internvl.bench.flops import BatchCounts
from internvl.bench.profiling import DATA_WAIT_SCOPE, StepProfiler
from internvl.bench.report import build_report
from internvl.data.files import atomic_write_text
from internvl.train.trainer import InternVLTrainer


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
        with record_function(DATA_WAIT_SCOPE):
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
        self.trainer.profile_last_step(state)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.write_report(args, state)


class BenchmarkTrainer(InternVLTrainer):
    """The recipe's trainer, timing each optimizer step and writing a JSON report when training ends."""

    def __init__(
        self,
        *args,
        report_path: str,
        warmup_steps: int,
        peak_tflops: float,
        memory_cap_gib: float | None,
        profile_trace: str | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.report_path = Path(report_path)
        self.warmup_steps = warmup_steps
        self.peak_tflops = peak_tflops
        self.memory_cap_gib = memory_cap_gib
        self.profile_trace = profile_trace  # profile the last step (not measured) into this trace
        self.profile: dict | None = None
        self._profiler: StepProfiler | None = None
        self.meter = StepMeter()
        self.add_callback(_BenchmarkCallback(self))

    def profile_last_step(self, state) -> None:
        """At the end of the second-to-last step, start profiling (main process); at the end of the last, stop."""
        if not self.profile_trace or self.args.process_index != 0:
            return
        if state.global_step == state.max_steps - 1:
            engine = self.model_wrapped if self.is_deepspeed_enabled else None
            self._profiler = StepProfiler(self.model, self.profile_trace, engine=engine)
            self._profiler.start()
        elif state.global_step == state.max_steps and self._profiler is not None:
            self.profile = self._profiler.stop()
            self._profiler = None

    @property
    def measured_steps(self) -> list[StepRecord]:
        end = len(self.meter.steps) - (1 if self.profile_trace else 0)
        return self.meter.steps[self.warmup_steps : end]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return super().get_batch_samples(_TimedBatches(epoch_iterator, self.meter), num_batches, device)

    def _process_summary(self) -> dict:
        measured = self.measured_steps
        counts = BatchCounts()
        for step in measured:
            counts += step.counts
        summary = {
            "step_seconds": [step.seconds for step in self.meter.steps],
            "measured_steps": len(measured),
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
