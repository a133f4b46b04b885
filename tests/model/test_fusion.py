"""Fused kernels in the LLM: Liger's wiring (on any machine) and its numbers (CUDA only), regional torch.compile's
numbers on the CPU. Speed must not change the math: 20 training steps of the tiny QLoRA model (NF4, LoRA r8 with
dropout 0.05) give losses within 1% of the unfused path, and the first gradients match."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2 import modeling_qwen2

from internvl.model import fusion
from internvl.model.fusion import apply_liger_kernels, check_liger_usable, compile_decoder_layers
from internvl.model.loading import load_internvl_model
from tests.model.test_qlora import freeze_vision_and_projector, training_batch

STEPS = 20


@pytest.fixture
def restore_qwen2_globals(monkeypatch):
    """Liger replaces module-level functions and classes of transformers' Qwen2 code: put them back afterwards."""
    for name in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP"):
        monkeypatch.setattr(modeling_qwen2, name, getattr(modeling_qwen2, name))


def qlora_model(model_dir):
    model = load_internvl_model(model_dir, load_in_4bit=True, torch_dtype=torch.bfloat16)
    freeze_vision_and_projector(model)
    torch.manual_seed(0)
    model.wrap_llm_lora(r=8, lora_alpha=16, lora_dropout=0.05)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero adapter, so that the LoRA path changes the outputs from the first step
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.gradient_checkpointing_enable()
    return model.train()


def train(model, batch, steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of ``steps`` AdamW steps on one batch (seeded per step: the dropout masks), and the first gradients."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, first_grads = [], {}
    for step in range(steps):
        torch.manual_seed(100 + step)
        loss = model(**batch).loss
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, first_grads


def assert_same_training(fused, unfused):
    (losses, grads), (reference_losses, reference_grads) = fused, unfused
    assert len(losses) == len(reference_losses) == STEPS
    for step, (loss, reference) in enumerate(zip(losses, reference_losses)):
        assert abs(loss - reference) <= 0.01 * abs(reference), f"step {step}: {loss} vs {reference}"
    assert grads.keys() == reference_grads.keys() and grads
    for name, grad in grads.items():
        reference = reference_grads[name]
        # bf16 activations: compare each gradient tensor as a whole, relative to its norm.
        assert (grad - reference).norm() <= 0.02 * reference.norm() + 1e-8, name


def test_liger_kernels_replace_the_llms_norms_mlps_and_rope(tiny_model_dir, restore_qwen2_globals):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    model = qlora_model(tiny_model_dir)
    vision_forwards = {name: type(m).forward for name, m in model.vision_model.named_modules()}
    note = apply_liger_kernels(model)

    llm = model.base_language_model.model
    norms = [llm.norm] + [n for layer in llm.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert all(norm.forward.__func__ is LigerRMSNorm.forward for norm in norms)
    assert all(layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward for layer in llm.layers)
    assert modeling_qwen2.apply_rotary_pos_emb is liger_rotary_pos_emb
    # The MLP's projections are still the LoRA layers Liger's forward calls.
    assert all(hasattr(layer.mlp.gate_proj, "lora_A") for layer in llm.layers)
    # The vision tower keeps its own modules' forwards.
    assert all("forward" not in m.__dict__ for m in model.vision_model.modules())
    assert {name: type(m).forward for name, m in model.vision_model.named_modules()} == vision_forwards
    assert note == "Liger kernels in the LLM: RMSNorm (5 norms), SwiGLU (2 MLPs) and RoPE (Qwen2ForCausalLM)."


def test_liger_needs_a_cuda_gpu_and_the_package(monkeypatch):
    monkeypatch.setattr(fusion.torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA GPUs.*--use_liger False"):
        check_liger_usable()
    monkeypatch.setattr(fusion.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fusion.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="requirements_gpu.txt"):
        check_liger_usable()


def test_liger_refuses_an_llm_it_has_no_kernels_for(tiny_model_dir):
    model = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    model.config.llm_config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="no Liger kernels for a GPT2LMHeadModel LLM"):
        apply_liger_kernels(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton GPU kernels")
def test_liger_trains_like_the_unfused_model(tiny_model_dir, tiny_tokenizer, restore_qwen2_globals):
    unfused = qlora_model(tiny_model_dir)
    batch = training_batch(unfused, tiny_tokenizer)
    reference = train(unfused, batch)
    fused = qlora_model(tiny_model_dir)
    apply_liger_kernels(fused)
    assert_same_training(train(fused, batch), reference)


@pytest.mark.e2e  # compiling takes a minute on a CPU
def test_compiled_layers_train_like_eager(tiny_model_dir, tiny_tokenizer, monkeypatch):
    # Inductor draws dropout masks from its own generator; its fallback draws eager's, so the masks are the same.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    eager = qlora_model(tiny_model_dir)
    batch = training_batch(eager, tiny_tokenizer)
    reference = train(eager, batch)
    compiled = qlora_model(tiny_model_dir)
    note = compile_decoder_layers(compiled)
    assert note == "torch.compile: each of the 2 LLM decoder layers compiled on its own (regional)."
    assert_same_training(train(compiled, batch), reference)
