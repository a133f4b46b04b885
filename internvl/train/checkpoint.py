"""What a training run writes and how it picks up again.

The output folder (and every ``checkpoint-N``) holds the trained weights only:
- ``adapter_config.json`` + ``adapter_model.safetensors``: the LLM LoRA adapter in peft's format, loadable with
  ``PeftModel.from_pretrained(model.language_model, folder)``; ``base_model_name_or_path`` names the InternVL
  checkpoint it was trained on;
- ``vision_adapter/``: the same for the vision tower, with ``--use_backbone_lora``;
- ``non_lora_trainables.safetensors``: any other trained tensors (the projector with ``--freeze_mlp False``,
  vision layers with ``--unfreeze_vit_layers``), under their parameter names in the training model;
- ``config.json`` (``InternVLChatConfig`` with ``use_llm_lora`` / ``use_backbone_lora`` set, without the 4-bit
  ``quantization_config``: the adapters apply to the original checkpoint) and the tokenizer.

Under ZeRO-3 parameters are partitioned across ranks; saving them without gathering writes empty or stale
tensors (the all-zero ``lora_B`` of official issue #905), so every rank first joins a gather of the trainable
parameters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from internvl.data.files import atomic_path, atomic_write_text, honour_umask
from internvl.model.adapters import ADAPTER_FOLDERS, NON_LORA_WEIGHTS_NAME

TRAINER_STATE_NAME = "trainer_state.json"
# DeepSpeed's checkpoint names the folder (tag) holding its partitions in this file.
DEEPSPEED_LATEST_NAME = "latest"
PEFT_MODEL_CARD_NAME = "README.md"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def gather_trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of all trainable parameters, gathered from their ZeRO-3 partitions. Call it on every rank."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            with _gathered(param):
                state[name] = param.detach().to("cpu", copy=True)
    return state


def _gathered(param: torch.nn.Parameter):
    """The whole parameter for the duration of the block (ZeRO-3 keeps only a partition of it per rank)."""
    if not hasattr(param, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param])


def _is_adapter_tensor(name: str) -> bool:
    return ".lora_" in name


def save_trained_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], output_dir: Path, *, base_model_path: str
) -> None:
    """Write ``state`` (from :func:`gather_trainable_state_dict`) as described in the module docstring."""
    output_dir.mkdir(parents=True, exist_ok=True)
    remaining = dict(state)
    for attr, folder in ADAPTER_FOLDERS.items():
        submodule = getattr(model, attr, None)
        if not isinstance(submodule, PeftModel):
            continue
        prefix = f"{attr}."
        adapter_keys = [k for k in remaining if k.startswith(prefix) and _is_adapter_tensor(k)]
        adapter_state = {k.removeprefix(prefix): remaining.pop(k) for k in adapter_keys}
        for config in submodule.peft_config.values():
            config.base_model_name_or_path = base_model_path
        _save_peft_adapter(submodule, adapter_state, output_dir / folder)
    if remaining:
        with atomic_path(output_dir / NON_LORA_WEIGHTS_NAME) as tmp_path:
            save_file({k: v.contiguous() for k, v in remaining.items()}, str(tmp_path))
            honour_umask(tmp_path)  # safetensors writes its files private (0600)
    config = json.loads(model.config.to_json_string(use_diff=False))
    # The adapters apply to the original (unquantized) checkpoint; how the base was loaded for training is
    # recorded in run_args.json, not here, so the config stays an official one.
    config.pop("quantization_config", None)
    atomic_write_text(output_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_peft_adapter(peft_model: PeftModel, adapter_state: dict[str, torch.Tensor], target: Path) -> None:
    """peft's own writer, into a scratch folder first; each file then replaces its old version in one rename."""
    target.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".adapter.", dir=target))
    try:
        # Embeddings are never LoRA targets here, so peft need not look up the base model to decide.
        peft_model.save_pretrained(
            scratch, state_dict=adapter_state, safe_serialization=True, save_embedding_layers=False
        )
        for file in scratch.iterdir():
            # peft's README.md is an empty template; the run writes its own model card (internvl.train.model_card).
            if file.is_file() and file.name != PEFT_MODEL_CARD_NAME:
                honour_umask(file)
                os.replace(file, target / file.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_trained_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Load what :func:`save_trained_weights` wrote into a model loaded and wrapped the same way (LoRA ranks,
    freezing). Used to resume without DeepSpeed, whose own checkpoints restore the weights otherwise."""
    folder = Path(folder)
    for attr, subfolder in ADAPTER_FOLDERS.items():
        submodule = getattr(model, attr, None)
        if not isinstance(submodule, PeftModel):
            continue
        adapter_file = folder / subfolder / "adapter_model.safetensors"
        if not adapter_file.is_file():
            raise FileNotFoundError(f"{adapter_file} is missing: {folder} holds no {attr} adapter to resume from")
        result = set_peft_model_state_dict(submodule, load_file(adapter_file))
        if result.unexpected_keys:
            raise ValueError(f"{adapter_file} does not fit the model: unexpected {result.unexpected_keys[:5]}")
    non_lora_file = folder / NON_LORA_WEIGHTS_NAME
    if non_lora_file.is_file():
        result = model.load_state_dict(load_file(non_lora_file), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{non_lora_file} does not fit the model: unexpected {result.unexpected_keys[:5]}")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))


def last_complete_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint whose trainer state was written (the trainer writes it last), and the newer
    incomplete ones (a run killed while saving) that are skipped."""
    incomplete = []
    for checkpoint in reversed(list_checkpoints(output_dir)):
        if (checkpoint / TRAINER_STATE_NAME).is_file():
            return checkpoint, incomplete
        incomplete.append(checkpoint)
    return None, incomplete


def _unreadable(path: Path) -> str | None:
    """Why a file of a checkpoint cannot be loaded (its structure only: JSON, safetensors header and length, the
    zip directory of a ``torch.save`` file), or None."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with safe_open(path, framework="pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path):
                pass
    except Exception as error:  # OSError, JSON and zip errors, and safetensors' own SafetensorError
        return f"{type(error).__name__}: {error}"
    return None


def verify_checkpoint(folder: str | os.PathLike) -> str | None:
    """What makes a complete checkpoint unloadable (``file: reason``), or None. Reads headers only, not the
    tensors: a file cut short (an interrupted copy, a full disk) is found, a flipped bit inside a tensor is not."""
    folder = Path(folder)
    latest = folder / DEEPSPEED_LATEST_NAME
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not (folder / tag).is_dir() or not list((folder / tag).glob("*model_states.pt")):
            return f"{latest.name}: names DeepSpeed state {tag!r}, which is missing"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        problem = _unreadable(path)
        if problem:
            return f"{path.relative_to(folder)}: {problem}"
    return None


def damaged_checkpoint_message(checkpoint: str | os.PathLike, candidates: list[Path]) -> str | None:
    """None when ``checkpoint`` loads; else one line naming the damaged file and the newest earlier checkpoint of
    ``candidates`` that is complete and intact, with the flag that resumes from it."""
    checkpoint = Path(checkpoint)
    problem = verify_checkpoint(checkpoint)
    if problem is None:
        return None
    earlier = [c for c in candidates if _step(c) < _step(checkpoint) and (c / TRAINER_STATE_NAME).is_file()]
    intact = next((c for c in reversed(earlier) if verify_checkpoint(c) is None), None)
    if intact is None:
        advice = "no earlier checkpoint is intact: delete it, or pass --overwrite_output_dir True to start over"
    else:
        advice = (f"{intact.name} is intact: resume from it with --resume_from_checkpoint {intact} (or delete "
                  f"{checkpoint.name} and rerun)")
    return f"checkpoint {checkpoint} is damaged ({problem}); {advice}"


def _step(checkpoint: Path) -> int:
    match = _CHECKPOINT_RE.match(checkpoint.name)
    return int(match.group(1)) if match else -1


class CheckpointWriteError(OSError):
    """Saving a checkpoint or the final weights failed: the message names the folder, the last file written and
    the free disk space."""


def checkpoint_write_error(folder: str | os.PathLike, error: BaseException) -> CheckpointWriteError:
    """The one-line error for a failed save into ``folder``. Libraries word disk-full differently (torch's C++
    writer says "basic_ios::clear: iostream error"), so the free space is measured and reported as well."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    newest = max(files, key=lambda p: p.stat().st_mtime_ns, default=None)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    written = f" (last file written: {newest.relative_to(folder)})" if newest else ""
    return CheckpointWriteError(
        f"saving {folder} failed{written}: {cause}; {free / 2**20:.1f} MiB free on its disk: free space or set "
        "OUTPUT_DIR on a larger disk (--save_total_limit bounds the checkpoints kept), then rerun to resume from the "
        "last complete checkpoint"
    )
