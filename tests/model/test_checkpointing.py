"""Leaving the last decoder layers out of gradient checkpointing (tiny model, CPU): exactly those layers stop being
recomputed, and the gradients stay those of full checkpointing."""

from __future__ import annotations

import pytest
import torch

from internvl.model.checkpointing import checkpointed_layers, decoder_layers, leave_layers_uncheckpointed
from tests.model.test_qlora import training_batch


def _training_model(tiny_lora_model, lora_dropout: float):
    model = tiny_lora_model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = lora_dropout
    model.gradient_checkpointing_enable()
    return model


def _forward_calls_and_grads(model, batch, seed: int = 0):
    """Forward runs of each decoder layer over one forward + backward, the loss and the LoRA gradients.

    A layer's own hooks stay outside its checkpoint (transformers checkpoints ``forward``, not ``__call__``): its
    runs are counted on its first sub-module, which runs again when the layer is recomputed."""
    calls = [0] * len(decoder_layers(model))
    hooks = [
        layer.input_layernorm.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(decoder_layers(model))
    ]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    return calls, loss.item(), grads


@pytest.mark.parametrize("lora_dropout", [0.0, 0.05])
def test_left_out_layers_are_not_recomputed_and_gradients_do_not_change(tiny_lora_model, tiny_tokenizer,
                                                                        lora_dropout):  # fmt: skip
    model = _training_model(tiny_lora_model, lora_dropout)
    batch = training_batch(model, tiny_tokenizer)
    num_layers = len(decoder_layers(model))
    assert num_layers == 2

    full_calls, full_loss, full_grads = _forward_calls_and_grads(model, batch)
    assert full_calls == [2] * num_layers  # forward, then recomputed in backward

    assert leave_layers_uncheckpointed(model, 1) == [1]
    assert checkpointed_layers(model) == [0]
    calls, loss, grads = _forward_calls_and_grads(model, batch)
    assert calls == [2, 1]
    # Dropout masks are the same: reentrant checkpointing replays the RNG state of the first forward.
    assert loss == full_loss
    assert grads.keys() == full_grads.keys() and len(grads) == 2 * 7 * num_layers
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)

    assert leave_layers_uncheckpointed(model, num_layers) == [0, 1]
    calls, loss, grads = _forward_calls_and_grads(model, batch)
    assert calls == [1, 1] and loss == full_loss
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_leaving_layers_out_needs_checkpointing_and_a_possible_count(tiny_lora_model):
    with pytest.raises(ValueError, match="enable gradient checkpointing first"):
        leave_layers_uncheckpointed(tiny_lora_model, 1)
    tiny_lora_model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="cannot leave 3 of the LLM's 2 decoder layers"):
        leave_layers_uncheckpointed(tiny_lora_model, 3)
    assert leave_layers_uncheckpointed(tiny_lora_model, 0) == []
    assert checkpointed_layers(tiny_lora_model) == [0, 1]
    leave_layers_uncheckpointed(tiny_lora_model, 2)
    with pytest.raises(ValueError, match="enable gradient checkpointing first"):  # cannot checkpoint them again
        leave_layers_uncheckpointed(tiny_lora_model, 1)
