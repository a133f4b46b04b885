"""The -hf layout (transformers' ``InternVLForConditionalGeneration``): which folders are which, the config and
tensor-name conversion on InternVL3-8B's real shapes, the folder as transformers and its processor read it, and
-hf folders read into ``InternVLChatModel`` (in 4-bit too) without a tensor left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    AutoVideoProcessor,
    InternVLForConditionalGeneration,
)

from internvl.constants import IMAGENET_MEAN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, INTERNVL3_8B_CONFIG
from internvl.conversation import get_conv_template
from internvl.model import InternVLChatConfig, InternVLChatModel, load_internvl_model
from internvl.model.hf_layout import (
    HF_LAYOUT,
    ORIGINAL_LAYOUT,
    chat_config_from_hf,
    checkpoint_layout,
    hf_config_from_chat,
    original_to_hf_state_dict,
    read_model_config,
)
from tests.scripts.test_finetune import free_port

REPO = Path(__file__).resolve().parents[2]


def _tensor_names(folder):
    names = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names.update(f.keys())
    return names


def test_layouts_are_told_apart_by_config_json(tiny_model_dir, tiny_hf_model_dir, tmp_path):
    assert checkpoint_layout(tiny_model_dir) == ORIGINAL_LAYOUT
    assert checkpoint_layout(tiny_hf_model_dir) == HF_LAYOUT
    for config in ({"model_type": "qwen2"}, {"model_type": "internvl", "architectures": ["InternVLModel"]}):
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="OpenGVLab/InternVL3-8B-hf") as error:
            checkpoint_layout(tmp_path)
        assert str(tmp_path / "config.json") in str(error.value)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        checkpoint_layout(tmp_path / "nowhere")


def test_internvl3_8b_config_and_tensor_names_convert_both_ways():
    """On InternVL3-8B's own config: the -hf config builds transformers' class, every tensor of ours has its place
    there with the same shape (q/k/v a third of qkv each), and reading the -hf config back gives our model."""
    config = InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG)
    hf_config = hf_config_from_chat(config, image_token_id=151667, eos_token_id=151645)
    assert (hf_config.text_config.eos_token_id, hf_config.image_token_id, hf_config.image_seq_length) == (
        151645,
        151667,
        256,
    )
    back = chat_config_from_hf(hf_config.to_dict())
    assert back.llm_config.to_dict() | {"eos_token_id": 151643} == config.llm_config.to_dict()
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "qkv_bias",
                  "qk_normalization", "norm_type", "layer_norm_eps", "image_size", "patch_size", "initializer_factor"):
        assert getattr(back.vision_config, field) == getattr(config.vision_config, field), field  # fmt: skip
    for field in ("downsample_ratio", "select_layer", "ps_version", "force_image_size", "template", "num_image_token"):
        assert getattr(back, field) == getattr(config, field), field

    with torch.device("meta"):
        ours = InternVLChatModel(config)
        hf = InternVLForConditionalGeneration(hf_config)
    converted = original_to_hf_state_dict(ours.state_dict())
    expected = {name: tensor.shape for name, tensor in hf.state_dict().items()}
    assert {name: tensor.shape for name, tensor in converted.items()} == expected
    assert converted["model.vision_tower.encoder.layer.23.attention.v_proj.weight"].shape == (1024, 1024)


def test_hf_folder_is_what_transformers_writes_and_its_processor_reads(tiny_hf_model_dir, tmp_path):
    hf = InternVLForConditionalGeneration.from_pretrained(tiny_hf_model_dir, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "resaved")
    assert _tensor_names(tiny_hf_model_dir) == _tensor_names(tmp_path / "resaved")
    config = json.loads((tiny_hf_model_dir / "config.json").read_text())
    assert config["model_type"] == "internvl" and config["architectures"] == ["InternVLForConditionalGeneration"]
    assert config["tie_word_embeddings"] is False and config["text_config"]["rope_theta"] == 1000000.0

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_model_dir)
    assert tokenizer.context_image_token_id == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert config["image_token_id"] == tokenizer.context_image_token_id
    assert config["text_config"]["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert type(AutoModelForImageTextToText.from_pretrained(tiny_hf_model_dir)) is InternVLForConditionalGeneration
    # The processors as training prepares tiles (transformers 4 reads them from files of their own).
    image_processor = AutoImageProcessor.from_pretrained(tiny_hf_model_dir)
    assert (image_processor.max_patches, image_processor.size["height"]) == (12, 448)
    assert tuple(AutoVideoProcessor.from_pretrained(tiny_hf_model_dir).image_mean) == IMAGENET_MEAN
    processor = AutoProcessor.from_pretrained(tiny_hf_model_dir)
    image = torch.randint(0, 256, (3, 448, 448), dtype=torch.uint8)
    inputs = processor(images=[image], text=[f"{IMG_CONTEXT_TOKEN}\nDescribe the image."], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 448, 448)
    assert int((inputs["input_ids"] == tokenizer.context_image_token_id).sum()) == 256


def test_hf_chat_template_renders_the_prompt_the_model_is_trained_on(tiny_hf_model_dir):
    """transformers' processor (and vLLM) build the internvl2_5 prompt of training, default system message
    included; the image placeholder becomes the same ``<img><IMG_CONTEXT>...</img>`` block."""
    processor = AutoProcessor.from_pretrained(tiny_hf_model_dir)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Summarize the video."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat sleeps."}]},
        {"role": "user", "content": "And then?"},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    template = get_conv_template("internvl2_5")
    for role, text in ((0, "<image>\nSummarize the video."), (1, "A cat sleeps."), (0, "And then?"), (1, None)):
        template.append_message(template.roles[role], text)
    assert rendered == template.get_prompt().replace("<image>", IMG_CONTEXT_TOKEN)

    with_system = [{"role": "system", "content": "Be brief."}, *messages[:1]]
    template = get_conv_template("internvl2_5")
    template.set_system_message("Be brief.")
    template.append_message(template.roles[0], "<image>\nSummarize the video.")
    assert processor.apply_chat_template(with_system) == template.get_prompt().replace("<image>", IMG_CONTEXT_TOKEN)
    expanded = processor(images=[torch.zeros(3, 448, 448, dtype=torch.uint8)], text=[rendered])["input_ids"]
    tokens = processor.tokenizer.convert_ids_to_tokens(expanded[0])
    first = tokens.index(IMG_START_TOKEN)
    assert tokens[first + 1 : first + 258] == [IMG_CONTEXT_TOKEN] * 256 + [IMG_END_TOKEN]


def test_hf_folder_loads_like_the_original_in_4_bit(tiny_model_dir, tiny_hf_model_dir, tiny_tokenizer):
    original = load_internvl_model(tiny_model_dir, load_in_4bit=True, torch_dtype=torch.bfloat16)
    converted = load_internvl_model(tiny_hf_model_dir, load_in_4bit=True, torch_dtype=torch.bfloat16)
    assert type(converted.language_model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert converted.vision_model.encoder.layers[0].attn.qkv.weight.dtype == torch.bfloat16  # not quantized
    assert converted.img_context_token_id == original.img_context_token_id
    text = f"{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * 256}{IMG_END_TOKEN}\nDescribe the video."
    input_ids = tiny_tokenizer(text, return_tensors="pt")["input_ids"]
    pixel_values = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        expected = original.eval()(pixel_values=pixel_values, input_ids=input_ids).logits
        logits = converted.eval()(pixel_values=pixel_values, input_ids=input_ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_a_model_read_from_hf_saves_in_the_original_layout(tiny_model_dir, tiny_hf_model_dir, tmp_path):
    model = load_internvl_model(tiny_hf_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert _tensor_names(tmp_path) == _tensor_names(tiny_model_dir)
    assert read_model_config(tmp_path).model_type == "internvl_chat"


@pytest.mark.parametrize("fault", ["extra tensor", "missing tensor"])
def test_an_hf_tensor_the_conversion_does_not_place_is_an_error(tiny_hf_model_dir, tmp_path, fault):
    folder = shutil.copytree(tiny_hf_model_dir, tmp_path / "model")
    tensors = load_file(folder / "model.safetensors")
    if fault == "extra tensor":
        tensors["vision_tower.encoder.layer.0.attention.extra_proj.weight"] = torch.zeros(2)
    else:
        del tensors["multi_modal_projector.linear_2.bias"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not map onto the InternVL model") as error:
        load_internvl_model(folder, load_in_4bit=False, torch_dtype=torch.float32)
    assert ("extra_proj" if fault == "extra tensor" else "mlp1.3.bias") in str(error.value)


def test_the_processor_placeholder_may_lie_past_the_embedding_but_no_other_token(tiny_hf_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_model_dir)
    vocab_size = read_model_config(tiny_hf_model_dir).llm_config.vocab_size
    assert tokenizer.convert_tokens_to_ids("<video>") == vocab_size  # as in OpenGVLab's -hf tokenizers
    folder = shutil.copytree(tiny_hf_model_dir, tmp_path / "model")
    tokenizer.add_tokens(["<extra>"], special_tokens=True)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"embeds only 1920 .*'<extra>'"):
        load_internvl_model(folder, load_in_4bit=False, torch_dtype=torch.float32)


def test_an_image_token_id_that_differs_from_the_tokenizers_is_an_error(tiny_hf_model_dir, tmp_path):
    folder = shutil.copytree(tiny_hf_model_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["image_token_id"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="image token id"):
        load_internvl_model(folder, load_in_4bit=False, torch_dtype=torch.float32)


@pytest.mark.parametrize(
    ("field", "value"),
    [("vision_feature_select_strategy", "full"), ("projector_hidden_act", "relu"), ("image_seq_length", 64)],
)
def test_hf_configs_this_model_cannot_hold_are_refused(tiny_hf_model_dir, tmp_path, field, value):
    folder = shutil.copytree(tiny_hf_model_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field):
        read_model_config(folder)


# Under ZeRO-3 an unquantized model is partitioned while it loads, through transformers' DeepSpeed path, which
# applies the -hf transforms on its own; a process of its own keeps DeepSpeed's global state out of the others.
ZERO3_LOAD = """
import os, sys, torch, deepspeed
from transformers.integrations import HfDeepSpeedConfig
from internvl.model import load_internvl_model
deepspeed.init_distributed("gloo")
ds_config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                               "train_micro_batch_size_per_gpu": 1, "train_batch_size": 1})
hf, original = (load_internvl_model(p, load_in_4bit=False, torch_dtype=torch.float32) for p in sys.argv[1:3])
pairs = list(zip(hf.named_parameters(), original.named_parameters(), strict=True))
assert all(hasattr(p, "ds_id") for (_, p), _ in pairs), "not partitioned"
for (name, p), (other, q) in pairs:
    with deepspeed.zero.GatheredParameters([p, q]):
        assert name == other and torch.equal(p.data, q.data), name
print(f"{len(pairs)} partitioned parameters equal")
"""


@pytest.mark.e2e
def test_hf_folder_loads_partitioned_under_zero3(tiny_model_dir, tiny_hf_model_dir):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", ZERO3_LOAD, str(tiny_hf_model_dir), str(tiny_model_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "65 partitioned parameters equal" in result.stdout
