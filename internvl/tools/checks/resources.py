"""Memory and disk: the GPU memory and disk space the chosen settings need, against what the machine has.

The estimates come from ``internvl.tools.resource_estimates``; ``docs/SETUP.md`` documents the formulas.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from internvl.constants import INTERNVL3_8B_CONFIG
from internvl.tools.checks.context import CheckContext, Checked
from internvl.tools.checks.results import fail, ok, size, warn
from internvl.tools.checks.settings import int_or
from internvl.tools.resource_estimates import (
    ASSUMED_ANSWER_TOKENS,
    GIB,
    estimate_disk_usage,
    estimate_gpu_memory,
    max_uncheckpointed_layers,
)

if TYPE_CHECKING:  # the model package pulls in torch and transformers: imported when the estimate is made
    from internvl.model.dims import ModelDims


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _dims_for_estimates(model_config) -> tuple[ModelDims, str]:
    """The checked model's sizes; InternVL3-8B's (the shipped config) when the model folder has no usable config."""
    from internvl.model.dims import ModelDims

    if model_config is not None:
        return ModelDims.from_config(model_config), ""
    from internvl.model.configuration import InternVLChatConfig

    config = InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG)
    return ModelDims.from_config(config), f" [for InternVL3-8B, {INTERNVL3_8B_CONFIG.name}: no model config read]"


def _uncheckpointed_layers(context: CheckContext, dims: ModelDims, settings: dict) -> int:
    """Decoder layers training leaves out of gradient checkpointing (--grad_checkpoint_skip_layers; for "auto",
    what training takes on the smallest GPU used, none without a GPU)."""
    from internvl.train.memory_budget import BUDGET_SHARE

    model_args = context.settings.model_args
    if not model_args.grad_checkpoint:
        return dims.num_layers
    layers = model_args.skip_layers_setting()
    if layers != "auto":
        return min(layers, dims.num_layers)
    memory = model_args.grad_checkpoint_memory_gb * GIB if model_args.grad_checkpoint_memory_gb else None
    memory = memory or (min(context.gpu_memory[: max(1, context.settings.gpus)]) if context.gpu_memory else None)
    return max_uncheckpointed_layers(dims, int(BUDGET_SHARE * memory), **settings) if memory else 0


def check_memory(context: CheckContext) -> Checked:
    """The GPU memory the settings need (``internvl.tools.resource_estimates``) against the smallest GPU used.
    Finds ``memory_estimate``."""
    s = context.settings
    dims, assumption = _dims_for_estimates(context.model_config)
    zero = (context.deepspeed_config or {}).get("zero_optimization") or {}
    answer_tokens = context.answer_tokens or ASSUMED_ANSWER_TOKENS
    settings = dict(
        lora_rank=s.lora_rank,
        micro_batch_size=s.per_device_batch_size,
        max_seq_length=s.data_args.max_seq_length,
        max_num_frame=s.data_args.max_num_frame,
        answer_tokens=answer_tokens,
        num_gpus=s.gpus * s.nnodes,
        zero_stage=int_or(zero.get("stage", 0), 0),
        offload_param=(zero.get("offload_param") or {}).get("device", "none") != "none",
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") != "none",
        double_quant=s.model_args.bnb_4bit_use_double_quant,
        fused_kernels=s.model_args.use_liger,
    )
    estimate = estimate_gpu_memory(dims, uncheckpointed_layers=_uncheckpointed_layers(context, dims, settings),
                                   **settings)  # fmt: skip
    context = replace(context, memory_estimate=estimate)
    answers = f"{answer_tokens} answer tokens" + ("" if context.answer_tokens else " assumed (no data read)")
    needs = (f"{estimate.summary()} for micro-batch {s.per_device_batch_size} × {s.data_args.max_seq_length} "
             f"tokens, ≤{estimate.frames_per_sample} frames, {answers}, LoRA r={s.lora_rank}{assumption}")
    if not context.gpu_memory:
        return [warn("GPU memory", f"no GPU to compare with; these settings need {needs}")], context
    available = min(context.gpu_memory[: max(1, s.gpus)])
    lower = ("lower PER_DEVICE_BATCH_SIZE (keep BATCH_SIZE: accumulation grows), --max_seq_length or "
             "--max_num_frame, or use a config with CPU offload (DEEPSPEED_CONFIG=zero_stage3_config.json)")
    if estimate.peak > available:
        return [fail("GPU memory", f"needs {needs}; the smallest GPU has {size(available)}", lower)], context
    if estimate.peak > 0.9 * available:
        return [warn("GPU memory", f"needs {needs}; the smallest GPU has {size(available)}, little margin",
                     lower)], context
    return [ok("GPU memory", f"needs {needs}; the smallest GPU has {size(available)}")], context


def check_output_dir(context: CheckContext) -> Checked:
    """The output folder as training checks it before loading anything (``internvl.train.run_guard``: writable,
    not the base model's, no run in it, a checkpoint it can resume from), and free disk space for the
    checkpoints, the adapter and the merged model. Finds ``disk_estimate``."""
    from internvl.train.checkpoint import last_complete_checkpoint
    from internvl.train.run_guard import (
        RunRefused,
        build_run_record,
        check_output_dir as check_training_output_dir,
        check_resume,
        refuse_if_in_use,
        resume_checkpoint,
    )

    s = context.settings
    target = s.output_dir
    fix = "set OUTPUT_DIR to a writable folder of its own"
    try:
        check_training_output_dir(target, s.model_path)
        refuse_if_in_use(target)
    except RunRefused as error:
        return [fail("output folder", str(error), fix)], context
    probe_dir = _existing_ancestor(target)
    try:
        checkpoint = resume_checkpoint(s.training_args)
        notes = [] if checkpoint is None else check_resume(
            checkpoint, build_run_record(s.model_args, s.data_args, s.training_args, s.gpus * s.nnodes))
    except RunRefused as error:
        return [fail("output folder", str(error), "as the message says")], context
    last_checkpoint, _ = last_complete_checkpoint(target)
    if s.overwrite_output_dir and last_checkpoint is not None:
        results = [warn("output folder", f"{target} holds checkpoints up to {last_checkpoint.name}; "
                                         "--overwrite_output_dir deletes them when training starts")]
    elif checkpoint is None:
        results = [ok("output folder", f"{target} is writable")]
    else:
        results = [ok("output folder", f"{target} is writable; training resumes from {checkpoint.name} "
                                       "(pass --overwrite_output_dir True to start over)")]
    results += [warn("resume", note) for note in notes]

    free = shutil.disk_usage(probe_dir).free
    dims, assumption = _dims_for_estimates(context.model_config)
    estimate = estimate_disk_usage(dims, lora_rank=s.lora_rank, save_total_limit=s.save_total_limit or 1)
    context = replace(context, disk_estimate=estimate)
    need = (f"{size(estimate.total)} ({estimate.checkpoints_kept} checkpoints × {size(estimate.checkpoint)} + "
            f"adapter {size(estimate.final_adapter)} + merged model {size(estimate.merged_model)}){assumption}")
    if free < estimate.total:
        results.append(fail("disk space", f"{size(free)} free at {probe_dir}; the run writes up to {need}",
                            "free disk space, or set OUTPUT_DIR on a larger disk"))
    elif s.save_total_limit is None:
        results.append(warn("disk space", f"{size(free)} free; every checkpoint is kept (no --save_total_limit), "
                                          f"each {size(estimate.checkpoint)}", "pass --save_total_limit N"))
    else:
        results.append(ok("disk space", f"{size(free)} free; the run writes up to {need}"))
    return results, context
