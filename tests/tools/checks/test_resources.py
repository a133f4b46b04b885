"""The memory and disk checks: the estimate against the smallest GPU used, the output folder and its free space."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from internvl.constants import INTERNVL3_8B_CONFIG
from internvl.model.configuration import InternVLChatConfig
from internvl.tools.checks import Status, resources
from internvl.tools.checks.context import CheckContext
from internvl.tools.checks.settings import SetupSettings
from internvl.tools.resource_estimates import GIB
from tests.tools.checks.test_settings import REPO, context_for, launcher_env


def test_memory_check_compares_with_the_smallest_gpu(good_setup):
    context = replace(
        context_for(good_setup, PER_DEVICE_BATCH_SIZE="4", BATCH_SIZE="8"),
        model_config=InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG),
        deepspeed_config=json.loads((REPO / "configs" / "zero_stage3_config.json").read_text()),
        gpu_memory=(141 * GIB, 16 * GIB),
    )
    [result], found = resources.check_memory(context)
    assert result.status == Status.FAIL and "PER_DEVICE_BATCH_SIZE" in result.fix
    assert found.memory_estimate.peak > 16 * GIB
    [result], _ = resources.check_memory(replace(context, gpu_memory=(141 * GIB, 141 * GIB)))
    assert result.status == Status.OK


def test_memory_check_says_what_it_assumed(good_setup):
    """Without a model config or data read, the estimate is for InternVL3-8B and an assumed answer length."""
    [result], _ = resources.check_memory(context_for(good_setup))
    assert result.status == Status.WARN  # no GPU here
    assert "for InternVL3-8B" in result.message
    assert f"{resources.ASSUMED_ANSWER_TOKENS} answer tokens assumed" in result.message


@pytest.mark.parametrize(
    "training_args, layers",
    [([], 0), (["--grad_checkpoint_skip_layers", "4"], 4), (["--grad_checkpoint", "False"], 28),
     (["--grad_checkpoint_skip_layers", "auto", "--grad_checkpoint_memory_gb", "1000"], 28)],
)  # fmt: skip
def test_memory_estimate_follows_the_checkpointing_flags(good_setup, training_args, layers):
    settings = SetupSettings.from_launcher(launcher_env(good_setup), training_args, visible_gpus=0)
    context = replace(CheckContext(settings), model_config=InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG))
    _, found = resources.check_memory(context)
    assert found.memory_estimate.uncheckpointed_layers == layers


def test_output_folder_and_disk_space(good_setup, tmp_path, monkeypatch):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    [result], context = resources.check_output_dir(context_for(good_setup, OUTPUT_DIR=str(a_file)))
    assert result.status == Status.FAIL and context.disk_estimate is None

    monkeypatch.setattr(resources.shutil, "disk_usage", lambda path: SimpleNamespace(free=1))
    results, context = resources.check_output_dir(context_for(good_setup, OUTPUT_DIR=str(tmp_path / "run")))
    disk = next(r for r in results if r.name == "disk space")
    assert disk.status == Status.FAIL and "0.0 MiB free" in disk.message
    assert context.disk_estimate.total > 1
