"""A training output's LoRA adapters merged into a full checkpoint, in the official layout or the -hf one.

The input is any model folder with LoRA (``internvl.model.adapters.resolve_model_source``: a training output's
adapters on their base model, in either layout, or an official-style checkpoint with the LoRA layers inside).
Merging writes, by default, the official layout (``vision_model.*``, ``mlp1.*``, ``language_model.model.*``,
``language_model.lm_head.weight``) with both LoRA ranks reset to 0, so the result loads with the official remote
code and with ``InternVLChatModel``; ``layout="hf"`` writes transformers' ``InternVLForConditionalGeneration``
layout instead (``internvl.model.hf_layout``), for transformers, vLLM, LLaMA-Factory and Axolotl. The LoRA update
is added to the base model's original (bf16) weights, not to the 4-bit NF4 weights a QLoRA adapter was trained
against; see docs/EVALUATION.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel

from internvl.data.files import atomic_directory, atomic_write_text
from internvl.model import InternVLChatModel
from internvl.model.adapters import ModelSource, load_model, resolve_model_source
from internvl.model.hf_layout import HF_LAYOUT, LAYOUTS, ORIGINAL_LAYOUT, save_in_hf_layout

MERGE_INFO_NAME = "merge_info.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"


def merge_adapters(model: InternVLChatModel) -> None:
    """Fold every LoRA adapter into its base weights, in place, and reset the LoRA ranks in the config."""
    if isinstance(model.vision_model, PeftModel):
        model.vision_model = model.vision_model.merge_and_unload(safe_merge=True)
    if isinstance(model.language_model, PeftModel):
        model.language_model = model.language_model.merge_and_unload(safe_merge=True)
    model.config.use_backbone_lora = 0
    model.config.use_llm_lora = 0


def _lora_ranks(model: InternVLChatModel) -> dict[str, int]:
    return {
        name: next(iter(module.peft_config.values())).r
        for name, module in (("llm", model.language_model), ("vision", model.vision_model))
        if isinstance(module, PeftModel)
    }


def _check_output_path(output_path: Path, source: ModelSource, overwrite: bool) -> None:
    protected = {source.path.resolve(), source.weights_dir.resolve()}
    if output_path.resolve() in protected:
        raise ValueError(f"the merge output {output_path} must differ from the input and base model folders")
    if output_path.exists() and any(output_path.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_path} exists and is not empty; choose a new folder or pass --overwrite")


def merge_lora(
    input_path: str | Path,
    output_path: str | Path,
    *,
    base_model: str | Path | None = None,
    torch_dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    layout: str = ORIGINAL_LAYOUT,
) -> dict:
    """Write the merged model of ``input_path`` into ``output_path`` (sharded safetensors) in ``layout``:
    ``"original"`` (the official one) or ``"hf"``, from a base model in either layout.

    The folder is assembled in a temporary sibling and renamed into place when complete. In the official layout,
    remote-code files (``*.py``) of the base checkpoint are copied along, so
    ``AutoModel.from_pretrained(..., trust_remote_code=True)`` works on the result as on the base. Returns the facts
    written to ``merge_info.json``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    output_path = Path(output_path)
    source = resolve_model_source(input_path, base_model)
    if not source.has_lora:
        raise ValueError(f"{input_path} holds no LoRA adapter or LoRA layers: there is nothing to merge")
    _check_output_path(output_path, source, overwrite)

    # Unquantized: the LoRA update is added to the base model's original weights.
    model, tokenizer = load_model(source, load_in_4bit=False, torch_dtype=torch_dtype)
    ranks = _lora_ranks(model)
    merge_adapters(model)
    info = {
        "source": str(source.path),
        "base_model": str(source.weights_dir),
        "lora_ranks": ranks,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "layout": layout,
        "merged_onto": (
            f"the base model's original {str(torch_dtype).removeprefix('torch.')} weights, not the 4-bit NF4 "
            "weights a QLoRA adapter was trained against"
        ),
    }
    with atomic_directory(output_path) as staging:
        if layout == HF_LAYOUT:
            save_in_hf_layout(model, tokenizer, staging, max_shard_size=max_shard_size)
        else:
            model.save_pretrained(staging, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(staging)
            for code_file in sorted(source.weights_dir.glob("*.py")):
                shutil.copy2(code_file, staging / code_file.name)
        atomic_write_text(staging / MERGE_INFO_NAME, json.dumps(info, indent=2) + "\n")
    return info
