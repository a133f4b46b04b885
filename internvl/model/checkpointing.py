"""Gradient checkpointing of only some LLM decoder layers: the memory-budget mode of ``--grad_checkpoint``.

transformers' decoder layers (``GradientCheckpointingLayer``) recompute their forward in backward while their own
``gradient_checkpointing`` flag is set (``InternVLChatModel.gradient_checkpointing_enable`` sets it on every layer).
Clearing it on a layer makes that layer keep its activations instead: faster (no recomputation, a third of the
layer's matmul work in a step with the base frozen), at the memory of its activations. The last layers are left out:
their backward comes first, so their activations are freed before any recomputation starts and the two never add up
at the peak.
"""

from __future__ import annotations

from torch import nn


def decoder_layers(model) -> nn.ModuleList:
    """The LLM's decoder layers of an ``InternVLChatModel`` (under any PEFT wrapper)."""
    return model.base_language_model.model.layers


def leave_layers_uncheckpointed(model, num_layers: int) -> list[int]:
    """Stop checkpointing the last ``num_layers`` decoder layers (the others must be checkpointed: call
    ``gradient_checkpointing_enable`` first); returns the indices of the layers left out."""
    layers = decoder_layers(model)
    if not 0 <= num_layers <= len(layers):
        raise ValueError(f"cannot leave {num_layers} of the LLM's {len(layers)} decoder layers un-checkpointed")
    first_left_out = len(layers) - num_layers
    if not all(layer.gradient_checkpointing for layer in layers[:first_left_out]):
        raise ValueError(
            f"decoder layers 0-{first_left_out - 1} should stay checkpointed but not all of them are: enable "
            "gradient checkpointing first (model.gradient_checkpointing_enable())"
        )
    for layer in layers[first_left_out:]:
        layer.gradient_checkpointing = False
    return list(range(first_left_out, len(layers)))


def checkpointed_layers(model) -> list[int]:
    """Indices of the decoder layers recomputed in backward."""
    return [index for index, layer in enumerate(decoder_layers(model)) if layer.gradient_checkpointing]
