"""Warnings about the size of a run, printed once by the main process: a training set smaller than one batch, a
validation set too small to mean much, and a ``--logging_steps`` that would log no loss at all."""

from __future__ import annotations

# Fewer validation records than this make eval loss and generation scores noise.
MIN_USEFUL_VAL_RECORDS = 5


def dataset_size_warnings(num_train: int, num_eval: int | None, training_args) -> list[str]:
    """``num_eval`` is None when the run does not evaluate."""
    args = training_args
    warnings = []
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if args.do_train and num_train < batch:
        warnings.append(
            f"Warning: the training set has {num_train} samples, fewer than one optimizer step's batch of {batch} "
            f"({args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} gradient "
            f"accumulation x {args.world_size} processes): each epoch is a single optimizer step over those "
            f"{num_train} samples. Lower BATCH_SIZE (--per_device_train_batch_size, --gradient_accumulation_steps) "
            "or add data."
        )
    if num_eval is not None and num_eval < MIN_USEFUL_VAL_RECORDS:
        records = f"{num_eval} record" + ("s" if num_eval != 1 else "")
        cider = " (CIDEr is always 0 on a single record)" if num_eval == 1 else ""
        warnings.append(
            f"Warning: the validation set has {records}: with fewer than {MIN_USEFUL_VAL_RECORDS}, eval loss and "
            f"generation scores are mostly noise{cider}. Prepare the data with more videos or a larger --val-ratio."
        )
    return warnings


def logging_steps_warning(args, state) -> str | None:
    """A warning when no optimizer step of this run (from ``state.global_step`` to ``state.max_steps``) is a
    logging step, so that no training loss would be logged at all."""
    if args.logging_strategy != "steps" or not state.logging_steps:
        return None
    every = state.logging_steps
    if state.max_steps // every > state.global_step // every:
        return None
    steps = state.max_steps - state.global_step
    return (
        f"Warning: --logging_steps {args.logging_steps} is more than the {steps} optimizer steps this run makes: no "
        "training loss will be logged (training_log.txt, TensorBoard and loss_curves.png stay without a curve). "
        "Pass a smaller --logging_steps, e.g. 1."
    )
