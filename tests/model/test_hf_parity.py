"""Numerical parity with the InternVL port that ships in transformers (``InternVLForConditionalGeneration``).

The tiny model is written in the -hf layout by ``internvl.model.hf_layout`` and read by transformers' own class,
read back into ``InternVLChatModel``, and written in the official layout again: the logits agree everywhere in fp32.
The tests also check the pieces whose equivalence is not obvious: the pixel shuffle (the port's is the official v2
one) and the ViT block variants (fused qkv split into q/k/v by rows, layer scale, pre-norm, no final norm, RMSNorm
and q/k normalisation). The port has no stochastic depth, which is inactive in eval mode.
"""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLForConditionalGeneration
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLVisionModel

from internvl.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl.model import InternVisionConfig, InternVisionModel, load_internvl_model, load_tokenizer
from internvl.model.hf_layout import hf_config_from_chat, original_to_hf_state_dict, save_in_hf_layout
from internvl.model.internvl_chat import pixel_shuffle
from internvl.model.tiny import tiny_config

# fp32 throughout; the two implementations order a few reductions differently.
ATOL = 1e-4


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """(ours, transformers' class on the -hf folder, ours read from the -hf folder, ours read from the official
    folder written from that), all holding the tiny model's weights."""
    ours = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32).eval()
    # Random weights are small; scale the layer scales up so the vision path matters.
    with torch.no_grad():
        for layer in ours.vision_model.encoder.layers:
            layer.ls1.fill_(1.0)
            layer.ls2.fill_(1.0)
    tokenizer = load_tokenizer(tiny_model_dir)
    folder = tmp_path_factory.mktemp("parity")
    save_in_hf_layout(ours, tokenizer, folder / "hf")
    hf = InternVLForConditionalGeneration.from_pretrained(folder / "hf", dtype=torch.float32).eval()
    from_hf = load_internvl_model(folder / "hf", load_in_4bit=False, torch_dtype=torch.float32).eval()
    from_hf.save_pretrained(folder / "original")
    tokenizer.save_pretrained(folder / "original")
    back = load_internvl_model(folder / "original", load_in_4bit=False, torch_dtype=torch.float32).eval()
    return ours, hf, from_hf, back


def test_hf_port_pixel_shuffle_is_ps_version_v2():
    features = torch.randn(2, 8, 8, 6)
    hf_shuffle = InternVLModel.pixel_shuffle(None, features, scale_factor=0.5)
    torch.testing.assert_close(pixel_shuffle(features, 0.5, "v2"), hf_shuffle, rtol=0, atol=0)


@pytest.mark.parametrize("image_size", [448, 224])
def test_intern_vit_6b_style_blocks_and_resized_positions_match_hf_port(image_size):
    """RMSNorm, query/key normalisation and no qkv bias (the InternViT-6B variant), on the trained grid and on a
    smaller one, where the position embeddings are resized."""
    config = InternVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=448,
        qkv_bias=False,
        qk_normalization=True,
        norm_type="rms_norm",
        initializer_factor=1.0,
    )
    torch.manual_seed(0)
    ours = InternVisionModel(config).eval()
    with torch.no_grad():  # large enough that the position embeddings (and their resizing) shape the output
        ours.embeddings.position_embedding.normal_(std=1.0)
    chat_config = tiny_config()
    chat_config.vision_config = config
    hf = InternVLVisionModel(hf_config_from_chat(chat_config, image_token_id=0).vision_config).eval()
    converted = original_to_hf_state_dict({f"vision_model.{k}": v for k, v in ours.state_dict().items()})
    hf.load_state_dict({k.removeprefix("model.vision_tower."): v for k, v in converted.items()}, strict=True)
    pixel_values = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        our_hidden = ours(pixel_values).last_hidden_state
        hf_hidden = hf(pixel_values).last_hidden_state
    assert our_hidden.shape == (2, 1 + (image_size // 14) ** 2, 64)
    torch.testing.assert_close(our_hidden, hf_hidden, rtol=ATOL, atol=ATOL)


def test_image_features_match_hf_port(converted):
    ours, hf, _, _ = converted
    pixel_values = torch.randn(3, 3, 448, 448)
    with torch.no_grad():
        our_features = ours.extract_feature(pixel_values)
        hf_features = hf.model.get_image_features(pixel_values=pixel_values).pooler_output
    assert our_features.shape == (3, ours.num_image_token, ours.config.llm_config.hidden_size)
    torch.testing.assert_close(our_features, hf_features, rtol=ATOL, atol=ATOL)


def test_logits_match_in_both_layouts_and_in_the_hf_port(converted, tiny_tokenizer):
    ours, hf, from_hf, back = converted
    num_tiles = 2
    image_tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (ours.num_image_token * num_tiles) + IMG_END_TOKEN
    prompt = f"<|im_start|>user\n{image_tokens}\nWhat happens in the video?<|im_end|>\n<|im_start|>assistant\n"
    inputs = dict(input_ids=tiny_tokenizer(prompt, return_tensors="pt").input_ids)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    pixel_values = torch.randn(num_tiles, 3, 448, 448)
    with torch.no_grad():
        expected = ours(pixel_values=pixel_values, **inputs).logits
        hf_logits = hf(pixel_values=pixel_values, **inputs).logits
        from_hf_logits = from_hf(pixel_values=pixel_values, **inputs).logits
        back_logits = back(pixel_values=pixel_values, **inputs).logits
        text_only = ours.language_model(**inputs).logits
    # The images must actually change the answer, or the comparison would not cover the vision path.
    assert (expected - text_only).abs().max() > 1e-2
    torch.testing.assert_close(hf_logits, expected, rtol=0, atol=ATOL)
    # Reading and writing the layouts moves the tensors without touching them.
    torch.testing.assert_close(from_hf_logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(back_logits, expected, rtol=0, atol=0)
