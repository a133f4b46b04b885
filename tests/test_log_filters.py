"""Known-benign messages of the dependencies are dropped where they are emitted; everything else still shows."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from internvl import log_filters

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "logger_name, message",
    [
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module "
                                          "named 'kernels'. Please make sure you already `pip install kernels`"),
        ("accelerate.accelerator", "[RANK 0] Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, "
                                   "DeepSpeed config has 4. Using DeepSpeed's value."),
        ("torch.utils.cpp_extension", "No CUDA runtime is found, using CUDA_HOME='/usr/local'"),
    ],
)  # fmt: skip
def test_benign_messages_are_dropped_and_others_kept(logger_name, message, caplog):
    log_filters.install()
    log_filters.install()  # idempotent: one filter per logger
    logger = logging.getLogger(logger_name)
    assert sum(isinstance(f, log_filters.DropBenignMessages) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger_name):
        logger.warning(message)
        logger.warning("something else went wrong")
    assert [record.getMessage() for record in caplog.records] == ["something else went wrong"]


def test_a_mismatch_that_changes_the_accumulation_is_not_hidden(caplog):
    log_filters.install()
    logger = logging.getLogger("accelerate.accelerator")
    with caplog.at_level(logging.WARNING, logger="accelerate.accelerator"):
        logger.warning("Gradient accumulation steps mismatch: GradientAccumulationPlugin has 4, DeepSpeed config has "
                       "8. Using DeepSpeed's value.")  # fmt: skip
    assert len(caplog.records) == 1


def test_importing_bitsandbytes_after_the_package_prints_no_kernels_warning():
    """The warning is emitted at bitsandbytes' import, in every process; the package's import comes first."""
    raw = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, cwd=REPO)
    if "kernels-community" not in raw.stderr:
        pytest.skip("bitsandbytes emits the kernels warning only on CPUs with AVX512-BF16, which this one lacks")
    filtered = subprocess.run([sys.executable, "-c", "import internvl, bitsandbytes"], capture_output=True, text=True,
                              cwd=REPO)  # fmt: skip
    assert filtered.returncode == 0 and "kernels-community" not in filtered.stderr
