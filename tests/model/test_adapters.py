"""Loading a model folder for inference: a training output's adapters on their base model give the trained model,
with the training run's settings; full models load as they are; a missing base model is asked for."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from internvl.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl.model.adapters import load_model_for_inference, resolve_model_source
from internvl.model.loading import load_internvl_model, load_tokenizer
from internvl.train.checkpoint import gather_trainable_state_dict, save_trained_weights


@torch.no_grad()
def _logits(model, tokenizer):
    text = f"Frame-1: {IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * 256}{IMG_END_TOKEN}\nDescribe the video in detail."
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    pixel_values = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(2))
    model.float().eval()
    return model(input_ids=input_ids, pixel_values=pixel_values, image_flags=torch.ones(1, dtype=torch.long)).logits


def test_a_training_output_loads_as_the_model_that_was_trained(tiny_lora_model, tiny_model_dir, tmp_path):
    trained, output = tiny_lora_model, tmp_path / "output"
    save_trained_weights(trained, gather_trainable_state_dict(trained), output, base_model_path=str(tiny_model_dir))
    load_tokenizer(tiny_model_dir).save_pretrained(output)

    model, tokenizer, source = load_model_for_inference(output, torch_dtype=torch.float32, device="cpu")
    assert (source.base_model, source.llm_adapter) == (tiny_model_dir, output)
    assert source.vision_adapter is None and source.non_lora_weights is None and source.has_lora
    assert model.img_context_token_id == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    expected = _logits(trained, tokenizer)
    assert torch.allclose(_logits(model, tokenizer), expected, rtol=0, atol=1e-5)
    base = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    assert (_logits(base, tokenizer) - expected).abs().max() > 1e-3  # the adapter matters


def test_the_training_runs_settings_apply_to_the_base_model(tiny_lora_output, tmp_path):
    output = tmp_path / "output"
    shutil.copytree(tiny_lora_output, output)
    config = json.loads((output / "config.json").read_text())
    assert config["max_dynamic_patch"] == 12  # the tiny base model's
    config["max_dynamic_patch"] = 3
    (output / "config.json").write_text(json.dumps(config))
    model, _, _ = load_model_for_inference(output, torch_dtype=torch.float32, device="cpu")
    assert model.config.max_dynamic_patch == 3


def test_loading_an_adapter_shows_no_peft_deprecation_warning(tiny_lora_output):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, source = load_model_for_inference(tiny_lora_output, torch_dtype=torch.float32, device="cpu")
    assert source.llm_adapter is not None  # an adapter was really loaded
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_a_full_model_is_read_as_it_is(tiny_model_dir):
    source = resolve_model_source(tiny_model_dir)
    assert source.base_model is None and not source.has_lora and source.weights_dir == tiny_model_dir
    with pytest.raises(ValueError, match="is a full model, not an adapter training output"):
        resolve_model_source(tiny_model_dir, base_model=tiny_model_dir)


def test_missing_base_model_asks_for_base_model_flag(tiny_lora_output, tmp_path):
    moved = tmp_path / "output"
    moved.mkdir()
    for file in tiny_lora_output.iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="--base-model"):
        resolve_model_source(moved)


def damaged_copy(output, tmp_path, damage):
    copy = tmp_path / "output"
    shutil.copytree(output, copy)
    damage(copy)
    return copy


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10"), "adapter_model.safetensors is damaged"),
    (lambda d: (d / "adapter_config.json").write_text('{"r": 8,'), "adapter_config.json cannot be read"),
])  # fmt: skip
def test_missing_or_damaged_adapter_files_are_named_before_loading(tiny_lora_output, tmp_path, damage, message):
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        resolve_model_source(damaged_copy(tiny_lora_output, tmp_path, damage))


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 256, "trained on a model with LLM hidden size 128, but the base model .* has 256"),
    ("num_hidden_layers", 3, "trained on a model with 2 LLM layers, but the base model .* has 3"),
])  # fmt: skip
def test_an_adapter_on_another_base_is_one_line(tiny_lora_output, tiny_model_dir, tmp_path, field, value, message):
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other_base)
    config = json.loads((other_base / "config.json").read_text())
    assert config["llm_config"][field] != value
    config["llm_config"][field] = value
    if field == "num_hidden_layers" and "layer_types" in config["llm_config"]:
        config["llm_config"]["layer_types"] = config["llm_config"]["layer_types"][:1] * value
    (other_base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{message}; pass the base model it was trained on with --base-model"):
        resolve_model_source(tiny_lora_output, base_model=other_base)
