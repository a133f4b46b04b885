"""Throughput measurement and the readable training log."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from internvl.train import callbacks
from internvl.train.callbacks import TRAINING_LOG_NAME, ThroughputMeter, TrainingLogCallback


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(callbacks.time, "perf_counter", fake)
    return fake


LOG_EVERY_STEP = SimpleNamespace(logging_strategy="steps", logging_steps=1)


def state(step: int, tokens: int, **extra) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, num_input_tokens_seen=tokens, max_steps=50, is_world_process_zero=True,
                           logging_steps=1, **extra)  # fmt: skip


def test_throughput_between_logging_steps(clock):
    meter = ThroughputMeter()
    meter.on_train_begin(None, state(0, 0), None)
    clock.now += 4.0
    values = meter.measure(state(10, 20_000), samples_seen=80)
    assert values["tokens_per_second"] == pytest.approx(5000.0)
    assert values["samples_per_second"] == pytest.approx(80 / 4.0)
    # The next measurement starts where this one ended.
    clock.now += 2.0
    values = meter.measure(state(12, 21_000), samples_seen=96)
    assert values["tokens_per_second"] == pytest.approx(500.0)
    assert values["samples_per_second"] == pytest.approx(8.0)


def test_samples_per_second_counts_the_samples_trained_on_not_the_nominal_batch(clock):
    """Five samples and a nominal batch of 32: one optimizer step per epoch of five samples, not 32."""
    meter = ThroughputMeter()
    meter.on_train_begin(None, state(0, 0), None)
    clock.now += 10.0
    assert meter.measure(state(1, 500), samples_seen=5)["samples_per_second"] == pytest.approx(0.5)


def test_evaluation_and_saving_time_do_not_count_as_training(clock):
    meter = ThroughputMeter()
    meter.on_train_begin(None, state(0, 0), None)
    clock.now += 1.0
    meter.measure(state(1, 100), samples_seen=1)
    clock.now += 30.0  # evaluation right after the log
    meter.on_evaluate(None, state(1, 100), None)
    clock.now += 20.0  # checkpoint save
    meter.on_save(None, state(1, 100), None)
    clock.now += 1.0
    assert meter.measure(state(2, 200), samples_seen=2)["tokens_per_second"] == pytest.approx(100.0)


def test_resumed_run_measures_from_the_resumed_counters(clock):
    meter = ThroughputMeter()
    meter.on_train_begin(None, state(40, 80_000), None)  # the sample count starts again with the run
    clock.now += 2.0
    values = meter.measure(state(41, 81_000), samples_seen=2)
    assert values["tokens_per_second"] == pytest.approx(500.0)
    assert values["samples_per_second"] == pytest.approx(1.0)


def test_no_gpu_means_no_memory_value(clock, monkeypatch):
    monkeypatch.setattr(callbacks.torch.cuda, "is_available", lambda: False)
    meter = ThroughputMeter()
    meter.on_train_begin(None, state(0, 0), None)
    clock.now += 1.0
    assert "peak_gpu_memory_gib" not in meter.measure(state(1, 1), samples_seen=1)


def test_training_log_lines(tmp_path):
    log = TrainingLogCallback(tmp_path)
    log.on_train_begin(LOG_EVERY_STEP, state(0, 0), None)
    train_logs = {"loss": 1.23456, "learning_rate": 2e-5, "grad_norm": 0.5, "epoch": 0.25, "tokens_per_second": 1234.5,
                  "samples_per_second": 3.25, "peak_gpu_memory_gib": 12.5}  # fmt: skip
    log.on_log(None, state(10, 0), None, logs=train_logs)
    log.on_log(None, state(10, 0), None, logs={"eval_loss": 0.987, "epoch": 0.25})
    log.on_log(None, state(50, 0), None, logs={"loss": 0.5, "learning_rate": 1e-5})
    log.on_log(None, state(50, 0), None, logs={"train_runtime": 61.0, "train_loss": 1.1})
    lines = (tmp_path / TRAINING_LOG_NAME).read_text().splitlines()
    assert lines[0].startswith("# ") and "starting, 50 optimizer steps" in lines[0]
    assert lines[1] == (
        "step 10/50 | epoch 0.25 | loss 1.2346 | lr 2.000e-05 | grad_norm 0.5000 | tokens/s 1234.5 | "
        "samples/s 3.250 | peak_gpu_mem 12.50 GiB"
    )
    assert lines[2] == "eval  step 10/50 | eval_loss 0.9870"
    # Mean over optimizer steps: 10 steps at 1.23456 and 40 at 0.5.
    assert lines[4] == "# done: step 50/50, 50 steps in 61.0 s this run, mean loss 0.6469"


def test_mean_loss_of_a_resumed_run_covers_its_own_steps(tmp_path):
    log = TrainingLogCallback(tmp_path)
    log.on_train_begin(LOG_EVERY_STEP, state(40, 0), None)
    log.on_log(None, state(45, 0), None, logs={"loss": 2.0})
    log.on_log(None, state(50, 0), None, logs={"loss": 1.0})
    log.on_log(None, state(50, 0), None, logs={"train_runtime": 5.0, "train_loss": 0.3})
    lines = (tmp_path / TRAINING_LOG_NAME).read_text().splitlines()
    assert "resuming at step 40" in lines[0]
    assert lines[-1] == "# done: step 50/50, 10 steps in 5.0 s this run, mean loss 1.5000"


def test_summary_counts_every_step_and_averages_the_logged_ones(tmp_path):
    log = TrainingLogCallback(tmp_path)
    log.on_train_begin(LOG_EVERY_STEP, state(0, 0), None)
    log.on_log(None, state(10, 0), None, logs={"loss": 2.0})  # steps 11-15 end before the next logging step
    log.on_log(None, state(15, 0), None, logs={"train_runtime": 3.0})
    assert (tmp_path / TRAINING_LOG_NAME).read_text().splitlines()[-1] == (
        "# done: step 15/50, 15 steps in 3.0 s this run, mean loss 2.0000"
    )

    short = TrainingLogCallback(tmp_path / "short")  # fewer steps than --logging_steps: no loss at all
    short.on_train_begin(LOG_EVERY_STEP, state(0, 0), None)
    short.on_log(None, state(3, 0), None, logs={"train_runtime": 1.0})
    assert (tmp_path / "short" / TRAINING_LOG_NAME).read_text().splitlines()[-1] == (
        "# done: step 3/50, 3 steps in 1.0 s this run, mean loss n/a (no step logged)"
    )


def test_training_log_on_cpu_and_on_other_ranks(tmp_path):
    log = TrainingLogCallback(tmp_path)
    log.on_log(None, state(1, 0), None, logs={"loss": 2.0, "learning_rate": 1e-3})
    assert "grad_norm n/a" in (tmp_path / TRAINING_LOG_NAME).read_text()
    assert "peak_gpu_mem n/a (cpu)" in (tmp_path / TRAINING_LOG_NAME).read_text()
    other_rank = state(2, 0)
    other_rank.is_world_process_zero = False
    log.on_log(None, other_rank, None, logs={"loss": 3.0})
    assert len((tmp_path / TRAINING_LOG_NAME).read_text().splitlines()) == 1
