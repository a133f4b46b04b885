"""What a training run checks about its output folder before anything is loaded, and holds while it runs.

- ``check_output_dir``: the output folder can be written, and is neither the base model folder, nor inside it, nor
  a place whose deletion (checkpoint rotation, ``--overwrite_output_dir``) would take the base model with it;
- ``output_dir_lock``: one run at a time per output folder (an ``flock`` held for the whole run, released by the
  kernel when the process ends, however it ends);
- ``check_resume``: the run about to resume against the settings its checkpoint was trained with
  (``run_args.json``, which every checkpoint carries): what cannot resume (LoRA ranks, what trains, the model's
  shape, the ZeRO partition count) is refused in one line; data and hyper-parameter changes are warnings.

``preflight`` runs the checks (all but the lock, which the run's main process takes); training calls it first, and the
launcher calls it (with ``refuse_if_in_use``) before ``torchrun`` starts, so a bad path or setting is one line,
printed once, before minutes of model loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from internvl.data.files import (
    LockHeldError,
    atomic_write_text,
    exclusive_lock,
    lock_holder,
    unwritable_folder_reason,
)
from internvl.train.checkpoint import damaged_checkpoint_message, last_complete_checkpoint, list_checkpoints

RUN_ARGS_NAME = "run_args.json"
LOCK_NAME = ".training.lock"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")

# Settings a checkpoint cannot be resumed with once changed: the trained tensors (and their optimizer state) would
# no longer fit. (section, key) of run_args.json -> what to call it.
REFUSED_CHANGES = {
    ("model_args", "use_llm_lora"): "LLM LoRA rank (--use_llm_lora, LORA_RANK)",
    ("model_args", "use_backbone_lora"): "vision LoRA rank (--use_backbone_lora)",
    ("model_args", "freeze_llm"): "--freeze_llm",
    ("model_args", "freeze_backbone"): "--freeze_backbone",
    ("model_args", "freeze_mlp"): "--freeze_mlp",
    ("model_args", "unfreeze_vit_layers"): "--unfreeze_vit_layers",
    ("model", "architecture"): "the model's LLM architecture (LoRA target modules)",
    ("model", "hidden_size"): "the model's LLM hidden size",
    ("model", "num_hidden_layers"): "the model's LLM layer count",
    ("model", "vision_hidden_size"): "the model's vision hidden size",
}
# Settings that resume but change what the run does: warned about.
WARNED_CHANGES = {
    ("model_args", "model_name_or_path"): "model path",
    ("model_args", "load_in_4bit"): "--load_in_4bit",
    ("model_args", "bnb_4bit_quant_type"): "--bnb_4bit_quant_type",
    ("data_args", "max_seq_length"): "--max_seq_length",
    ("data_args", "min_num_frame"): "--min_num_frame",
    ("data_args", "max_num_frame"): "--max_num_frame",
    ("data_args", "force_image_size"): "--force_image_size",
    ("data_args", "conv_style"): "--conv_style",
    ("data_args", "loss_reduction"): "--loss_reduction",
    ("training_args", "learning_rate"): "learning rate (LR)",
    ("training_args", "num_train_epochs"): "epochs (EPOCHS)",
    ("training_args", "max_steps"): "--max_steps",
    ("training_args", "per_device_train_batch_size"): "per-device batch size",
    ("training_args", "gradient_accumulation_steps"): "gradient accumulation",
    ("training_args", "lr_scheduler_type"): "--lr_scheduler_type",
    ("training_args", "weight_decay"): "--weight_decay",
    ("training_args", "seed"): "--seed",
    ("training_args", "bf16"): "--bf16",
    ("training_args", "fp16"): "--fp16",
    ("data", "meta_sha256"): "meta.json content",
    ("data", "annotation_sha256"): "annotation files' content",
}


class RunRefused(ValueError):
    """A run that must not start (or go on): one line with the cause and the fix."""


# -- the output folder -------------------------------------------------------------------------------------------


def check_output_dir(output_dir: str | os.PathLike, model_path: str | os.PathLike) -> None:
    """Refuse an output folder that would overwrite or delete the base model, or that cannot be written."""
    output, model = Path(output_dir).resolve(), Path(model_path).resolve()
    fix = "set OUTPUT_DIR (--output_dir) to a folder of its own, e.g. work_dirs/<run name>"
    if output == model:
        raise RunRefused(f"--output_dir {output_dir} is the base model folder --model_name_or_path {model_path}: "
                         f"training would overwrite its config.json and tokenizer; {fix}")
    if model in output.parents:
        raise RunRefused(f"--output_dir {output_dir} is inside the base model folder {model_path}; {fix}")
    if output in model.parents:
        first = model.relative_to(output).parts[0]
        if _CHECKPOINT_NAME.match(first):
            raise RunRefused(f"the base model {model_path} is inside {first} of --output_dir {output_dir}, which "
                             f"checkpoint rotation and --overwrite_output_dir delete; copy the model elsewhere or {fix}")
    reason = unwritable_folder_reason(output)
    if reason:
        raise RunRefused(f"--output_dir {output_dir} {reason}; {fix}")


def refuse_if_in_use(output_dir: str | os.PathLike) -> None:
    """``RunRefused`` when a run holds ``output_dir`` (for a check before the run, which takes the lock itself)."""
    holder = lock_holder(Path(output_dir) / LOCK_NAME)
    if holder:
        raise _in_use(Path(output_dir), holder)


def _in_use(output_dir: Path, holder: str) -> RunRefused:
    return RunRefused(f"{output_dir} is in use by another training run ({holder}); two runs in one output folder "
                      "would mix their checkpoints: wait for it to end, or set OUTPUT_DIR to another folder")


@contextmanager
def output_dir_lock(output_dir: str | os.PathLike):
    """Hold the output folder for the duration of the block; ``RunRefused`` when another run holds it."""
    try:
        with exclusive_lock(Path(output_dir) / LOCK_NAME):
            yield
    except LockHeldError as held:
        raise _in_use(Path(output_dir), held.holder) from None


# -- the run record and resuming ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_shape(model_path: str) -> dict:
    """What decides the trained tensors' shapes, from the model's config.json in either layout (empty when it cannot
    be read): the same for a model's official and -hf folders, so a run may resume on the other one."""
    from internvl.model.hf_layout import read_model_config

    try:
        config = read_model_config(model_path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    llm = config.llm_config
    return {
        "architecture": (llm.architectures or [None])[0],
        "hidden_size": llm.hidden_size,
        "num_hidden_layers": llm.num_hidden_layers,
        "vision_hidden_size": config.vision_config.hidden_size,
    }


def _data_fingerprint(meta_path: str) -> dict:
    """Content hashes of meta.json and of the annotation files it names (those that exist)."""
    from internvl.data.dataset import load_meta

    try:
        meta_hash = _sha256(Path(meta_path))
        annotations = {spec.name: _sha256(spec.annotation) for spec in load_meta(meta_path)}
    except (OSError, ValueError):
        return {}
    return {"meta_sha256": meta_hash, "annotation_sha256": annotations}


def build_run_record(model_args, data_args, training_args, world_size: int) -> dict:
    """``run_args.json``: the resolved arguments of a run, the model's shape and the data's content hashes."""
    return {
        "model_args": asdict(model_args),
        "data_args": asdict(data_args),
        "training_args": training_args.to_dict(),
        "world_size": world_size,
        "model": _model_shape(model_args.model_name_or_path),
        "data": _data_fingerprint(data_args.meta_path),
    }


def save_run_record(folder: str | os.PathLike, record: dict) -> None:
    atomic_write_text(Path(folder) / RUN_ARGS_NAME, json.dumps(record, indent=2, default=str) + "\n")


def _recorded(checkpoint: Path) -> tuple[dict | None, Path]:
    """The run record a checkpoint was trained with: its own, or (checkpoints of older versions) the output
    folder's, written by the launch that made it."""
    for path in (checkpoint / RUN_ARGS_NAME, checkpoint.parent / RUN_ARGS_NAME):
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8")), path
            except ValueError:
                continue
    return None, checkpoint / RUN_ARGS_NAME


def _value(record: dict, section: str, key: str):
    value = (record.get(section) or {}).get(key)
    return json.loads(json.dumps(value, default=str))  # as run_args.json stores it


def _changes(old: dict, new: dict, watched: dict) -> list[str]:
    changes = []
    for (section, key), label in watched.items():
        if section not in old or key not in (old.get(section) or {}):
            continue  # not recorded by the version that wrote the checkpoint
        before, after = _value(old, section, key), _value(new, section, key)
        if before != after:
            shown = "changed" if isinstance(before, (dict, list)) or "sha256" in key else f"{before} -> {after}"
            changes.append(f"{label} {shown}")
    return changes


def check_resume(checkpoint: str | os.PathLike, record: dict) -> list[str]:
    """Compare the new run's record with the one ``checkpoint`` was trained with: ``RunRefused`` for what cannot
    resume, the lines to warn with for the rest."""
    checkpoint = Path(checkpoint)
    old, source = _recorded(checkpoint)
    if old is None:
        return [f"{source} is missing: the resumed run's settings are not compared with the checkpoint's"]
    refused = _changes(old, record, REFUSED_CHANGES)
    # A DeepSpeed checkpoint holds one optimizer-state partition per process, which DeepSpeed cannot re-partition.
    written_by_deepspeed = bool(_value(old, "training_args", "deepspeed"))
    if written_by_deepspeed and old.get("world_size", record["world_size"]) != record["world_size"]:
        refused.append(f"process count (GPUS x NNODES) {old['world_size']} -> {record['world_size']}: DeepSpeed "
                       "partitions the optimizer state per process")
    if refused:
        raise RunRefused(f"cannot resume from {checkpoint}: {'; '.join(refused)} (see {source}); rerun with the "
                         "checkpoint's settings, or pass --overwrite_output_dir True (or a new OUTPUT_DIR) to start "
                         "over")
    warned = _changes(old, record, WARNED_CHANGES)
    if warned:
        return [f"resuming from {checkpoint} with changed settings: {'; '.join(warned)} (the checkpoint's are in "
                f"{source})"]
    return []


class RunRecordCallback(TrainerCallback):
    """Every checkpoint carries the run record it was trained with, for ``check_resume``."""

    def __init__(self, record: dict):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and checkpoint.is_dir():
            save_run_record(checkpoint, self.record)


# -- all of it, before anything is loaded ------------------------------------------------------------------------


def parse_args_for_checks(argv: list[str]):
    """The training arguments as training parses them (what it refuses raises here), in a process that trains
    nothing: set up for the CPU, so that parsing touches no GPU (the launcher would otherwise hold a CUDA context on
    the first GPU for the whole run)."""
    from internvl.train.arguments import parse_args

    return parse_args([*argv, "--use_cpu", "True"])


def resume_checkpoint(training_args) -> Path | None:
    """The checkpoint a run resumes from (``--resume_from_checkpoint``, or the output folder's last complete one
    unless ``--overwrite_output_dir``), refused in one line when it is damaged."""
    if training_args.resume_from_checkpoint:
        checkpoint = Path(training_args.resume_from_checkpoint)
        if not checkpoint.is_dir():
            raise RunRefused(f"--resume_from_checkpoint {checkpoint} is not a folder; give a checkpoint-N folder")
    elif training_args.overwrite_output_dir:
        return None
    else:
        checkpoint, _ = last_complete_checkpoint(training_args.output_dir)
        if checkpoint is None:
            return None
    problem = damaged_checkpoint_message(checkpoint, list_checkpoints(checkpoint.parent))
    if problem:
        raise RunRefused(problem)
    return checkpoint


def preflight(model_args, data_args, training_args, world_size: int) -> tuple[dict, list[str]]:
    """Every check a run can make without loading the model; ``RunRefused`` (one line) for the first that fails.
    Returns the run record and the warnings to print."""
    from internvl.data.dataset import load_meta

    model_path = Path(model_args.model_name_or_path)
    if not (model_path / "config.json").is_file():
        what = "does not exist" if not model_path.exists() else "has no config.json"
        raise RunRefused(f"--model_name_or_path {model_path} {what}: give a local InternVL checkpoint folder "
                         "(MODEL_PATH; bash scripts/download_internvl3_models.sh fetches InternVL3-8B)")
    try:
        load_meta(data_args.meta_path)
    except (OSError, ValueError) as error:
        raise RunRefused(str(error)) from None
    warnings = []
    record = build_run_record(model_args, data_args, training_args, world_size)
    if training_args.do_train:
        check_output_dir(training_args.output_dir, model_path)
        checkpoint = resume_checkpoint(training_args)
        if checkpoint is not None:
            warnings += check_resume(checkpoint, record)
    return record, warnings
