"""The FLOP count behind MFU: the parameter totals it uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvl.bench.flops import llm_linear_parameters, llm_lora_parameters
from internvl.bench.run import DEFAULT_MODEL_CONFIG

LORA_TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_parameter_counts_of_the_flop_formula_match_the_model():
    from internvl.model.internvl_chat import InternVLChatModel
    from internvl.model.tiny import tiny_config

    model = InternVLChatModel(tiny_config())
    llm_config = model.config.llm_config
    projection_weights = sum(
        module.weight.numel()
        for name, module in model.language_model.named_modules()
        if name.endswith(LORA_TARGET_SUFFIXES)
    )
    assert llm_linear_parameters(llm_config) == projection_weights

    model.language_model.requires_grad_(False)
    model.wrap_llm_lora(r=8)
    lora_weights = sum(p.numel() for n, p in model.language_model.named_parameters() if "lora_" in n)
    assert llm_lora_parameters(llm_config, 8) == lora_weights


def test_flop_formula_on_the_8b_config_counts_the_qwen2_5_7b_layers():
    from internvl.model.configuration import InternVLChatConfig

    config = InternVLChatConfig(**json.loads(Path(DEFAULT_MODEL_CONFIG).read_text()))
    # Qwen2.5-7B: 7.07e9 matmul weights, of which 0.545e9 are the LM head.
    assert llm_linear_parameters(config.llm_config) == pytest.approx(7.07e9 - 0.545e9, rel=0.01)
    # r=32 on all seven projections of 28 layers: about 80.7M trainable parameters.
    assert llm_lora_parameters(config.llm_config, 32) == pytest.approx(80.7e6, rel=0.01)
