"""The one place that decides dtype, 4-bit quantization and device when loading a model or its tokenizer."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from internvl.constants import IMG_CONTEXT_TOKEN, INTERNVL_SPECIAL_TOKENS
from internvl.model.configuration import InternVLChatConfig
from internvl.model.hf_layout import (
    HF_LAYOUT,
    PROCESSOR_PLACEHOLDER_TOKENS,
    checkpoint_layout,
    finish_hf_load,
    read_model_config,
    reading_hf_layout,
)
from internvl.model.internvl_chat import InternVLChatModel

# Modules kept in the load dtype when the LLM is quantized. Giving a skip list replaces transformers' default one,
# so the LM head must be named explicitly.
BNB_SKIP_MODULES = ("vision_model", "mlp1", "lm_head")

# Top-level config fields the trainer may override before the model is built.
OVERRIDABLE_FIELDS = (
    "template",
    "select_layer",
    "ps_version",
    "dynamic_image_size",
    "use_thumbnail",
    "min_dynamic_patch",
    "max_dynamic_patch",
    "force_image_size",
    "downsample_ratio",
)
# Fields of ``vision_config`` the trainer may override.
OVERRIDABLE_VISION_FIELDS = ("drop_path_rate",)


def load_tokenizer(
    model_path: str | Path, *, model_max_length: int | None = None, use_fast: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer stored beside the weights, checked to carry the InternVL special tokens.

    ``use_fast`` mirrors the official ``--use_fast_tokenizer`` flag (transformers 5 has a single, fast, backend for
    Qwen2 tokenizers, so it only matters for tokenizers that still have a slow variant).
    """
    model_path = Path(model_path)
    kwargs: dict[str, Any] = {"use_fast": use_fast}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as error:
        raise OSError(f"cannot load a tokenizer from {model_path}: {error}") from error
    missing = [token for token in INTERNVL_SPECIAL_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(
            f"the tokenizer in {model_path} lacks the InternVL special tokens {missing}; point to an InternVL chat "
            "checkpoint (e.g. OpenGVLab/InternVL3-8B), not to a bare LLM"
        )
    return tokenizer


def build_bnb_config(
    *,
    torch_dtype: torch.dtype = torch.bfloat16,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
) -> BitsAndBytesConfig:
    """4-bit config for the LLM's linear layers.

    The packed weights are stored in ``torch_dtype`` (not uint8) so that DeepSpeed ZeRO-3 can partition them like
    every other parameter; the vision tower, projector and LM head are not quantized.
    """
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype,
        bnb_4bit_quant_storage=torch_dtype,
        llm_int8_skip_modules=list(BNB_SKIP_MODULES),
    )


def apply_config_overrides(config: InternVLChatConfig, overrides: dict[str, Any] | None) -> None:
    """Set trainer-chosen values (template, select_layer, tiling, drop_path_rate, ...) on ``config`` in place."""
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in OVERRIDABLE_FIELDS:
            setattr(config, key, value)
        elif key in OVERRIDABLE_VISION_FIELDS:
            setattr(config.vision_config, key, value)
        else:
            raise ValueError(
                f"config override {key!r} is not supported; allowed: "
                f"{', '.join(OVERRIDABLE_FIELDS + OVERRIDABLE_VISION_FIELDS)}"
            )
    if config.ps_version not in ("v1", "v2"):
        raise ValueError(f"ps_version must be 'v1' or 'v2', got {config.ps_version!r}")


def load_internvl_model(
    model_path: str | Path,
    *,
    load_in_4bit: bool = True,
    torch_dtype: torch.dtype = torch.bfloat16,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    device_map: str | dict | None = None,
    attn_implementation: str = "sdpa",
    config_overrides: dict[str, Any] | None = None,
) -> InternVLChatModel:
    """Load an InternVL checkpoint in the official or the -hf layout (``internvl.model.hf_layout``) as an
    ``InternVLChatModel``, the LLM optionally in 4-bit, ready for LoRA wrapping.

    ``img_context_token_id`` is set from the tokenizer in the same directory. Under DeepSpeed ZeRO-3 leave
    ``device_map`` as None (transformers then puts the 4-bit model on the current CUDA device).
    """
    model_path = Path(model_path)
    layout = checkpoint_layout(model_path)
    tokenizer = load_tokenizer(model_path)
    config = read_model_config(model_path)
    apply_config_overrides(config, config_overrides)
    _check_tokenizer_fits(tokenizer, config, model_path)
    quantization_config = (
        build_bnb_config(
            torch_dtype=torch_dtype,
            bnb_4bit_quant_type=bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        )
        if load_in_4bit
        else None
    )
    with reading_hf_layout() if layout == HF_LAYOUT else contextlib.nullcontext():
        model, loading_info = InternVLChatModel.from_pretrained(
            model_path,
            config=config,
            dtype=torch_dtype,
            quantization_config=quantization_config,
            device_map=device_map,
            attn_implementation=attn_implementation,
            output_loading_info=True,
        )
    if layout == HF_LAYOUT:
        finish_hf_load(model, loading_info, model_path)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    return model


def _check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, config: InternVLChatConfig, model_path: Path) -> None:
    """Every token the model can be given has an embedding row, and the image token is the one the config names."""
    vocab_size = config.llm_config.vocab_size
    # -hf tokenizers add the processor's ``<video>`` placeholder past the embedding; it never reaches the model.
    unembedded = [
        token
        for token, token_id in tokenizer.get_vocab().items()
        if token_id >= vocab_size and token not in PROCESSOR_PLACEHOLDER_TOKENS
    ]
    if unembedded:
        raise ValueError(
            f"the tokenizer in {model_path} has {len(tokenizer)} tokens but the LLM embeds only {vocab_size} "
            f"(e.g. {sorted(unembedded)[:3]} have no row): tokenizer and weights do not belong together"
        )
    image_token_id = getattr(config, "img_context_token_id", None)
    if image_token_id is not None and image_token_id != tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN):
        raise ValueError(
            f"config.json in {model_path} names image token id {image_token_id} but the tokenizer gives "
            f"{IMG_CONTEXT_TOKEN} the id {tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)}: tokenizer and "
            "config do not belong together"
        )
