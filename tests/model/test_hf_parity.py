"""Numerical parity with the InternVL port that ships in transformers (``InternVLForConditionalGeneration``).

The port reproduces the official InternVL computation under the HF-native ("-hf") key names. Before comparing,
the tests check that the two share the pieces whose equivalence is not obvious: the pixel shuffle (the port's is the
official v2 one) and the ViT block (fused qkv split into q/k/v by rows, layer scale, pre-norm, no final norm).
The port has no stochastic depth, which is inactive in eval mode, so logits are comparable exactly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLVisionModel

from internvl.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl.model import InternVisionConfig, InternVisionModel, InternVLChatModel
from internvl.model.internvl_chat import pixel_shuffle


def to_hf_native_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official InternVL key names -> transformers' InternVL port names."""
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("language_model.model."):
            converted["model.language_model." + key[len("language_model.model.") :]] = value
        elif key == "language_model.lm_head.weight":
            converted["lm_head.weight"] = value
        elif key.startswith("mlp1."):
            index, param = key.split(".")[1:]
            name = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}[index]
            converted[f"model.multi_modal_projector.{name}.{param}"] = value
        elif key.startswith("vision_model."):
            converted.update(_convert_vision_key(key[len("vision_model.") :], value))
        else:
            raise KeyError(f"unexpected key {key}")
    return converted


def _convert_vision_key(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = "model.vision_tower."
    embeddings = {
        "embeddings.class_embedding": "embeddings.cls_token",
        "embeddings.position_embedding": "embeddings.position_embeddings",
        "embeddings.patch_embedding.weight": "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embedding.bias": "embeddings.patch_embeddings.projection.bias",
    }
    if key in embeddings:
        return {prefix + embeddings[key]: value}
    _, _, layer, *rest = key.split(".")  # encoder.layers.N.<module>...
    layer_prefix = f"{prefix}encoder.layer.{layer}."
    rest = ".".join(rest)
    if rest.startswith("attn.qkv."):
        param = rest.split(".")[-1]
        query, key_, value_ = value.chunk(3, dim=0)
        return {
            f"{layer_prefix}attention.q_proj.{param}": query,
            f"{layer_prefix}attention.k_proj.{param}": key_,
            f"{layer_prefix}attention.v_proj.{param}": value_,
        }
    renames = {
        "attn.proj.": "attention.projection_layer.",
        "norm1.": "layernorm_before.",
        "norm2.": "layernorm_after.",
        "mlp.fc1.": "mlp.fc1.",
        "mlp.fc2.": "mlp.fc2.",
        "attn.q_norm.": "attention.q_norm.",
        "attn.k_norm.": "attention.k_norm.",
        "ls1": "lambda_1",
        "ls2": "lambda_2",
    }
    for old, new in renames.items():
        if rest.startswith(old):
            return {layer_prefix + new + rest[len(old) :]: value}
    raise KeyError(f"unexpected vision key {key}")


def hf_native_vision_config(vision: InternVisionConfig) -> InternVLVisionConfig:
    return InternVLVisionConfig(
        hidden_size=vision.hidden_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        intermediate_size=vision.intermediate_size,
        attention_bias=vision.qkv_bias,
        use_qk_norm=vision.qk_normalization,
        hidden_act=vision.hidden_act,
        norm_type=vision.norm_type,
        layer_norm_eps=vision.layer_norm_eps,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        layer_scale_init_value=vision.initializer_factor,
        use_mean_pooling=True,  # no final norm, as in InternViT
    )


def hf_native_config(model: InternVLChatModel) -> InternVLConfig:
    return InternVLConfig(
        vision_config=hf_native_vision_config(model.config.vision_config),
        text_config=model.config.llm_config.to_dict(),
        image_token_id=model.img_context_token_id,
        image_seq_length=model.num_image_token,
        downsample_ratio=model.config.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=model.config.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def model_pair(tiny_model_dir, tiny_tokenizer):
    ours = InternVLChatModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    ours.img_context_token_id = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    # Random weights are small; scale the layer scales and position embeddings up so the vision path matters.
    with torch.no_grad():
        for layer in ours.vision_model.encoder.layers:
            layer.ls1.fill_(1.0)
            layer.ls2.fill_(1.0)
    hf = InternVLForConditionalGeneration(hf_native_config(ours)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_native_state_dict(ours.state_dict()), strict=False)
    # Only non-persistent buffers may be absent from a state dict.
    assert not unexpected
    assert all("rotary_emb" in key for key in missing), missing
    return ours, hf


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
    hf = InternVLVisionModel(hf_native_vision_config(config)).eval()
    converted = to_hf_native_state_dict({f"vision_model.{k}": v for k, v in ours.state_dict().items()})
    hf.load_state_dict({k.removeprefix("model.vision_tower."): v for k, v in converted.items()}, strict=True)
    pixel_values = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        our_hidden = ours(pixel_values).last_hidden_state
        hf_hidden = hf(pixel_values).last_hidden_state
    assert our_hidden.shape == (2, 1 + (image_size // 14) ** 2, 64)
    torch.testing.assert_close(our_hidden, hf_hidden, rtol=1e-4, atol=1e-4)


def test_image_features_match_hf_port(model_pair):
    ours, hf = model_pair
    pixel_values = torch.randn(3, 3, 448, 448)
    with torch.no_grad():
        our_features = ours.extract_feature(pixel_values)
        hf_features = hf.model.get_image_features(pixel_values=pixel_values).pooler_output
    assert our_features.shape == (3, ours.num_image_token, ours.config.llm_config.hidden_size)
    torch.testing.assert_close(our_features, hf_features, rtol=1e-4, atol=1e-4)


def test_logits_match_hf_port_with_image_tokens(model_pair, tiny_tokenizer):
    ours, hf = model_pair
    num_tiles = 2
    image_tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (ours.num_image_token * num_tiles) + IMG_END_TOKEN
    prompt = f"<|im_start|>user\n{image_tokens}\nWhat happens in the video?<|im_end|>\n<|im_start|>assistant\n"
    input_ids = tiny_tokenizer(prompt, return_tensors="pt").input_ids
    attention_mask = torch.ones_like(input_ids)
    pixel_values = torch.randn(num_tiles, 3, 448, 448)
    with torch.no_grad():
        our_logits = ours(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
        hf_logits = hf(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
        text_only = ours.language_model(input_ids=input_ids, attention_mask=attention_mask).logits
    # The images must actually change the answer, or the comparison would not cover the vision path.
    assert (our_logits - text_only).abs().max() > 1e-2
    torch.testing.assert_close(our_logits, hf_logits, rtol=0, atol=1e-3)
