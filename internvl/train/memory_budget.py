"""``--grad_checkpoint_skip_layers``: how many LLM decoder layers the run leaves out of gradient checkpointing.

A number is taken as is; ``auto`` takes the most layers whose activations fit the GPU memory budget by the setup
check's memory estimate (``internvl.tools.resource_estimates``) for this run's micro-batch, ``--max_seq_length``,
frames, LoRA rank and DeepSpeed config. The layers are then left out by ``internvl.model.checkpointing``.
"""

from __future__ import annotations

import torch

from internvl.model.checkpointing import decoder_layers, leave_layers_uncheckpointed
from internvl.model.dims import ModelDims
from internvl.tools.resource_estimates import ASSUMED_ANSWER_TOKENS, GIB, max_uncheckpointed_layers

# Share of the memory budget the estimated peak may take: the estimate counts PyTorch's allocations; the
# allocator's cache comes on top (docs/SETUP.md).
BUDGET_SHARE = 0.9


def gpu_memory_budget(memory_gb: float | None) -> int:
    """Bytes per process to plan for: ``memory_gb``, else what this process's GPU holds (under any cap set with
    ``torch.cuda.set_per_process_memory_fraction``, as the benchmark's ``--gpu-memory-cap-gb`` does)."""
    if memory_gb:
        return int(memory_gb * GIB)
    if not torch.cuda.is_available():
        raise ValueError(
            "--grad_checkpoint_skip_layers auto sizes itself on the GPU's memory and there is no GPU: pass "
            "--grad_checkpoint_memory_gb, or a number of layers."
        )
    device = torch.cuda.current_device()
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    return int(torch.cuda.get_device_properties(device).total_memory * fraction)


def auto_uncheckpointed_layers(model, model_args, data_args, training_args) -> tuple[int, int]:
    """(layers, budget in bytes) for ``--grad_checkpoint_skip_layers auto``."""
    budget = gpu_memory_budget(model_args.grad_checkpoint_memory_gb)
    ds_config = training_args.hf_deepspeed_config.config if training_args.deepspeed else {}
    zero = ds_config.get("zero_optimization") or {}
    layers = max_uncheckpointed_layers(
        ModelDims.from_config(model.config),
        int(BUDGET_SHARE * budget),
        lora_rank=model_args.use_llm_lora,
        micro_batch_size=training_args.per_device_train_batch_size,
        max_seq_length=data_args.max_seq_length,
        max_num_frame=data_args.max_num_frame,
        answer_tokens=ASSUMED_ANSWER_TOKENS,
        num_gpus=training_args.world_size,
        zero_stage=int(zero.get("stage", 0)),
        offload_param=(zero.get("offload_param") or {}).get("device", "none") != "none",
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") != "none",
        double_quant=model_args.bnb_4bit_use_double_quant,
        fused_kernels=model_args.use_liger,
    )
    return layers, budget


def leave_layers_out_of_checkpointing(model, model_args, data_args, training_args) -> str | None:
    """Apply ``--grad_checkpoint_skip_layers`` to a model whose decoder layers are all checkpointed; returns what
    to log (None when every layer stays checkpointed by request)."""
    layers = model_args.skip_layers_setting()
    if not model_args.grad_checkpoint or layers == 0:
        return None
    how = ""
    if layers == "auto":
        layers, budget = auto_uncheckpointed_layers(model, model_args, data_args, training_args)
        how = (f" (--grad_checkpoint_skip_layers auto: the most that keep the estimated peak within "
               f"{BUDGET_SHARE:.0%} of {budget / GIB:.1f} GiB per GPU at micro-batch "
               f"{training_args.per_device_train_batch_size} x {data_args.max_seq_length} tokens)")  # fmt: skip
    total = len(decoder_layers(model))
    left_out = leave_layers_uncheckpointed(model, layers)
    if not left_out:
        return f"Gradient checkpointing: all {total} decoder layers{how}."
    if len(left_out) == total:
        return f"Gradient checkpointing: none of the {total} decoder layers; all keep their activations{how}."
    return (f"Gradient checkpointing: decoder layers 0-{left_out[0] - 1} of {total}; layers {left_out[0]}-"
            f"{left_out[-1]} keep their activations{how}.")  # fmt: skip
