"""DeepSpeed: the runtime and its accelerator, and the DeepSpeed JSON against the batch settings."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from typing import Any

from internvl.tools.checks.context import CheckContext, Checked
from internvl.tools.checks.results import CheckResult, fail, ok, read_json, warn
from internvl.tools.checks.settings import SetupSettings, int_or


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def check_runtime(context: CheckContext) -> Checked:
    """DeepSpeed imports and picked the accelerator the machine has."""
    try:
        import deepspeed
        import torch
        from deepspeed.accelerator import get_accelerator
    except Exception as error:
        return [fail("deepspeed", f"does not import: {error}", "pip install 'deepspeed>=0.19.3,<0.20'")], context
    accelerator = get_accelerator().device_name()
    if torch.cuda.is_available() and accelerator != "cuda":
        return [fail(
            "accelerator", f"DeepSpeed selected '{accelerator}' although CUDA GPUs are visible",
            "unset DS_ACCELERATOR (or set DS_ACCELERATOR=cuda)",
        )], context
    if accelerator == "cpu":
        message = f"DeepSpeed {deepspeed.__version__} runs on the CPU accelerator (gloo)"
        return [warn("accelerator", message)], context
    return [ok("accelerator", f"DeepSpeed {deepspeed.__version__} on {accelerator}"), *_check_arch_list()], context


def _check_arch_list() -> list[CheckResult]:
    """A ``TORCH_CUDA_ARCH_LIST`` that DeepSpeed's op builds cannot parse, and what training does about it."""
    from internvl.train.launch import deepspeed_compatible_arch_list

    fixed = deepspeed_compatible_arch_list(os.environ)
    if fixed is None:
        return []
    return [ok("CUDA architectures", f"{fixed[1]}; the launcher and training do this by themselves")]


def check_config(context: CheckContext) -> Checked:
    """The DeepSpeed JSON: syntax, DeepSpeed's own ZeRO schema, offload paths, its batch values against the
    launcher's, and the tools for the ops DeepSpeed builds on first use. Finds ``deepspeed_config``."""
    settings = context.settings
    path = settings.deepspeed_config
    name = "DeepSpeed config"
    if not path.is_file():
        from internvl.train.arguments import resolve_deepspeed_config

        try:
            resolve_deepspeed_config(str(path))
        except FileNotFoundError as error:  # names the configs shipped in configs/
            fix = "set DEEPSPEED_CONFIG to a file, or to a name shipped in configs/"
            return [fail(name, str(error), fix)], context
    config, error = read_json(path)
    if error:
        return [fail(name, f"not valid JSON: {error}", "fix the JSON syntax at that position")], context
    if not isinstance(config, dict):
        return [fail(name, f"{path} must hold a JSON object", "start from configs/zero_stage3_config.json")], context

    results = []
    zero = config.get("zero_optimization") or {}
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        # DeepSpeed's own schema (unknown keys raise); "auto" values are filled in later by the HF Trainer.
        DeepSpeedZeroConfig(**{k: v for k, v in zero.items() if not _is_auto(v)})
    except Exception as error:
        detail = " ".join(str(error).strip().splitlines()[:3])
        results.append(fail(name, f"invalid zero_optimization in {path}: {detail}",
                            "fix or remove the reported key (see DeepSpeed's ZeRO configuration docs)"))
    stage = int_or(zero.get("stage", 0), 0)
    offload = {part: (zero.get(part) or {}).get("device", "none")
               for part in ("offload_param", "offload_optimizer")}
    for part, device in offload.items():
        nvme_path = (zero.get(part) or {}).get("nvme_path")
        if device == "nvme" and not (nvme_path and os.access(nvme_path, os.W_OK)):
            results.append(fail(name, f"{part} uses nvme but nvme_path {nvme_path!r} is not a writable folder",
                                f"set zero_optimization.{part}.nvme_path in {path} to a writable NVMe folder"))
    if (config.get("fp16") or {}).get("enabled") is True and (config.get("bf16") or {}).get("enabled") is True:
        results.append(fail(name, "fp16 and bf16 are both enabled", 'set both to "auto" (the run uses bf16)'))
    if not results:
        results.append(ok(name, f"{path}: ZeRO stage {stage}, offload parameters={offload['offload_param']}, "
                                f"optimizer={offload['offload_optimizer']}"))
    results += _check_batch_settings(settings, config)
    results += _check_ops(config)
    return results, replace(context, deepspeed_config=config)


def _check_batch_settings(s: SetupSettings, config: dict) -> list[CheckResult]:
    name = "batch size"
    if s.launch_error:
        return [fail(name, f"the launcher refuses these settings: {s.launch_error}",
                     "set GPUS, PER_DEVICE_BATCH_SIZE and BATCH_SIZE so that BATCH_SIZE is a multiple of "
                     "PER_DEVICE_BATCH_SIZE × GPUS × NNODES")]
    world = s.gpus * s.nnodes
    expected = {
        "train_micro_batch_size_per_gpu": (s.per_device_batch_size, "PER_DEVICE_BATCH_SIZE"),
        "gradient_accumulation_steps": (
            s.gradient_accumulation, "BATCH_SIZE / (PER_DEVICE_BATCH_SIZE × GPUS × NNODES)"
        ),
        "train_batch_size": (s.batch_size, "BATCH_SIZE"),
    }
    results = []
    for key, (wanted, source) in expected.items():
        value = config.get(key, "auto")
        if _is_auto(value):
            continue
        if value != wanted:
            results.append(fail(
                name, f"{s.deepspeed_config} sets {key}={value!r}, but {source} = {wanted} (GPUS={s.gpus}, "
                f"NNODES={s.nnodes}, PER_DEVICE_BATCH_SIZE={s.per_device_batch_size}, BATCH_SIZE={s.batch_size})",
                f'set "{key}": "auto" in {s.deepspeed_config} (the Trainer fills it in), or change the '
                "environment to match it",
            ))
    if not results:
        results.append(ok(name, f"{s.batch_size} = {world} process(es) × {s.per_device_batch_size} per device × "
                                f"{s.gradient_accumulation} accumulation steps"))
    return results


def _check_ops(config: dict) -> list[CheckResult]:
    """The ops DeepSpeed compiles on first use (CPU Adam for optimizer offload, FusedAdam without, the CPU
    accelerator's communication op): already in the environment's build cache, or buildable here."""
    from internvl.train.deepspeed_ops import (
        OP_TITLES,
        extension_build_root,
        ops_to_build,
        use_environment_build_cache,
    )

    environ = dict(os.environ)
    use_environment_build_cache(environ)  # the folder training will use
    cache = extension_build_root(environ)
    pending = [OP_TITLES[name] for name in ops_to_build(config, environ)]
    if not pending:
        return [ok("DeepSpeed ops", f"compiled already (cache: {cache})")]
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    tools = (("a C++ compiler", shutil.which(compiler)), ("ninja", is_ninja_available()))
    missing = [what for what, present in tools if not present]
    if missing:
        return [fail(
            "DeepSpeed ops", f"DeepSpeed compiles {' and '.join(pending)} on first use, which needs "
            f"{' and '.join(missing)}",
            "install them (apt install g++; pip install ninja), or pre-build the op: DS_BUILD_CPU_ADAM=1 pip "
            "install --no-cache-dir --force-reinstall deepspeed",
        )]
    return [ok("DeepSpeed ops", f"{' and '.join(pending)} compile on the first run: about a minute, once, "
                                f"cached in {cache} (compiler {compiler} and ninja present)")]
