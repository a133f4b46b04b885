"""Model package: configs, checkpoint layout and round trips, the tiny model and tokenizer, features and splicing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from internvl.constants import (
    CHATML_SPECIAL_TOKENS,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    INTERNVL3_8B_CONFIG,
    INTERNVL_SPECIAL_TOKENS,
)
from internvl.conversation import INTERNVL_SYSTEM_MESSAGE
from internvl.model import InternVLChatConfig, InternVLChatModel, load_internvl_model
from internvl.model.internvl_chat import pixel_shuffle
from internvl.model.tiny import create_tiny_model



def checkpoint_keys(model_dir: Path) -> set[str]:
    keys = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir, tiny_tokenizer):
    model = InternVLChatModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    model.img_context_token_id = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    return model


def image_prompt_ids(tokenizer, num_image_tokens: int) -> torch.Tensor:
    prompt = f"<|im_start|>user\n{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * num_image_tokens}{IMG_END_TOKEN}\nDescribe."
    prompt += "<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
    return tokenizer(prompt, return_tensors="pt").input_ids


# --- checkpoint layout and tokenizer ------------------------------------------------------------------------------


def test_tiny_checkpoint_has_official_layout(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "internvl_chat"
    assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert config["vision_config"]["model_type"] == "intern_vit_6b"
    assert (config["ps_version"], config["template"], config["downsample_ratio"]) == ("v2", "internvl2_5", 0.5)
    keys = checkpoint_keys(tiny_model_dir)
    assert all(key.split(".")[0] in {"vision_model", "mlp1", "language_model"} for key in keys)
    assert {
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.position_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.encoder.layers.1.attn.qkv.weight",
        "vision_model.encoder.layers.1.attn.proj.bias",
        "vision_model.encoder.layers.1.ls1",
        "vision_model.encoder.layers.1.norm2.weight",
        "mlp1.0.weight",
        "mlp1.1.weight",
        "mlp1.3.bias",
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.1.self_attn.q_proj.bias",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    } <= keys
    # No final ViT norm, no pooler, no parameters in the GELU slot of the projector.
    assert not any(key.startswith(("mlp1.2", "vision_model.post", "vision_model.pooler")) for key in keys)


def test_tiny_tokenizer_matches_the_official_conventions(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<|endoftext|>", "<|im_end|>", None)
    assert len(tokenizer) == config["llm_config"]["vocab_size"]
    official_order = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    official_order += ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
    assert list(CHATML_SPECIAL_TOKENS + INTERNVL_SPECIAL_TOKENS) == official_order
    special_ids = tokenizer.convert_tokens_to_ids(official_order)
    # ChatML tokens then the nine InternVL tokens, consecutive and in official order, at the end of the vocabulary.
    assert special_ids == list(range(len(tokenizer) - len(special_ids), len(tokenizer)))
    assert tokenizer(IMG_CONTEXT_TOKEN * 3, add_special_tokens=False).input_ids == [special_ids[5]] * 3
    for text in (INTERNVL_SYSTEM_MESSAGE, "Frame-1: <image>\nA cat sleeps on a sofa!"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    # No BOS (or any other token) is added around the text.
    assert tokenizer("Hello").input_ids == tokenizer("Hello", add_special_tokens=False).input_ids


def test_tiny_model_is_deterministic_for_a_seed(tiny_model_dir, tmp_path):
    same = create_tiny_model(tmp_path / "same", seed=0)
    other = create_tiny_model(tmp_path / "other", seed=1)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (same / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert sum(path.stat().st_size for path in same.iterdir()) < 10 * 2**20
    assert not list(tmp_path.glob(".*tmp*")), "staging directory left behind"


@pytest.mark.parametrize("max_shard_size", [None, "1MB"])
def test_save_and_reload_round_trip(tiny_model, tiny_tokenizer, tmp_path, max_shard_size):
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    tiny_model.save_pretrained(tmp_path, **kwargs)
    shards = list(tmp_path.glob("*.safetensors"))
    assert (len(shards) > 1) == (max_shard_size is not None)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_size is not None)
    reloaded = InternVLChatModel.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    original_state = tiny_model.state_dict()
    reloaded_state = reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    for key, value in original_state.items():
        assert torch.equal(value, reloaded_state[key]), key
    assert checkpoint_keys(tmp_path) == set(original_state) - {key for key in original_state if "rotary_emb" in key}


def test_checkpoint_saved_with_lora_layers_reloads_them(tiny_model_dir, tmp_path):
    """The official trainer saves the whole model with its LoRA layers under PEFT names and ``use_llm_lora`` = r in
    the config; loading re-wraps the LLM so those keys find their place."""
    model = InternVLChatModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    model.wrap_llm_lora(r=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    model.save_pretrained(tmp_path)
    assert "language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight" in checkpoint_keys(
        tmp_path
    )
    reloaded = InternVLChatModel.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert reloaded.config.use_llm_lora == 4
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    assert all(torch.equal(value, reloaded_state[key]) for key, value in original_state.items())


def test_official_checkpoint_config_with_extra_keys_loads(tiny_model_dir, tmp_path):
    """A directory laid out like OpenGVLab/InternVL3-*: remote-code auto_map, MoE leftovers, legacy RoPE keys."""
    official = json.loads(INTERNVL3_8B_CONFIG.read_text())
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for key in ("auto_map", "_name_or_path", "system_message", "image_fold", "torch_dtype"):
        config[key] = official[key]
    for key in ("auto_map", "use_moe", "num_experts", "noisy_gate_policy", "_name_or_path", "use_bfloat16"):
        config["vision_config"][key] = official["vision_config"][key]
    config["llm_config"].pop("rope_parameters")
    config["llm_config"].update(moe_config=None, rope_theta=1000000.0, torch_dtype="bfloat16")
    for path in tiny_model_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = load_internvl_model(tmp_path, load_in_4bit=False, torch_dtype=torch.float32)
    assert model.system_message is None
    assert model.config.vision_config.num_experts == 8
    assert model.config.llm_config.rope_parameters["rope_theta"] == 1000000.0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.img_context_token_id == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)


def test_internvl3_8b_config_values():
    config = InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG)
    vision, llm = config.vision_config, config.llm_config
    assert config.hidden_size == llm.hidden_size == 3584
    assert config.num_image_token == 256
    assert (vision.hidden_size, vision.num_hidden_layers, vision.qkv_bias, vision.qk_normalization) == (
        1024,
        24,
        True,
        False,
    )
    assert (llm.num_hidden_layers, llm.num_key_value_heads, llm.vocab_size) == (28, 4, 151674)
    assert llm.rope_parameters["rope_theta"] == 1000000.0
    assert config.tie_word_embeddings is False and llm.tie_word_embeddings is False
    saved = config.to_dict()
    # Legacy RoPE keys are written beside rope_parameters so the official remote code reads the same values.
    assert saved["llm_config"]["rope_theta"] == 1000000.0
    assert saved["llm_config"]["rope_scaling"]["type"] == "dynamic"
    again = InternVLChatConfig(**{k: v for k, v in saved.items() if k not in ("model_type", "transformers_version")})
    assert again.llm_config.rope_parameters == llm.rope_parameters


def test_num_image_token_follows_image_size_and_downsample_ratio():
    config = InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG)
    config.force_image_size = 224
    assert config.num_image_token == (224 // 14) ** 2 // 4
    config.downsample_ratio = 0.25
    assert config.num_image_token == (224 // 14) ** 2 // 16


def test_llama_based_llm_builds_wraps_lora_and_trains(tiny_model_dir, tiny_tokenizer):
    vision_config = json.loads((tiny_model_dir / "config.json").read_text())["vision_config"]
    llm_config = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = InternVLChatConfig(vision_config=vision_config, llm_config=llm_config, ps_version="v2")
    torch.manual_seed(0)
    model = InternVLChatModel(config)
    model.img_context_token_id = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert type(model.language_model).__name__ == "LlamaForCausalLM"
    for param in [*model.vision_model.parameters(), *model.mlp1.parameters()]:
        param.requires_grad_(False)
    model.wrap_llm_lora(r=4)
    input_ids = image_prompt_ids(tiny_tokenizer, model.num_image_token)
    model(pixel_values=torch.randn(1, 3, 448, 448), input_ids=input_ids, labels=input_ids).loss.backward()
    trained_projections = {
        name.split(".lora_B.")[0].split(".")[-1]
        for name, param in model.named_parameters()
        if ".lora_B." in name and param.grad is not None and param.grad.abs().sum() > 0
    }
    assert trained_projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_internlm2_llm_is_rejected_with_a_clear_error():
    with pytest.raises(NotImplementedError, match="InternLM2ForCausalLM.*not supported"):
        InternVLChatConfig(llm_config={"architectures": ["InternLM2ForCausalLM"], "hidden_size": 4096})


# --- pixel shuffle, features, splicing -----------------------------------------------------------------------------


def test_pixel_shuffle_v2_is_2x2_space_to_depth_and_v1_its_transpose():
    features = torch.randn(2, 6, 4, 5)  # [N, rows, cols, C]
    v2 = pixel_shuffle(features, 0.5, "v2")
    v1 = pixel_shuffle(features, 0.5, "v1")
    assert v2.shape == (2, 3, 2, 20) and v1.shape == (2, 2, 3, 20)
    for r in range(3):
        for c in range(2):
            expected = torch.cat(
                [
                    features[:, 2 * r, 2 * c],
                    features[:, 2 * r, 2 * c + 1],
                    features[:, 2 * r + 1, 2 * c],
                    features[:, 2 * r + 1, 2 * c + 1],
                ],
                dim=-1,
            )
            assert torch.equal(v2[:, r, c], expected)
            assert torch.equal(v1[:, c, r], expected)


def test_select_layer_picks_that_vision_layer(tiny_model):
    pixel_values = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        last = tiny_model.extract_feature(pixel_values)
        tiny_model.config.select_layer = -2
        try:
            second_last = tiny_model.extract_feature(pixel_values)
        finally:
            tiny_model.config.select_layer = -1
        hidden = tiny_model.vision_model(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = pixel_shuffle(hidden.reshape(1, 32, 32, -1), 0.5, "v2").reshape(1, 256, -1)
        expected = tiny_model.mlp1(expected)
    torch.testing.assert_close(second_last, expected)
    assert not torch.allclose(second_last, last)


def test_image_features_are_spliced_at_context_tokens(tiny_model, tiny_tokenizer):
    input_ids = image_prompt_ids(tiny_tokenizer, 2 * tiny_model.num_image_token)
    pixel_values = torch.randn(3, 3, 448, 448)
    image_flags = torch.tensor([1, 0, 1])  # the middle tile is a dummy and must be dropped
    with torch.no_grad():
        embeds = tiny_model._embed_with_images(input_ids, pixel_values, image_flags)
        features = tiny_model.extract_feature(pixel_values[[0, 2]]).reshape(-1, embeds.shape[-1])
        text_embeds = tiny_model.get_input_embeddings()(input_ids)
    selected = input_ids == tiny_model.img_context_token_id
    assert torch.equal(embeds[selected], features)
    assert torch.equal(embeds[~selected], text_embeds[~selected])


def test_image_token_count_mismatch_raises(tiny_model, tiny_tokenizer):
    input_ids = image_prompt_ids(tiny_tokenizer, tiny_model.num_image_token - 1)
    with pytest.raises(ValueError, match=r"255 <IMG_CONTEXT> tokens.*256 features"):
        tiny_model(pixel_values=torch.randn(1, 3, 448, 448), input_ids=input_ids)


def _two_sample_batch(tokenizer):
    input_ids = torch.cat([image_prompt_ids(tokenizer, 256)] * 2)
    labels = input_ids.clone()
    labels[0, :-6] = -100
    labels[1, :-3] = -100
    return dict(pixel_values=torch.randn(2, 3, 448, 448), input_ids=input_ids, labels=labels)


def test_eval_mode_returns_logits_and_loss_as_the_official_model(tiny_model, tiny_tokenizer):
    batch = _two_sample_batch(tiny_tokenizer)
    with torch.no_grad():
        out = tiny_model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, tiny_model.config.llm_config.vocab_size)
    labels = batch["labels"]
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, manual)


def test_training_mode_and_return_logits_false_skip_the_full_logits(tiny_model, tiny_tokenizer):
    batch = _two_sample_batch(tiny_tokenizer)
    with torch.no_grad():
        full = tiny_model(**batch)
        lean = tiny_model(**batch, return_logits=False)
        tiny_model.train()
        try:
            training = tiny_model(**batch)
            training_full = tiny_model(**batch, return_logits=True)
        finally:
            tiny_model.eval()
    assert lean.logits is None and training.logits is None and training_full.logits is not None
    torch.testing.assert_close(lean.loss, full.loss)
    torch.testing.assert_close(training.loss, full.loss)
    torch.testing.assert_close(training_full.logits, full.logits)


def test_loss_weights_and_normalizer(tiny_model, tiny_tokenizer):
    batch = _two_sample_batch(tiny_tokenizer)
    with torch.no_grad():
        out = tiny_model(**batch)
        targets = batch["labels"][:, 1:]
        token_losses = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
        )
        # Per-sample weights 1/n (the official "sample" reduction): the mean of the two samples' mean losses.
        weights = (batch["labels"] != -100).float()
        weights /= weights.sum(dim=1, keepdim=True)
        weighted = tiny_model(**batch, loss_weight=weights, return_logits=False)
        per_sample = token_losses.sum(dim=1) / (targets != -100).sum(dim=1)
        torch.testing.assert_close(weighted.loss, per_sample.mean())
        # An explicit normalizer replaces the batch's own weight sum (the trainer passes the whole step's).
        scaled = tiny_model(**batch, loss_weight=weights, num_items_in_batch=torch.tensor(8.0), return_logits=False)
        torch.testing.assert_close(scaled.loss, per_sample.sum() / 8)
        # Nothing supervised: zero, not NaN.
        empty = tiny_model(**{**batch, "labels": torch.full_like(batch["labels"], -100)}, return_logits=False)
    assert empty.loss.item() == 0.0


def test_frozen_vision_tower_runs_without_autograd(tiny_model):
    pixel_values = torch.randn(1, 3, 448, 448)
    recorded = []
    hook = tiny_model.vision_model.register_forward_hook(lambda m, i, out: recorded.append(out.last_hidden_state))
    try:
        for param in tiny_model.vision_model.parameters():
            param.requires_grad_(False)
        features = tiny_model.extract_feature(pixel_values)  # projector still trainable
        assert recorded[-1].grad_fn is None and features.requires_grad
        for param in tiny_model.mlp1.parameters():
            param.requires_grad_(False)
        assert tiny_model.extract_feature(pixel_values).grad_fn is None
    finally:
        hook.remove()
        for param in tiny_model.parameters():
            param.requires_grad_(True)


def test_wrapping_lora_prints_no_parameter_count_of_its_own(tiny_model_dir, capsys):
    """peft's count (which takes a packed 4-bit element for one weight) would contradict the recipe's, the one
    printed."""
    model = InternVLChatModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    capsys.readouterr()
    model.wrap_llm_lora(r=4)
    model.wrap_backbone_lora(r=4)
    assert capsys.readouterr().out == ""
