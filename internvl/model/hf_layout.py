"""transformers' own InternVL layout (the ``-hf`` checkpoints) and the official one, converted both ways.

Two layouts of the same weights are in use:

- the **original** (official) layout, ``model_type "internvl_chat"`` (e.g. ``OpenGVLab/InternVL3-8B``): what
  ``InternVLChatModel`` and the official remote code load;
- the **-hf** layout, ``model_type "internvl"`` with ``architectures ["InternVLForConditionalGeneration"]`` (e.g.
  ``OpenGVLab/InternVL3-8B-hf``): transformers' own class, used by LLaMA-Factory, Axolotl and vLLM. Its vision
  tower has separate q/k/v projections where InternViT has one fused ``qkv``, and its parts have other names.

``InternVLChatModel`` is always the model in memory: an -hf folder is read into it (its config converted by
``read_model_config``, its tensors renamed and the q/k/v projections fused while transformers loads them, so 4-bit
loading and ZeRO-3 work as for the original layout), and ``save_in_hf_layout`` writes it back as an -hf folder
(config, weights under the names transformers writes, tokenizer and processor files). The LLM's module names are
the same in both layouts, so a LoRA adapter of the LLM (keyed relative to it) applies to either base.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerBase,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, WeightConverter, WeightRenaming

from internvl.constants import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    VIDEO_PLACEHOLDER,
)
from internvl.conversation import Conversation, get_conv_template
from internvl.model.configuration import InternVLChatConfig, with_legacy_rope_keys
from internvl.model.internvl_chat import InternVLChatModel

ORIGINAL_LAYOUT = "original"
HF_LAYOUT = "hf"
LAYOUTS = (ORIGINAL_LAYOUT, HF_LAYOUT)
HF_MODEL_TYPE = "internvl"
HF_ARCHITECTURE = "InternVLForConditionalGeneration"

# The named tokens transformers' InternVL processor reads from the tokenizer. ``<video>`` is a processor
# placeholder, expanded to per-frame image tokens before tokenizing: -hf tokenizers add it past the embedding rows.
HF_TOKENIZER_TOKENS = {
    "start_image_token": IMG_START_TOKEN,
    "end_image_token": IMG_END_TOKEN,
    "context_image_token": IMG_CONTEXT_TOKEN,
    "video_token": VIDEO_PLACEHOLDER,
}
PROCESSOR_PLACEHOLDER_TOKENS = (VIDEO_PLACEHOLDER,)

# What InternVL3 checkpoints use where an -hf config says nothing (tiling and the chat template live in the
# processor there, not in the model config); the training flags override them.
HF_DEFAULT_SETTINGS = {
    "template": "internvl2_5",
    "dynamic_image_size": True,
    "use_thumbnail": True,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 12,
}

# ------------------------------------------------------------------------------------------------------------------
# Parameter names. Each pair is (original name, transformers' name); names are dotted paths matched on whole
# components. The parts of the composite model:
_PART_PREFIXES = (
    ("vision_model", "model.vision_tower"),
    ("mlp1", "model.multi_modal_projector"),
    ("language_model.model", "model.language_model"),
    ("language_model.lm_head", "lm_head"),
)
# Inside the vision tower:
_VISION_NAMES = (
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("embeddings.patch_embedding", "embeddings.patch_embeddings.projection"),
    ("encoder.layers", "encoder.layer"),
    ("attn.proj", "attention.projection_layer"),
    ("attn.q_norm", "attention.q_norm"),
    ("attn.k_norm", "attention.k_norm"),
    ("norm1", "layernorm_before"),
    ("norm2", "layernorm_after"),
    ("ls1", "lambda_1"),
    ("ls2", "lambda_2"),
)
# InternViT's fused attention input projection, split by rows into q, k, v (in that order) in transformers.
_FUSED_QKV = ("attn.qkv", ("attention.q_proj", "attention.k_proj", "attention.v_proj"))
# Inside the projector (``mlp1`` is a Sequential: LayerNorm, Linear, GELU, Linear):
_PROJECTOR_NAMES = (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2"))
# transformers 5 writes the composite's parts to disk under their transformers-4 names (and reads both).
_HF_DISK_PREFIXES = (
    ("model.vision_tower", "vision_tower"),
    ("model.multi_modal_projector", "multi_modal_projector"),
    ("model.language_model", "language_model.model"),
    ("lm_head", "language_model.lm_head"),
)


def _replace_component(key: str, old: str, new: str) -> str:
    """``key`` with the dotted path ``old`` replaced by ``new`` where it stands as whole components."""
    return ("." + key + ".").replace("." + old + ".", "." + new + ".", 1)[1:-1]


def hf_names(key: str) -> tuple[str, ...]:
    """transformers' names (in ``InternVLForConditionalGeneration``) of the tensor ``InternVLChatModel`` calls
    ``key``: one name, or the q, k, v names of a fused vision ``qkv``."""
    ours, theirs = next(((o, t) for o, t in _PART_PREFIXES if key.startswith(o + ".")), (None, None))
    if ours is None:
        raise KeyError(f"{key} belongs to no part of the InternVL model (vision_model, mlp1, language_model)")
    rest = key[len(ours) + 1 :]
    if ours == "vision_model":
        for old, new in _VISION_NAMES:
            rest = _replace_component(rest, old, new)
        fused, split = _FUSED_QKV
        if f".{fused}." in f".{rest}.":
            return tuple(f"{theirs}.{_replace_component(rest, fused, name)}" for name in split)
    elif ours == "mlp1":
        index, _, param = rest.partition(".")
        rest = f"{dict(_PROJECTOR_NAMES)[index]}.{param}"
    return (f"{theirs}.{rest}",)


def hf_disk_name(name: str) -> str:
    """The name transformers writes to disk for its parameter ``name``."""
    for in_memory, on_disk in _HF_DISK_PREFIXES:
        if name.startswith(in_memory + "."):
            return on_disk + name[len(in_memory) :]
    return name


def original_to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors under ``InternVLChatModel``'s names -> under ``InternVLForConditionalGeneration``'s (the fused
    vision ``qkv`` split by rows into q, k, v). Tensors are shared, not copied, except the split ones."""
    converted = {}
    for key, tensor in state_dict.items():
        names = hf_names(key)
        if len(names) == 1:
            converted[names[0]] = tensor
        else:
            converted.update((name, part.clone()) for name, part in zip(names, tensor.chunk(3), strict=True))
    return converted


def hf_weight_conversions() -> list[WeightRenaming | WeightConverter]:
    """transformers weight transforms that load an -hf checkpoint (either spelling of its names) into
    ``InternVLChatModel``: renames, then the fusing of q/k/v into ``qkv``. The names inside the vision tower and
    projector occur nowhere else in the model, so they are renamed wherever they stand."""

    def component(name: str) -> str:  # ``name`` as whole dotted components, in a key
        return r"\." + re.escape(name) + r"(?=\.|$)"

    renamings = []
    for ours, theirs in _PART_PREFIXES:
        # Both spellings of the part: transformers' in-memory name and the one it writes to disk.
        spellings = sorted({theirs, hf_disk_name(theirs + ".").removesuffix(".")} - {ours})
        renamings.append(WeightRenaming([f"^{re.escape(name)}\\." for name in spellings], f"{ours}."))
    renamings += [WeightRenaming(component(theirs), "." + ours) for ours, theirs in _VISION_NAMES]
    renamings += [WeightRenaming(r"^mlp1" + component(theirs), f"mlp1.{ours}") for ours, theirs in _PROJECTOR_NAMES]
    fused, split = _FUSED_QKV
    fuse_qkv = WeightConverter([component(name) for name in split], "." + fused, operations=[Concatenate(dim=0)])
    return [*renamings, fuse_qkv]


@contextlib.contextmanager
def reading_hf_layout() -> Iterator[None]:
    """While the block runs, ``InternVLChatModel.from_pretrained`` reads -hf checkpoints (``hf_weight_conversions``).

    The transforms are registered for the block only: registered for good, transformers would also apply them in
    reverse whenever an ``InternVLChatModel`` is saved, writing -hf tensor names beside the official config.
    """
    name = InternVLChatModel.__name__
    register_checkpoint_conversion_mapping(name, hf_weight_conversions(), overwrite=True)
    try:
        yield
    finally:
        register_checkpoint_conversion_mapping(name, None, overwrite=True)


def finish_hf_load(model: torch.nn.Module, loading_info: dict, path: str | Path) -> None:
    """Check that an -hf load placed every tensor, and make ``model.save_pretrained`` write the original layout
    again (transformers keeps the transforms a model was loaded with and reverses them on save)."""
    model._weight_conversions = None
    missing, unexpected = sorted(loading_info["missing_keys"]), sorted(loading_info["unexpected_keys"])
    # A tensor the conversion did not place would leave its parameter randomly initialised.
    if missing or unexpected:
        raise ValueError(
            f"the -hf checkpoint {path} does not map onto the InternVL model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; is it an InternVL2.5/InternVL3 checkpoint written by transformers?"
        )


# ------------------------------------------------------------------------------------------------------------------
# Configs


def checkpoint_layout(path: str | Path) -> str:
    """``"original"`` or ``"hf"``, from the model folder's ``config.json``."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: expected an InternVL checkpoint directory")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    return layout_of_config(raw, config_file)


def layout_of_config(raw: Any, source: str | Path = "config.json") -> str:
    """The layout a parsed ``config.json`` describes; ``source`` names it in the error."""
    raw = raw if isinstance(raw, dict) else {}
    model_type = raw.get("model_type")
    if model_type == InternVLChatConfig.model_type:
        return ORIGINAL_LAYOUT
    # A config without architectures is read as the full model; the bare InternVLModel has no LM head.
    if model_type == HF_MODEL_TYPE and HF_ARCHITECTURE in (raw.get("architectures") or [HF_ARCHITECTURE]):
        return HF_LAYOUT
    raise ValueError(
        f"{source}: model_type {model_type!r} is neither an InternVL checkpoint in the official layout "
        f"('{InternVLChatConfig.model_type}', e.g. OpenGVLab/InternVL3-8B) nor in transformers' layout "
        f"('{HF_MODEL_TYPE}' with architectures [{HF_ARCHITECTURE}], e.g. OpenGVLab/InternVL3-8B-hf); point to "
        "an InternVL2.5/InternVL3 chat checkpoint folder"
    )


def read_model_config(path: str | Path) -> InternVLChatConfig:
    """The ``InternVLChatConfig`` of a model folder in either layout."""
    path = Path(path)
    if checkpoint_layout(path) == ORIGINAL_LAYOUT:
        return InternVLChatConfig.from_pretrained(path)
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    try:
        return chat_config_from_hf(raw)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path / 'config.json'}: cannot read this -hf config: {error}") from error


def _square(value: Any, name: str) -> int:
    sides = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(sides) != 2 or sides[0] != sides[1]:
        raise ValueError(f"vision_config.{name} {value} is not square; InternViT uses square tiles and patches")
    return int(sides[0])


# Vision-tower config fields: (InternVisionConfig's name, InternVLVisionConfig's name).
_VISION_FIELDS = (
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_hidden_layers"),
    ("num_attention_heads", "num_attention_heads"),
    ("intermediate_size", "intermediate_size"),
    ("qkv_bias", "attention_bias"),
    ("qk_normalization", "use_qk_norm"),
    ("hidden_act", "hidden_act"),
    ("norm_type", "norm_type"),
    ("layer_norm_eps", "layer_norm_eps"),
    ("num_channels", "num_channels"),
    ("dropout", "hidden_dropout_prob"),
    ("attention_dropout", "attention_dropout"),
    ("initializer_range", "initializer_range"),
    ("initializer_factor", "layer_scale_init_value"),  # the official code's layer-scale init value
)
# The LLM class of an -hf text_config that does not name its architecture, by its model_type.
_LLM_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def chat_config_from_hf(raw: dict[str, Any]) -> InternVLChatConfig:
    """``InternVLChatConfig`` of a parsed -hf ``config.json``: what ``InternVLChatModel`` needs to hold the same
    weights. What the file leaves out has transformers' defaults, as when transformers reads it."""
    hf = InternVLConfig.from_dict(raw)
    vision = hf.vision_config
    required = {
        "vision_config.use_mean_pooling": (vision.use_mean_pooling, True),  # False adds a final norm
        "vision_config.use_mask_token": (vision.use_mask_token, False),
        "vision_config.use_absolute_position_embeddings": (vision.use_absolute_position_embeddings, True),
        "vision_feature_select_strategy": (hf.vision_feature_select_strategy, "default"),  # "full" keeps CLS
        "projector_hidden_act": (hf.projector_hidden_act, "gelu"),
    }
    for field, (value, expected) in required.items():
        if value != expected:
            raise ValueError(f"{field} is {value!r}; InternVL chat models have {expected!r}")
    if not isinstance(hf.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer {hf.vision_feature_layer!r}: only a single layer is supported")
    text = hf.text_config.to_dict()
    if not text.get("architectures"):
        text["architectures"] = [_LLM_ARCHITECTURES.get(text.get("model_type"), str(text.get("model_type")))]
    image_size = _square(vision.image_size, "image_size")
    config = InternVLChatConfig(
        vision_config={
            **{ours: getattr(vision, theirs) for ours, theirs in _VISION_FIELDS},
            "image_size": image_size,
            "patch_size": _square(vision.patch_size, "patch_size"),
            "architectures": ["InternVisionModel"],
        },
        llm_config=text,
        architectures=["InternVLChatModel"],
        downsample_ratio=hf.downsample_ratio,
        select_layer=hf.vision_feature_layer,
        force_image_size=image_size,
        ps_version="v2",  # transformers' pixel shuffle is the official v2 one
        dtype=hf.dtype,
        **HF_DEFAULT_SETTINGS,
    )
    if hf.image_seq_length != config.num_image_token:
        raise ValueError(
            f"image_seq_length is {hf.image_seq_length} but {image_size}px tiles with patch "
            f"{config.vision_config.patch_size} and downsample_ratio {config.downsample_ratio} give "
            f"{config.num_image_token} tokens"
        )
    if "image_token_id" in raw:  # checked against the tokenizer when the model loads (not transformers' default)
        config.img_context_token_id = raw["image_token_id"]
    return config


def hf_config_from_chat(
    config: InternVLChatConfig, *, image_token_id: int, eos_token_id: int | None = None
) -> InternVLConfig:
    """The -hf config of the model ``config`` describes. ``eos_token_id`` is where generation stops (transformers
    reads it from the config, where the official model reads it from its chat template)."""
    if config.ps_version != "v2":
        raise ValueError(
            f"ps_version is {config.ps_version!r}; transformers' InternVL implements only the pixel shuffle 'v2', "
            "so this model cannot be written in the -hf layout"
        )
    vision = config.vision_config
    text = with_legacy_rope_keys(config.llm_config.to_dict())
    text.pop("quantization_config", None)
    if eos_token_id is not None:
        text["eos_token_id"] = eos_token_id
    return InternVLConfig(
        vision_config={
            **{theirs: getattr(vision, ours) for ours, theirs in _VISION_FIELDS},
            "image_size": config.image_size,
            "patch_size": vision.patch_size,
            "projection_dropout": vision.dropout,  # InternViT drops out after the projection with the same rate
            "use_mean_pooling": True,  # InternViT has no final norm
        },
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=config.num_image_token,
        downsample_ratio=config.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=config.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        architectures=[HF_ARCHITECTURE],
    )


# ------------------------------------------------------------------------------------------------------------------
# Writing an -hf folder


def hf_chat_template(conversation: Conversation) -> str:
    """A Jinja chat template rendering ``conversation``'s format (system block, roles, separator), with its system
    message when the messages bring none, and the -hf processor's placeholders for images and videos: the prompt
    the model was trained on, as transformers' processor and vLLM build it."""
    literal = functools.partial(json.dumps, ensure_ascii=False)  # a JSON string is a valid Jinja string literal
    system_prefix, _, system_suffix = conversation.system_template.partition("{system_message}")
    user, assistant = conversation.roles
    return (
        "{%- set roles = {'user': " + literal(user) + ", 'assistant': " + literal(assistant) + "} -%}"
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{ " + literal(system_prefix + conversation.system_message + system_suffix + conversation.sep) + " }}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{ " + literal(system_prefix) + " }}"
        "{%- else -%}{{ roles[message['role']] }}{%- endif -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for content in message['content'] -%}"
        "{%- if content['type'] == 'image' -%}{{ " + literal(IMG_CONTEXT_TOKEN + "\n") + " }}"
        "{%- elif content['type'] == 'video' -%}{{ " + literal(VIDEO_PLACEHOLDER + "\n") + " }}"
        "{%- elif content['type'] == 'text' -%}{{ content['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- if message['role'] == 'system' -%}{{ " + literal(system_suffix) + " }}{%- endif -%}"
        "{{ " + literal(conversation.sep) + " }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + literal(assistant) + " }}{%- endif -%}"
    )


def _conversation(config: InternVLChatConfig) -> Conversation:
    """The chat template the model is trained with, with the config's system message if it sets one."""
    conversation = get_conv_template(config.template or HF_DEFAULT_SETTINGS["template"])
    system_message = getattr(config, "system_message", None)
    if system_message is not None:
        conversation.set_system_message(system_message)
    return conversation


def build_hf_processor(config: InternVLChatConfig, tokenizer_dir: str | Path) -> InternVLProcessor:
    """transformers' InternVL processor for the model: the tokenizer in ``tokenizer_dir`` with the named tokens the
    processor reads, tiling and normalisation as ``config`` trains them, and ``hf_chat_template``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens=HF_TOKENIZER_TOKENS)
    size = {"height": config.image_size, "width": config.image_size}
    normalisation = dict(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=size,
            crop_to_patches=config.dynamic_image_size,
            min_patches=config.min_dynamic_patch,
            max_patches=config.max_dynamic_patch,
            **normalisation,
        ),
        video_processor=InternVLVideoProcessor(size=size, **normalisation),
        tokenizer=tokenizer,
        image_seq_length=config.num_image_token,
        chat_template=hf_chat_template(_conversation(config)),
    )


def save_in_hf_layout(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    *,
    max_shard_size: str = "5GB",
) -> None:
    """Write ``model`` (an ``InternVLChatModel`` without LoRA layers) to ``output_dir`` as transformers writes an
    ``InternVLForConditionalGeneration``, with its tokenizer and processor files. ``output_dir`` is a new folder
    (``merge_lora`` gives it a temporary one, renamed into place when complete).

    The weights are handed to transformers' own class (built without memory, sharing the tensors), so the folder
    has exactly the names and sharding transformers writes for it.
    """
    output_dir = Path(output_dir)
    config = model.config
    # The official model stops on its chat template's stop token; an -hf config must name it.
    stop_token = _conversation(config).stop_token
    hf_config = hf_config_from_chat(
        config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(stop_token),
    )
    hf_config.dtype = model.dtype
    with torch.device("meta"):
        hf_model = InternVLForConditionalGeneration(hf_config)
    hf_model.load_state_dict(original_to_hf_state_dict(model.state_dict()), strict=True, assign=True)
    hf_model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    # transformers 5 writes the LLM's RoPE settings only in its new form; older readers need the legacy keys too.
    config_file = output_dir / "config.json"
    written = json.loads(config_file.read_text(encoding="utf-8"))
    written["text_config"] = with_legacy_rope_keys(written["text_config"])
    config_file.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(output_dir)
    processor = build_hf_processor(config, output_dir)
    processor.save_pretrained(output_dir)
    # transformers 5 nests the image and video processors in processor_config.json; transformers 4 (and the
    # released -hf folders) keep them in files of their own.
    processor.image_processor.save_pretrained(output_dir)
    processor.video_processor.save_pretrained(output_dir)
