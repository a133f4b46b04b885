"""The run the setup checks are about: ``SetupSettings.from_launcher`` reads the settings exactly as
``internvl.train.launch`` builds the training command, so the checks see what training will see."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence


@dataclass
class SetupSettings:
    """The run the checks are about: the launcher's environment plus the training arguments it builds."""

    model_path: Path
    meta_path: Path
    deepspeed_config: Path
    output_dir: Path
    gpus: int  # processes per node
    nnodes: int
    per_device_batch_size: int
    batch_size: int
    gradient_accumulation: int
    model_args: Any  # internvl.train.arguments.ModelArguments, as training parses it
    data_args: Any  # internvl.train.arguments.DataTrainingArguments
    training_args: Any = None  # internvl.train.arguments.InternVLTrainingArguments, without --deepspeed
    save_total_limit: int | None = None
    evaluation_requested: bool = False
    overwrite_output_dir: bool = False
    # What the launcher refuses (e.g. a BATCH_SIZE that does not divide), reported as a failure.
    launch_error: str | None = None
    # Check every referenced video/image instead of a sample per dataset.
    full_media_check: bool = False
    media_sample_size: int = 64

    @property
    def lora_rank(self) -> int:
        return self.model_args.use_llm_lora

    @classmethod
    def from_launcher(
        cls,
        environ: Mapping[str, str] | None = None,
        training_args: Sequence[str] = (),
        visible_gpus: int | None = None,
    ) -> "SetupSettings":
        """The settings ``internvl.train.launch`` would run with: its environment variables (``GPUS``,
        ``BATCH_SIZE``, ``MODEL_PATH``, ...) and defaults, then ``training_args`` appended as the launcher does.
        The arguments are parsed by training's own parser, so what it refuses (an unknown flag, ``--bf16 True
        --fp16 True``) is a ``ValueError`` here; ``--deepspeed`` is left to the DeepSpeed checks and the GPU's
        abilities to the environment checks."""
        from internvl.train.arguments import resolve_deepspeed_config
        from internvl.train.launch import DEFAULTS, flag_values, resolve_plan
        from internvl.train.run_guard import parse_args_for_checks

        environ = dict(os.environ if environ is None else environ)
        if visible_gpus is None:
            import torch

            visible_gpus = torch.cuda.device_count()
        launch_error = None
        try:
            plan = resolve_plan(environ, list(training_args), visible_gpus)
            args = plan.train_args
            gpus, nnodes = plan.nproc_per_node, plan.nnodes
            per_device, batch_size = plan.per_device_batch_size, plan.batch_size
        except ValueError as error:
            # The launcher would stop here; keep checking everything else with the values as given.
            launch_error = str(error)
            env = {k: v for k, v in environ.items() if v}

            def get(name: str) -> str:
                return env.get(name) or DEFAULTS[name]

            args = [
                "--model_name_or_path", get("MODEL_PATH"), "--meta_path", get("META_PATH"),
                "--output_dir", get("OUTPUT_DIR"), "--deepspeed", get("DEEPSPEED_CONFIG"),
                "--use_llm_lora", str(int_or(get("LORA_RANK"), int(DEFAULTS["LORA_RANK"]))),
                *training_args,
            ]  # fmt: skip
            default_gpus = visible_gpus or int(DEFAULTS["CPU_PROCESSES"])
            gpus = int_or(env.get("GPUS") or env.get("SLURM_GPUS_ON_NODE"), default_gpus)
            nnodes = int_or(env.get("NNODES") or env.get("SLURM_NNODES"), 1)
            per_device = int_or(get("PER_DEVICE_BATCH_SIZE"), int(DEFAULTS["PER_DEVICE_BATCH_SIZE"]))
            batch_size = int_or(get("BATCH_SIZE"), int(DEFAULTS["BATCH_SIZE"]))

        flags = flag_values(args)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                model_args, data_args, parsed = parse_args_for_checks(_without_flag(list(args), "deepspeed"))
        except SystemExit:
            raise ValueError(f"training arguments rejected: {stderr.getvalue().strip().splitlines()[-1]}") from None
        except (ValueError, OSError) as error:
            raise ValueError(f"training arguments rejected: {error}") from None
        deepspeed = flags.get("deepspeed", "")
        try:
            deepspeed = resolve_deepspeed_config(deepspeed) or deepspeed
        except FileNotFoundError:
            pass  # reported by the DeepSpeed config check, with the shipped alternatives
        per_step = per_device * gpus * nnodes
        return cls(
            model_path=Path(model_args.model_name_or_path),
            meta_path=Path(data_args.meta_path),
            deepspeed_config=Path(deepspeed),
            output_dir=Path(parsed.output_dir),
            gpus=gpus,
            nnodes=nnodes,
            per_device_batch_size=per_device,
            batch_size=batch_size,
            gradient_accumulation=max(1, batch_size // max(1, per_step)),
            model_args=model_args,
            data_args=data_args,
            training_args=parsed,
            save_total_limit=parsed.save_total_limit,
            evaluation_requested=parsed.do_eval or parsed.eval_strategy != "no",
            overwrite_output_dir=parsed.overwrite_output_dir,
            launch_error=launch_error,
        )


def int_or(value: Any, default: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _without_flag(args: list[str], name: str) -> list[str]:
    """``args`` without ``--name value`` / ``--name=value``."""
    kept, i = [], 0
    while i < len(args):
        if args[i] == f"--{name}":
            i += 2
            continue
        if not args[i].startswith(f"--{name}="):
            kept.append(args[i])
        i += 1
    return kept
