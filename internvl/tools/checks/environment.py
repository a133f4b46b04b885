"""The machine: Python, torch and the GPUs, the packages of requirements_official.txt, and a real bitsandbytes NF4
matmul."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from internvl.tools.checks.context import CheckContext, Checked
from internvl.tools.checks.results import fail, ok, size, warn

REQUIREMENTS_FILE = Path(__file__).resolve().parents[3] / "requirements_official.txt"
# Needed only by evaluation and plots: a missing one is a warning, not a blocker for training.
EVALUATION_PACKAGES = {"rouge-score", "sacrebleu", "pycocoevalcap", "matplotlib"}
# Distributions whose import name differs from the distribution name.
IMPORT_NAMES = {"pillow": "PIL", "rouge-score": "rouge_score"}


def check_python_and_gpus(context: CheckContext) -> Checked:
    """Python and torch versions; the visible GPUs against ``GPUS``, bf16 support, NCCL. Finds ``gpu_memory``."""
    import torch

    settings = context.settings
    results = []
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info < (3, 10):
        results.append(fail("Python", f"{version} is too old", "use Python 3.10 or newer (3.11 is tested)"))
    else:
        results.append(ok("Python", version))
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    results.append(ok("torch", f"{torch.__version__} ({build})"))

    requested = settings.gpus
    if not torch.cuda.is_available():
        if torch.version.cuda is None and shutil.which("nvidia-smi"):
            results.append(fail(
                "GPUs", "this machine has an NVIDIA driver but torch is a CPU-only build",
                "install the CUDA build of torch, e.g. pip install torch --index-url "
                "https://download.pytorch.org/whl/cu128",
            ))
        else:
            hidden = " (CUDA_VISIBLE_DEVICES is empty)" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else ""
            results.append(warn(
                "GPUs", f"no CUDA GPU visible{hidden}: training runs as {requested} CPU processes, which suits "
                "the tiny demo model, not InternVL3-8B",
                "run on a machine with NVIDIA GPUs for real training",
            ))
        return results, context

    count = torch.cuda.device_count()
    devices = [torch.cuda.get_device_properties(i) for i in range(count)]
    names = ", ".join(f"{d.name} ({size(d.total_memory)})" for d in devices)
    if requested > count:
        results.append(fail(
            "GPUs", f"GPUS={requested} but only {count} visible: {names}",
            f"set GPUS={count}, or make more GPUs visible (CUDA_VISIBLE_DEVICES)",
        ))
    else:
        results.append(ok("GPUs", f"{count} visible, training on {requested}: {names}"))
    old = [f"{d.name} (sm_{d.major}{d.minor})" for d in devices[:requested] if (d.major, d.minor) < (8, 0)]
    if old:
        results.append(fail(
            "bf16", f"training runs in bf16, which needs compute capability 8.0+; {', '.join(old)} lack it",
            "use Ampere or newer GPUs (A100, A10, L4, L40, RTX 30xx/40xx, H100/H200)",
        ))
    else:
        results.append(ok("bf16", "supported"))
    if requested * settings.nnodes > 1 and not torch.distributed.is_nccl_available():
        results.append(fail(
            "NCCL", "multi-GPU training needs NCCL, which this torch build lacks",
            "install the CUDA build of torch from https://download.pytorch.org/whl/",
        ))
    return results, replace(context, gpu_memory=tuple(d.total_memory for d in devices))



def check_packages(context: CheckContext) -> Checked:
    """Every package of requirements_official.txt: installed, importable, and inside the supported range."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    if not REQUIREMENTS_FILE.is_file():
        return [warn("requirements", f"{REQUIREMENTS_FILE} not found; package versions not checked")], context
    results = []
    for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        name = requirement.name
        optional = name in EVALUATION_PACKAGES
        install = f"pip install '{requirement}'"
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if optional:
                results.append(warn(name, "not installed (needed for evaluation and plots only)", install))
            else:
                results.append(fail(name, "not installed", install))
            continue
        try:
            importlib.import_module(IMPORT_NAMES.get(name, name.replace("-", "_")))
        except Exception as error:  # a broken install raises anything from ImportError to OSError
            results.append(fail(name, f"{version} is installed but does not import: {error}",
                                f"{install} --force-reinstall"))
            continue
        if requirement.specifier.contains(version, prereleases=True):
            results.append(ok(name, version))
            continue
        minimums = [s.version for s in requirement.specifier if s.operator in (">=", ">", "==", "~=")]
        too_old = any(Version(version) < Version(minimum) for minimum in minimums)
        message = f"{version} is outside the supported range {requirement.specifier}"
        if too_old and not optional:
            results.append(fail(name, message, install))
        else:
            results.append(warn(name, message + " (untested)", install))
    return results, context


def check_bitsandbytes(context: CheckContext) -> Checked:
    """Quantize a small weight to NF4; compare the 4-bit matmul and its input gradient with the dequantized one."""
    name = "bitsandbytes NF4"
    fix = "reinstall bitsandbytes for this platform (pip install -U bitsandbytes), then run python -m bitsandbytes"
    try:
        import bitsandbytes as bnb
        import torch
        from bitsandbytes.functional import dequantize_4bit

        device = "cuda" if torch.cuda.is_available() else "cpu"
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 128, generator=generator)
        # The storage dtype the recipe uses (see internvl.model.loading.build_bnb_config).
        layer = bnb.nn.Linear4bit(
            128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", quant_storage=torch.bfloat16
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16
        )
        layer = layer.to(device)  # quantizes
        x = torch.randn(4, 128, generator=generator).to(device, torch.bfloat16).requires_grad_()
        out = layer(x)
        out.float().sum().backward()

        dequantized = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        reference = x.detach().float() @ dequantized.t()
        grad_reference = torch.ones_like(reference) @ dequantized

        def relative_error(a, b):
            return ((a.float() - b).norm() / b.norm()).item()

        quantization_error = relative_error(dequantized.cpu(), weight)
        forward_error = relative_error(out.detach(), reference)
        backward_error = relative_error(x.grad, grad_reference)
    except Exception as error:
        return [fail(name, f"4-bit smoke test raised {type(error).__name__}: {error}", fix)], context
    # NF4 keeps ~10% relative error on Gaussian weights; bf16 matmuls agree with the reference to ~1e-2.
    if quantization_error > 0.15 or forward_error > 0.02 or backward_error > 0.02:
        return [fail(
            name, f"wrong results on {device}: quantization error {quantization_error:.3f}, matmul error "
            f"{forward_error:.3f}, gradient error {backward_error:.3f}", fix,
        )], context
    return [ok(name, f"quantize + matmul + backward on {device} match the dequantized reference "
                     f"(error {forward_error:.1e})")], context
