"""Warnings about a run's size: a training set smaller than one batch, fewer than 5 validation records, and a
--logging_steps that would log no loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from internvl.train.arguments import parse_args
from internvl.train.run_warnings import dataset_size_warnings, logging_steps_warning


def training_args(*extra: str):
    return parse_args(["--model_name_or_path", "m", "--meta_path", "x", "--output_dir", "out", "--report_to", "none",
                       "--do_train", "True", *extra])[2]  # fmt: skip


def test_a_training_set_smaller_than_one_batch_is_named():
    args = training_args("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8")
    (warning,) = dataset_size_warnings(5, None, args)
    assert warning.startswith(
        f"Warning: the training set has 5 samples, fewer than one optimizer step's batch of {32 * args.world_size} "
        f"(4 per device x 8 gradient accumulation x {args.world_size} processes): each epoch is a single optimizer "
        "step over those 5 samples."
    )
    assert dataset_size_warnings(32 * args.world_size, None, args) == []


@pytest.mark.parametrize("records, expected", [(1, "1 record"), (4, "4 records"), (5, None), (None, None)])
def test_fewer_than_five_validation_records_are_named(records, expected):
    warnings = dataset_size_warnings(100, records, training_args())
    if expected is None:
        assert warnings == []
    else:
        (warning,) = warnings
        assert warning.startswith(f"Warning: the validation set has {expected}: with fewer than 5, eval loss and "
                                  "generation scores are mostly noise")  # fmt: skip
        assert ("CIDEr is always 0 on a single record" in warning) == (records == 1)


def state(global_step: int, max_steps: int, logging_steps: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=global_step, max_steps=max_steps, logging_steps=logging_steps)


def test_logging_steps_that_log_nothing_are_named():
    args = SimpleNamespace(logging_strategy="steps", logging_steps=10)
    warning = logging_steps_warning(args, state(0, 3, 10))
    assert warning.startswith("Warning: --logging_steps 10 is more than the 3 optimizer steps this run makes: no "
                              "training loss will be logged")  # fmt: skip
    assert logging_steps_warning(args, state(0, 10, 10)) is None  # step 10 logs
    # A resumed run logs if a multiple of logging_steps lies ahead, however few steps it has left.
    assert logging_steps_warning(args, state(8, 12, 10)) is None
    assert logging_steps_warning(args, state(10, 15, 10)) is not None
    assert logging_steps_warning(SimpleNamespace(logging_strategy="epoch", logging_steps=10), state(0, 3, 10)) is None
