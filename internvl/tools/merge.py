"""A training output's LoRA adapters on their base model: loaded for inference, or merged into a full checkpoint.

Three kinds of model folder are understood (``resolve_model_source``):

- a **training output** of this toolkit (or one of its ``checkpoint-N``): a peft adapter for the LLM
  (``adapter_config.json`` + ``adapter_model.safetensors``), optionally ``vision_adapter/`` and
  ``non_lora_trainables.safetensors``, the training ``config.json`` and the tokenizer; the base model is named
  by the adapter's ``base_model_name_or_path`` or given explicitly;
- an **official-style LoRA checkpoint**: full weights with the LoRA layers inside and ``use_llm_lora`` /
  ``use_backbone_lora`` set in ``config.json`` (what the official fine-tune script saves);
- a **plain model** in the official layout (a base or an already merged model).

Merging writes the official layout (``vision_model.*``, ``mlp1.*``, ``language_model.model.*``,
``language_model.lm_head.weight``) with both LoRA ranks reset to 0, so the result loads with the official remote
code and with ``InternVLChatModel``. The LoRA update is added to the base model's original (bf16) weights, not to
the 4-bit NF4 weights a QLoRA adapter was trained against; see docs/EVALUATION.md.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from safetensors.torch import load_file

from internvl.data.files import atomic_directory, atomic_write_text
from internvl.model import InternVLChatConfig, InternVLChatModel, load_internvl_model, load_tokenizer
from internvl.model.internvl_chat import quiet_peft_wrapping
from internvl.model.loading import OVERRIDABLE_FIELDS, OVERRIDABLE_VISION_FIELDS
from internvl.train.checkpoint import ADAPTER_FOLDERS, NON_LORA_WEIGHTS_NAME

MERGE_INFO_NAME = "merge_info.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_TOKENIZER_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class ModelSource:
    """Where the pieces of a model come from. ``base_model`` is set only for adapter training outputs."""

    path: Path
    base_model: Path | None = None
    llm_adapter: Path | None = None
    vision_adapter: Path | None = None
    non_lora_weights: Path | None = None
    lora_in_weights: bool = False  # official-style checkpoint whose weights hold the LoRA layers

    @property
    def has_lora(self) -> bool:
        return self.lora_in_weights or self.llm_adapter is not None or self.vision_adapter is not None

    @property
    def weights_dir(self) -> Path:
        """The folder the full (non-adapter) weights are read from."""
        return self.base_model or self.path

    def describe(self) -> str:
        if self.base_model is None:
            return f"{self.path} ({'LoRA inside the weights' if self.lora_in_weights else 'full model'})"
        parts = [name for name, p in (("LLM", self.llm_adapter), ("vision", self.vision_adapter)) if p]
        extra = f" + {NON_LORA_WEIGHTS_NAME}" if self.non_lora_weights else ""
        return f"{self.path} ({' and '.join(parts)} LoRA adapter{extra}) on base {self.base_model}"


def _adapter_base_reference(adapter_dir: Path) -> str | None:
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    return config.get("base_model_name_or_path")


def resolve_model_source(path: str | Path, base_model: str | Path | None = None) -> ModelSource:
    """Work out what ``path`` holds (see the module docstring); ``base_model`` overrides the adapter's reference."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    llm_adapter = path / ADAPTER_FOLDERS["language_model"]
    vision_adapter = path / ADAPTER_FOLDERS["vision_model"]
    llm_adapter = llm_adapter if (llm_adapter / ADAPTER_CONFIG_NAME).is_file() else None
    vision_adapter = vision_adapter if (vision_adapter / ADAPTER_CONFIG_NAME).is_file() else None

    if llm_adapter is None and vision_adapter is None:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} holds neither a model (config.json) nor a LoRA adapter ({ADAPTER_CONFIG_NAME})"
            )
        if base_model is not None:
            raise ValueError(f"--base-model was given but {path} is a full model, not an adapter training output")
        config = InternVLChatConfig.from_pretrained(path)
        return ModelSource(path=path, lora_in_weights=bool(config.use_llm_lora or config.use_backbone_lora))

    if base_model is None:
        reference = _adapter_base_reference(llm_adapter or vision_adapter)
        if not reference or not (Path(reference) / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a LoRA training output whose adapter names the base model {reference!r}, which is not a "
                "model folder here; pass the base InternVL checkpoint explicitly with --base-model PATH"
            )
        base_model = reference
    base_model = Path(base_model)
    if not (base_model / "config.json").is_file():
        raise FileNotFoundError(f"base model {base_model} has no config.json: expected an InternVL checkpoint folder")
    non_lora = path / NON_LORA_WEIGHTS_NAME
    return ModelSource(
        path=path,
        base_model=base_model,
        llm_adapter=llm_adapter,
        vision_adapter=vision_adapter,
        non_lora_weights=non_lora if non_lora.is_file() else None,
    )


def _training_overrides(source: ModelSource) -> dict:
    """The model settings the training run used (template, tiling, ...), from its ``config.json``."""
    if source.base_model is None or not (source.path / "config.json").is_file():
        return {}
    trained = InternVLChatConfig.from_pretrained(source.path)
    overrides = {key: getattr(trained, key) for key in OVERRIDABLE_FIELDS}
    overrides.update({key: getattr(trained.vision_config, key) for key in OVERRIDABLE_VISION_FIELDS})
    return overrides


def _load_non_lora_weights(model: InternVLChatModel, weights_path: Path) -> None:
    """Trained tensors other than LoRA (e.g. the projector), saved under the training model's parameter names."""
    state = load_file(str(weights_path))
    parameters = dict(model.named_parameters())
    unknown = sorted(set(state) - set(parameters))
    if unknown:
        raise ValueError(
            f"{weights_path} holds tensors the model does not have ({', '.join(unknown[:5])}); it was written by a "
            "training run with a different model or LoRA setup than the base model and adapters given"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))


def load_model(
    source: ModelSource,
    *,
    load_in_4bit: bool = False,
    torch_dtype: torch.dtype = torch.bfloat16,
    device_map: str | dict | None = None,
):
    """``(model, tokenizer)`` for a resolved source, adapters attached (not merged), in eval mode."""
    model = load_internvl_model(
        source.weights_dir,
        load_in_4bit=load_in_4bit,
        torch_dtype=torch_dtype,
        device_map=device_map,
        config_overrides=_training_overrides(source),
    )
    if source.vision_adapter is not None:
        model.vision_model = PeftModel.from_pretrained(model.vision_model, source.vision_adapter)
    if source.llm_adapter is not None:
        with quiet_peft_wrapping():
            model.language_model = PeftModel.from_pretrained(model.language_model, source.llm_adapter)
    if source.non_lora_weights is not None:
        _load_non_lora_weights(model, source.non_lora_weights)
    # The training output's tokenizer is the one the adapter was trained with; the base model's is the same file.
    tokenizer_dir = source.path if (source.path / _TOKENIZER_FILE).is_file() else source.weights_dir
    return model.eval(), load_tokenizer(tokenizer_dir)


def load_model_for_inference(
    path: str | Path,
    *,
    base_model: str | Path | None = None,
    load_in_4bit: bool = False,
    torch_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
):
    """``(model, tokenizer, source)`` for a base, merged or adapter model folder, on ``device`` (default: the
    first GPU if there is one, else the CPU)."""
    source = resolve_model_source(path, base_model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_map = {"": device} if device.type == "cuda" else None
    model, tokenizer = load_model(source, load_in_4bit=load_in_4bit, torch_dtype=torch_dtype, device_map=device_map)
    if device_map is None and not load_in_4bit:
        model.to(device)
    return model, tokenizer, source


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
) -> dict:
    """Write the merged model of ``input_path`` into ``output_path`` (official layout, sharded safetensors).

    The folder is assembled in a temporary sibling and renamed into place when complete. Remote-code files
    (``*.py``) of the base checkpoint are copied along, so ``AutoModel.from_pretrained(..., trust_remote_code=True)``
    works on the result as on the base. Returns the facts written to ``merge_info.json``.
    """
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
        "merged_onto": (
            f"the base model's original {str(torch_dtype).removeprefix('torch.')} weights, not the 4-bit NF4 "
            "weights a QLoRA adapter was trained against"
        ),
    }
    with atomic_directory(output_path) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        for code_file in sorted(source.weights_dir.glob("*.py")):
            shutil.copy2(code_file, staging / code_file.name)
        atomic_write_text(staging / MERGE_INFO_NAME, json.dumps(info, indent=2) + "\n")
    return info
