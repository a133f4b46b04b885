"""4-bit loading, LoRA wrapping and training steps (CPU, tiny model; the LoRA count uses the real 8B shape)."""

from __future__ import annotations

import warnings

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Params4bit
from torch import nn

from internvl.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, INTERNVL3_8B_CONFIG
from internvl.model import InternVLChatConfig, InternVLChatModel, build_bnb_config, load_internvl_model



def training_batch(model, tokenizer, num_tiles: int = 2) -> dict[str, torch.Tensor]:
    """A video-like sample for ``model``: ``num_tiles`` frames, a question and a supervised answer, on its device.

    (On a CUDA machine transformers puts a 4-bit model on the GPU.)
    """
    num_image_token = model.num_image_token
    image = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * num_image_token + IMG_END_TOKEN
    frames = "".join(f"Frame-{i + 1}: {image}\n" for i in range(num_tiles))
    prompt = f"<|im_start|>user\n{frames}Summarize the video.<|im_end|>\n<|im_start|>assistant\n"
    answer = "A man walks a dog in the rain.<|im_end|>\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    input_ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": torch.ones_like(input_ids),
        "position_ids": torch.arange(input_ids.shape[1])[None],
        "pixel_values": torch.randn(num_tiles, 3, 448, 448, generator=generator),
        "image_flags": torch.ones(num_tiles, dtype=torch.long),
    }
    device = model.get_input_embeddings().weight.device
    return {name: tensor.to(device) for name, tensor in batch.items()}


def freeze_vision_and_projector(model: InternVLChatModel) -> None:
    for param in [*model.vision_model.parameters(), *model.mlp1.parameters()]:
        param.requires_grad_(False)


@pytest.fixture()
def qlora_model(tiny_model_dir):
    model = load_internvl_model(tiny_model_dir, load_in_4bit=True, torch_dtype=torch.bfloat16)
    freeze_vision_and_projector(model)
    model.wrap_llm_lora(r=8, lora_alpha=16, lora_dropout=0.0)
    return model


def test_bnb_config_is_zero3_friendly():
    config = build_bnb_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_quant_storage == torch.bfloat16  # ZeRO-3 partitions float storage only
    assert set(config.llm_int8_skip_modules) == {"vision_model", "mlp1", "lm_head"}


def test_4bit_load_quantizes_exactly_the_llm_layer_linears(tiny_model_dir):
    model = load_internvl_model(tiny_model_dir, load_in_4bit=True)
    quantized = {name for name, module in model.named_modules() if isinstance(module, Linear4bit)}
    llm_layer_linears = {
        name
        for name, module in model.language_model.model.layers.named_modules(prefix="language_model.model.layers")
        if isinstance(module, nn.Linear)
    }
    assert len(llm_layer_linears) == 2 * 7
    assert quantized == llm_layer_linears
    for name in quantized:
        weight = model.get_submodule(name).weight
        assert isinstance(weight, Params4bit) and weight.dtype == torch.bfloat16 and weight.bnb_quantized
    kept = [model.lm_head, model.mlp1[1], model.mlp1[3], model.vision_model.encoder.layers[0].attn.qkv]
    assert all(type(module) is nn.Linear and module.weight.dtype == torch.bfloat16 for module in kept)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.vision_model.embeddings.position_embedding.dtype == torch.bfloat16
    assert model.img_context_token_id is not None


def test_config_overrides_apply_before_the_model_is_built(tiny_model_dir):
    model = load_internvl_model(
        tiny_model_dir,
        load_in_4bit=False,
        config_overrides={"ps_version": "v1", "template": "Hermes-2", "drop_path_rate": 0.2, "max_dynamic_patch": 6},
    )
    assert (model.config.ps_version, model.template, model.config.max_dynamic_patch) == ("v1", "Hermes-2", 6)
    assert model.vision_model.encoder.layers[-1].drop_path1.drop_prob == pytest.approx(0.2)
    with pytest.raises(ValueError, match="not supported"):
        load_internvl_model(tiny_model_dir, load_in_4bit=False, config_overrides={"num_hidden_layers": 1})


def test_wrapping_lora_hides_only_peft_s_own_deprecation_warning(tiny_model_dir):
    model = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    message = "`is_gradient_checkpointing` is deprecated"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.wrap_llm_lora(r=4)
        assert not [w for w in caught if message in str(w.message)]
        warnings.warn(f"{message} (raised by user code)", FutureWarning)  # the filter does not outlive the wrap
    assert [w for w in caught if message in str(w.message)]


def test_lora_trainable_parameters_on_the_internvl3_8b_shape():
    config = InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG)
    with torch.device("meta"):
        model = InternVLChatModel(config)
    freeze_vision_and_projector(model)
    model.wrap_llm_lora(r=32, lora_alpha=64, lora_dropout=0.05)
    trainable = {name: param.numel() for name, param in model.named_parameters() if param.requires_grad}
    assert sum(trainable.values()) == 80_740_352
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert all(name.startswith("language_model.") for name in trainable)
    assert len(trainable) == 28 * 7 * 2
    assert model.config.use_llm_lora == 32


def test_qlora_backward_reaches_only_lora_weights(qlora_model, tiny_tokenizer):
    qlora_model.train()
    batch = training_batch(qlora_model, tiny_tokenizer)
    loss = qlora_model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {name: param.grad for name, param in qlora_model.named_parameters() if param.grad is not None}
    lora_b = [name for name in grads if ".lora_B." in name]
    assert len(lora_b) == 2 * 7
    # lora_B starts at zero, so lora_A gets no gradient on the first step; lora_B must.
    assert all(grads[name].abs().sum() > 0 for name in lora_b)
    assert all(".lora_" in name for name in grads)
    assert not any(param.requires_grad for param in qlora_model.vision_model.parameters())


def test_qlora_training_steps_lower_the_loss(qlora_model, tiny_tokenizer):
    qlora_model.train()
    batch = training_batch(qlora_model, tiny_tokenizer)
    optimizer = torch.optim.AdamW([p for p in qlora_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = qlora_model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_gradient_checkpointing_gives_the_same_lora_gradients(qlora_model, tiny_tokenizer):
    qlora_model.train()
    batch = training_batch(qlora_model, tiny_tokenizer, num_tiles=1)

    def lora_b_grads() -> dict[str, torch.Tensor]:
        qlora_model.zero_grad()
        qlora_model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in qlora_model.named_parameters() if ".lora_B." in n}

    reference = lora_b_grads()
    qlora_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert qlora_model.base_language_model.model.layers[0].gradient_checkpointing
    # One input-grad hook on the embeddings, however many times LoRA wrapping and checkpointing installed it.
    assert len(qlora_model.get_input_embeddings()._forward_hooks) == 1
    checkpointed = lora_b_grads()
    assert reference.keys() == checkpointed.keys()
    for name, grad in reference.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-2, atol=1e-5, msg=name)


def test_backbone_lora_trains_the_vision_tower(tiny_model_dir, tiny_tokenizer):
    model = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    for param in model.parameters():
        param.requires_grad_(False)
    model.wrap_backbone_lora(r=4)
    lora_names = [name for name, param in model.named_parameters() if param.requires_grad]
    assert lora_names and all(name.startswith("vision_model.") and ".lora_" in name for name in lora_names)
    assert model.config.use_backbone_lora == 4
    model.train()
    model(**training_batch(model, tiny_tokenizer, num_tiles=1)).loss.backward()
    lora_b = [param.grad for name, param in model.named_parameters() if ".lora_B." in name]
    assert len(lora_b) == 2 * 4 and all(grad is not None and grad.abs().sum() > 0 for grad in lora_b)
