"""ModelDims: every size and parameter count read from a config equals the count of the model built from it (on the
meta device, so the 8B model costs no memory), for the tiny model and InternVL3-8B's shipped config."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from internvl.constants import INTERNVL3_8B_CONFIG
from internvl.model.configuration import InternVLChatConfig
from internvl.model.dims import ModelDims
from internvl.model.internvl_chat import InternVLChatModel
from internvl.model.tiny import tiny_config

LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 32


def _weights(modules) -> int:
    return sum(module.weight.numel() for module in modules)


def count_parameters(config: InternVLChatConfig, lora_rank: int = LORA_RANK) -> dict[str, int]:
    """Parameter counts of ``InternVLChatModel(config)``, counted on the module tree (no formula)."""
    with torch.device("meta"):
        model = InternVLChatModel(config)
        tile = torch.empty(1, 3, config.image_size, config.image_size)
        tokens_per_tile = model.vision_model.embeddings(tile).shape[1]
    llm = dict(model.language_model.named_modules())
    counts = {
        "total": sum(p.numel() for p in model.parameters()),
        "llm_projections": _weights(m for name, m in llm.items() if name.endswith(LLM_PROJECTIONS)),
        "vision_and_projector": sum(p.numel() for p in [*model.vision_model.parameters(), *model.mlp1.parameters()]),
        "vision_linear": _weights(m for m in model.vision_model.encoder.modules() if isinstance(m, nn.Linear)),
        "projector_linear": _weights(m for m in model.mlp1 if isinstance(m, nn.Linear)),
        "vision_tokens_per_tile": tokens_per_tile,
    }
    model.language_model.requires_grad_(False)
    model.wrap_llm_lora(r=lora_rank)
    counts["lora"] = sum(p.numel() for name, p in model.language_model.named_parameters() if "lora_" in name)
    return counts


@functools.cache
def internvl3_8b_counts() -> dict[str, int]:
    return count_parameters(InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG))


@functools.cache
def tiny_counts() -> dict[str, int]:
    return count_parameters(tiny_config())


def internvl3_8b_dims() -> ModelDims:
    return ModelDims.from_config(InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG))


@pytest.mark.parametrize(
    "dims, counts",
    [
        pytest.param(lambda: ModelDims.from_config(tiny_config()), tiny_counts, id="tiny"),
        pytest.param(internvl3_8b_dims, internvl3_8b_counts, id="internvl3-8b"),
    ],
)
def test_counts_equal_the_model_built_from_the_config(dims, counts):
    dims, counts = dims(), counts()
    assert dims.quantized_params == counts["llm_projections"]
    assert dims.vision_params == counts["vision_and_projector"]
    assert dims.total_params == counts["total"]
    assert dims.llm_bf16_params == counts["total"] - counts["llm_projections"] - counts["vision_and_projector"]
    assert dims.lora_params(LORA_RANK) == counts["lora"]
    assert dims.vision_linear_params == counts["vision_linear"]
    assert dims.projector_linear_params == counts["projector_linear"]
    assert dims.vision_tokens_per_tile == counts["vision_tokens_per_tile"]


def test_internvl3_8b_is_qwen2_5_7b_behind_internvit_300m():
    dims = internvl3_8b_dims()
    # Qwen2.5-7B: 7.07e9 matmul weights, of which 0.545e9 are the LM head; InternViT-300M + projector.
    assert dims.quantized_params == pytest.approx(7.07e9 - 0.545e9, rel=0.01)
    assert dims.vision_params == pytest.approx(0.33e9, rel=0.05)
    # r=32 on all seven projections of 28 layers: about 80.7M trainable parameters.
    assert dims.lora_params(32) == pytest.approx(80.7e6, rel=0.01)
    assert (dims.num_layers, dims.hidden_size, dims.num_image_token) == (28, 3584, 256)


def test_tiles_of_another_size_change_the_tokens_not_the_parameters():
    """``force_image_size`` resizes the tiles; the vision tower interpolates its trained position grid."""
    config = tiny_config()
    config.force_image_size = 224
    dims, counts = ModelDims.from_config(config), count_parameters(config)
    assert dims.vision_tokens_per_tile == counts["vision_tokens_per_tile"] == (224 // 14) ** 2 + 1
    assert dims.vision_params == counts["vision_and_projector"] == ModelDims.from_config(tiny_config()).vision_params
