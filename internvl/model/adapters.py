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
``internvl.model.loading``, as for training. Adapter files are checked before any weight is loaded: a missing or
damaged file, or an adapter trained on a base of another size, is one error naming the file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from safetensors import safe_open
from safetensors.torch import load_file

from internvl.model.configuration import InternVLChatConfig
from internvl.model.hf_layout import read_model_config
from internvl.model.internvl_chat import InternVLChatModel, quiet_peft_wrapping
from internvl.model.loading import OVERRIDABLE_FIELDS, OVERRIDABLE_VISION_FIELDS, load_internvl_model, load_tokenizer

# The sub-modules that ``wrap_llm_lora`` / ``wrap_backbone_lora`` turn into peft models, and where their adapters go.
ADAPTER_FOLDERS = {"language_model": ".", "vision_model": "vision_adapter"}
NON_LORA_WEIGHTS_NAME = "non_lora_trainables.safetensors"
_TOKENIZER_FILE = "tokenizer_config.json"
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


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

    @property
    def weight_files(self) -> list[Path]:
        """The files whose content decides the loaded weights: adapters, other trained tensors, the training
        config, and the full weights they apply to."""
        files = [folder / name for folder in (self.llm_adapter, self.vision_adapter) if folder is not None
                 for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME)]  # fmt: skip
        if self.non_lora_weights is not None:
            files.append(self.non_lora_weights)
        if self.base_model is not None:
            files.append(self.path / "config.json")
        return [*files, *sorted(self.weights_dir.glob("*.safetensors"))]

    def describe(self) -> str:
        if self.base_model is None:
            return f"{self.path} ({'LoRA inside the weights' if self.lora_in_weights else 'full model'})"
        parts = [name for name, p in (("LLM", self.llm_adapter), ("vision", self.vision_adapter)) if p]
        extra = f" + {NON_LORA_WEIGHTS_NAME}" if self.non_lora_weights else ""
        return f"{self.path} ({' and '.join(parts)} LoRA adapter{extra}) on base {self.base_model}"


def _adapter_config(adapter_dir: Path) -> dict:
    config_file = adapter_dir / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{config_file} cannot be read ({error}); copy the adapter folder again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a peft adapter config; copy the adapter folder again")
    return config


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """The tensor shapes a safetensors file declares (its header only); a missing or damaged file is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the adapter folder is incomplete; copy it again, or use one "
                                "of the training output's checkpoint-N folders")
    try:
        with safe_open(path, framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as error:  # safetensors reports a damaged file as its own SafetensorError
        raise ValueError(f"{path} is damaged ({error}); copy it again, or use one of the training output's "
                         "checkpoint-N folders") from None


def _check_adapter_fits(adapter_dir: Path, base_model: Path, part: str) -> None:
    """The adapter's tensors against the base model's config: the input width most LoRA A matrices have is the
    hidden size the adapter was trained with, and its layer indices must be the base's."""
    _adapter_config(adapter_dir)
    shapes = _tensor_shapes(adapter_dir / ADAPTER_WEIGHTS_NAME)
    config = read_model_config(base_model)
    base = config.llm_config if part == "language_model" else config.vision_config
    widths = Counter(shape[1] for key, shape in shapes.items() if ".lora_A." in key and len(shape) == 2)
    layers = {int(m.group(1)) for key in shapes if (m := _LAYER_INDEX.search(key))}
    what = "LLM" if part == "language_model" else "vision tower"
    if widths and base.hidden_size not in widths:
        trained = widths.most_common(1)[0][0]
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS_NAME}: this adapter was trained on a model with {what} "
                         f"hidden size {trained}, but the base model {base_model} has {base.hidden_size}; pass the "
                         "base model it was trained on with --base-model")
    if layers and max(layers) + 1 != base.num_hidden_layers:
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS_NAME}: this adapter was trained on a model with "
                         f"{max(layers) + 1} {what} layers, but the base model {base_model} has "
                         f"{base.num_hidden_layers}; pass the base model it was trained on with --base-model")


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
        reference = _adapter_config(llm_adapter or vision_adapter).get("base_model_name_or_path")
        if not reference or not (Path(reference) / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a LoRA training output whose adapter names the base model {reference!r}, which is not a "
                "model folder here; pass the base InternVL checkpoint explicitly with --base-model PATH"
            )
        base_model = reference
    base_model = Path(base_model)
    if not (base_model / "config.json").is_file():
        raise FileNotFoundError(f"base model {base_model} has no config.json: expected an InternVL checkpoint folder")
    for part, adapter in (("language_model", llm_adapter), ("vision_model", vision_adapter)):
        if adapter is not None:
            _check_adapter_fits(adapter, base_model, part)
    non_lora = path / NON_LORA_WEIGHTS_NAME
    if non_lora.is_file():
        _tensor_shapes(non_lora)
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
    wrong = [f"{name} {list(tensor.shape)} vs {list(parameters[name].shape)}" for name, tensor in state.items()
             if tensor.shape != parameters[name].shape]  # fmt: skip
    if wrong:
        raise ValueError(f"{weights_path} holds tensors of other shapes than the base model's ({', '.join(wrong[:3])}): "
                         "it was trained on another base model; pass that one with --base-model")
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

