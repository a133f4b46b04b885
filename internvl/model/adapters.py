"""A model folder for inference: a base or merged model, or a training output's LoRA adapters on their base model.

Three kinds of model folder are understood (``resolve_model_source``):

- a **training output** of this toolkit (or one of its ``checkpoint-N``): a peft adapter for the LLM
  (``adapter_config.json`` + ``adapter_model.safetensors``), optionally ``vision_adapter/`` and
  ``non_lora_trainables.safetensors``, the training ``config.json`` and the tokenizer; the base model is named
  by the adapter's ``base_model_name_or_path`` or given explicitly;
- an **official-style LoRA checkpoint**: full weights with the LoRA layers inside and ``use_llm_lora`` /
  ``use_backbone_lora`` set in ``config.json`` (what the official fine-tune script saves);
- a **plain model** in the official or the -hf layout (a base or an already merged model).

The adapter file names are the ones ``internvl.train.checkpoint`` writes. Dtype, 4-bit and device are decided by
``internvl.model.loading``, as for training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from safetensors.torch import load_file

from internvl.model.configuration import InternVLChatConfig
from internvl.model.hf_layout import read_model_config
from internvl.model.internvl_chat import InternVLChatModel, quiet_peft_wrapping
from internvl.model.loading import OVERRIDABLE_FIELDS, OVERRIDABLE_VISION_FIELDS, load_internvl_model, load_tokenizer

# The sub-modules that ``wrap_llm_lora`` / ``wrap_backbone_lora`` turn into peft models, and where their adapters go.
ADAPTER_FOLDERS = {"language_model": ".", "vision_model": "vision_adapter"}
NON_LORA_WEIGHTS_NAME = "non_lora_trainables.safetensors"
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
        config = read_model_config(path)
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

