"""The machine checks: package versions, the bitsandbytes NF4 smoke test, the visible GPUs."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from internvl.tools.checks import Status, environment
from internvl.tools.resource_estimates import GIB
from tests.tools.checks.test_settings import REPO, context_for


def test_packages_missing_or_too_old(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("torch>=99  # too old\nsurely-not-an-installed-package>=1\nmatplotlib<0.1\n")
    monkeypatch.setattr(environment, "REQUIREMENTS_FILE", requirements)
    results, _ = environment.check_packages(context_for(tmp_path))
    results = {r.name: r for r in results}
    assert results["torch"].status == Status.FAIL and "torch>=99" in results["torch"].fix
    assert results["surely-not-an-installed-package"].status == Status.FAIL
    assert results["matplotlib"].status == Status.WARN  # newer than tested, and only needed for plots


def test_bitsandbytes_check_catches_a_wrong_4bit_matmul(tmp_path, monkeypatch):
    import bitsandbytes

    [result], _ = environment.check_bitsandbytes(context_for(tmp_path))
    assert result.status == Status.OK
    correct = bitsandbytes.matmul_4bit
    monkeypatch.setattr(bitsandbytes, "matmul_4bit", lambda *args, **kwargs: correct(*args, **kwargs) * 1.5)
    [result], _ = environment.check_bitsandbytes(context_for(tmp_path))
    assert result.status == Status.FAIL and "matmul error" in result.message


def test_gpu_checks_against_the_visible_gpus(good_setup, monkeypatch):
    import torch

    gpus = [SimpleNamespace(name="NVIDIA A100-SXM4-80GB", total_memory=80 * GIB, major=8, minor=0),
            SimpleNamespace(name="Tesla V100-SXM2-32GB", total_memory=32 * GIB, major=7, minor=0)]  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpus[index])

    results, context = environment.check_python_and_gpus(context_for(good_setup, GPUS="1"))
    results = {r.name: r for r in results}
    assert results["GPUs"].status == Status.OK and "A100" in results["GPUs"].message
    assert results["bf16"].status == Status.OK  # only the first GPU is used
    assert context.gpu_memory == (80 * GIB, 32 * GIB)  # handed on to the memory check

    results, _ = environment.check_python_and_gpus(context_for(good_setup, GPUS="3"))
    results = {r.name: r for r in results}
    assert results["GPUs"].status == Status.FAIL and "GPUS=3" in results["GPUs"].message
    assert "GPUS=2" in results["GPUs"].fix
    assert results["bf16"].status == Status.FAIL and "V100" in results["bf16"].message


def test_importing_the_checks_leaves_torch_to_the_checks():
    """torch, transformers and the model package are imported by the checks that examine them, not on import."""
    code = "import sys, internvl.tools.checks; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
