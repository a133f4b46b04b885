"""SetupSettings.from_launcher: the settings internvl.train.launch would run with, its refusals kept."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from internvl.tools.checks import CheckContext, SetupSettings

REPO = Path(__file__).resolve().parents[3]
LAUNCHER_VARIABLES = ("GPUS", "NNODES", "NODE_RANK", "PER_DEVICE_BATCH_SIZE", "BATCH_SIZE", "MODEL_PATH", "META_PATH",
                      "OUTPUT_DIR", "LORA_RANK", "DEEPSPEED_CONFIG", "SLURM_GPUS_ON_NODE", "SLURM_NNODES")  # fmt: skip


def launcher_env(setup: Path, **overrides: str) -> dict[str, str]:
    """The launcher's environment for a setup folder as the ``good_setup`` fixture lays it out."""
    env = {
        "MODEL_PATH": str(setup / "model"),
        "META_PATH": str(setup / "data" / "meta.json"),
        "OUTPUT_DIR": str(setup / "out"),
        "GPUS": "2",
        "PER_DEVICE_BATCH_SIZE": "1",
        "BATCH_SIZE": "2",
    }
    env.update(overrides)
    return env


def context_for(setup: Path, **env: str) -> CheckContext:
    """A context as the first check gets it: the settings for ``setup``, nothing found yet."""
    return CheckContext(SetupSettings.from_launcher(launcher_env(setup, **env), [], visible_gpus=0))


def test_settings_are_the_launchers():
    env = {"GPUS": "4", "PER_DEVICE_BATCH_SIZE": "2", "BATCH_SIZE": "64", "MODEL_PATH": "m", "LORA_RANK": "16",
           "DEEPSPEED_CONFIG": "zero_stage2_config.json"}  # fmt: skip
    settings = SetupSettings.from_launcher(env, ["--max_seq_length", "4096", "--save_total_limit", "5"], visible_gpus=0)
    assert (settings.gpus, settings.per_device_batch_size, settings.batch_size) == (4, 2, 64)
    assert settings.gradient_accumulation == 8
    assert settings.model_path == Path("m") and settings.lora_rank == 16
    assert settings.deepspeed_config == REPO / "configs" / "zero_stage2_config.json"
    assert settings.data_args.max_seq_length == 4096 and settings.save_total_limit == 5
    assert settings.launch_error is None


def test_settings_keep_the_launchers_refusal():
    settings = SetupSettings.from_launcher({"GPUS": "2", "PER_DEVICE_BATCH_SIZE": "4", "BATCH_SIZE": "30"}, [],
                                           visible_gpus=0)
    assert "BATCH_SIZE=30" in settings.launch_error
    assert (settings.gpus, settings.per_device_batch_size, settings.batch_size) == (2, 4, 30)


@pytest.mark.parametrize("extra, message", [
    (["--no_such_flag", "1"], "--no_such_flag"),
    (["--bf16", "True", "--fp16", "True"], "fp16 and bf16"),
])  # fmt: skip
def test_training_arguments_are_parsed_as_training_parses_them(extra, message):
    """What training refuses after minutes of loading, the setup check refuses at once."""
    with pytest.raises(ValueError, match=f"training arguments rejected: .*{re.escape(message)}"):
        SetupSettings.from_launcher({"GPUS": "2"}, extra, visible_gpus=0)
