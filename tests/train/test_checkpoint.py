"""What a run saves (adapters, other trained tensors, config), loading it back, and which checkpoint resumes."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from internvl.model.adapters import NON_LORA_WEIGHTS_NAME
from internvl.model.loading import load_internvl_model
from internvl.train.checkpoint import (
    gather_trainable_state_dict,
    last_complete_checkpoint,
    load_trained_weights,
    save_trained_weights,
)


def lora_model(path, *, llm_rank=4, backbone_rank=0, train_mlp=False, seed=0):
    model = load_internvl_model(path, load_in_4bit=False, torch_dtype=torch.float32)
    model.requires_grad_(False)
    if backbone_rank:
        model.wrap_backbone_lora(r=backbone_rank)
    model.wrap_llm_lora(r=llm_rank)
    model.mlp1.requires_grad_(train_mlp)
    # Stand in for training: LoRA B starts at zero, which would hide a save that writes nothing.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def trained(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def test_adapter_is_peft_loadable_and_equal_to_the_trained_weights(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir, llm_rank=4)
    save_trained_weights(model, gather_trainable_state_dict(model), tmp_path, base_model_path="models/base")

    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "models/base"
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    num_layers = model.config.llm_config.num_hidden_layers
    assert len(saved) == 2 * 7 * num_layers  # lora_A and lora_B of q/k/v/o/gate/up/down in every layer
    assert not (tmp_path / NON_LORA_WEIGHTS_NAME).exists()

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["use_llm_lora"] == 4 and "quantization_config" not in config

    # peft's own loader attaches the adapter to a fresh LLM with the trained values.
    fresh = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    restored = PeftModel.from_pretrained(fresh.language_model, tmp_path)
    restored_params = dict(restored.named_parameters())
    for name, value in trained(model).items():
        peft_name = name.removeprefix("language_model.")
        assert torch.equal(restored_params[peft_name], value), name


def test_other_trained_tensors_and_vision_adapter_round_trip(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir, llm_rank=4, backbone_rank=2, train_mlp=True)
    expected = trained(model)
    save_trained_weights(model, gather_trainable_state_dict(model), tmp_path, base_model_path="base")

    assert (tmp_path / "vision_adapter" / "adapter_model.safetensors").is_file()
    extra = load_file(tmp_path / NON_LORA_WEIGHTS_NAME)
    assert sorted(extra) == sorted(name for name in expected if name.startswith("mlp1."))
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["use_llm_lora"], config["use_backbone_lora"]) == (4, 2)

    fresh = lora_model(tiny_model_dir, llm_rank=4, backbone_rank=2, train_mlp=True, seed=1)
    assert any(not torch.equal(value, trained(fresh)[name]) for name, value in expected.items())
    load_trained_weights(fresh, tmp_path)
    for name, value in trained(fresh).items():
        assert torch.equal(value, expected[name]), name


def test_loading_into_a_differently_wrapped_model_fails_clearly(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir, llm_rank=4)
    save_trained_weights(model, gather_trainable_state_dict(model), tmp_path, base_model_path="base")
    with_backbone = lora_model(tiny_model_dir, llm_rank=4, backbone_rank=2)
    with pytest.raises(FileNotFoundError, match="vision_model adapter"):
        load_trained_weights(with_backbone, tmp_path)


def test_last_complete_checkpoint_skips_ones_cut_short(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") == (None, [])
    for step, complete in ((100, True), (200, True), (300, False), (1000, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-final").mkdir()  # not a checkpoint name
    checkpoint, incomplete = last_complete_checkpoint(tmp_path)
    assert checkpoint == tmp_path / "checkpoint-200"
    assert incomplete == [tmp_path / "checkpoint-1000", tmp_path / "checkpoint-300"]
