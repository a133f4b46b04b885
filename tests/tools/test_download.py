"""scripts/download_internvl3_models.sh without a network: fake ``hf`` / ``huggingface-cli`` / ``modelscope``
commands on PATH stand in for the clients, and the verification runs on a local fake model folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from internvl.tools import download
from tests.tools.checks.test_model import write_sharded_checkpoint

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "download_internvl3_models.sh"
SECRET = "hf_secret_token_value_123"
OFFLINE_ERROR = "Error: Cannot reach https://huggingface.co/api/models/OpenGVLab/InternVL3-8B/revision/main: timed out"


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory, tiny_model_dir) -> Path:
    target = tmp_path_factory.mktemp("download") / "InternVL3-tiny"
    write_sharded_checkpoint(Path(tiny_model_dir), target)
    return target


def fake_command(bin_dir: Path, name: str, body: str) -> None:
    """A stand-in client that records its arguments in ``<name>.args`` and then runs ``body``."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\necho "$@" > "{bin_dir}/{name}.args"\n{body}\n')
    path.chmod(0o755)


def run_script(bin_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",  # the fake clients only: no real hub client is reachable
        "PYTHON": sys.executable,
        "HOME": os.environ.get("HOME", "/tmp"),
        "HF_TOKEN": SECRET,
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=300)


def test_verification_of_a_model_folder(sharded_model, tmp_path, capsys):
    assert download.main([str(sharded_model)]) == 0
    assert capsys.readouterr().out.strip().endswith("is complete")

    broken = Path(shutil.copytree(sharded_model, tmp_path / "broken"))
    (broken / "model-00002-of-00002.safetensors").unlink()
    (broken / "tokenizer.json").unlink()
    assert download.main([str(broken)]) == 1
    output = capsys.readouterr().out
    assert "❌ weights" in output and "model-00002-of-00002.safetensors" in output
    assert "❌ tokenizer" in output
    assert download.main([str(broken), "--quiet"]) == 1
    assert capsys.readouterr().out == ""


def test_offline_hub_gives_the_ways_out(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "hf", f'echo "{OFFLINE_ERROR}" >&2; exit 1')
    local_dir = tmp_path / "models" / "InternVL3-8B"
    result = run_script(bin_dir, "--local-dir", str(local_dir))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert OFFLINE_ERROR in result.stderr  # the client's own error is shown
    for way_out in ("rsync -a", "--verify-only", "HF_ENDPOINT=https://hf-mirror.com", "--source modelscope",
                    "HF_HUB_OFFLINE"):  # fmt: skip
        assert way_out in result.stderr, way_out
    assert (bin_dir / "hf.args").read_text().split() == ["download", "OpenGVLab/InternVL3-8B", "--local-dir",
                                                         str(local_dir)]  # fmt: skip
    assert SECRET not in output and SECRET not in (bin_dir / "hf.args").read_text()


def test_hf_hub_offline_does_not_call_the_client(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "hf", "exit 0")
    result = run_script(bin_dir, "--local-dir", str(tmp_path / "m"), HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert "HF_HUB_OFFLINE=1" in result.stderr and "rsync -a" in result.stderr
    assert not (bin_dir / "hf.args").exists()


def test_modelscope_source(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "modelscope", "echo 'network unreachable' >&2; exit 1")
    local_dir = tmp_path / "m"
    result = run_script(bin_dir, "OpenGVLab/InternVL3-2B", "--local-dir", str(local_dir), MODEL_SOURCE="modelscope")
    assert result.returncode == 1 and "rsync -a" in result.stderr
    assert (bin_dir / "modelscope.args").read_text().split() == ["download", "--model", "OpenGVLab/InternVL3-2B",
                                                                 "--local_dir", str(local_dir)]  # fmt: skip


@pytest.mark.e2e
def test_download_then_verify_with_the_older_client(sharded_model, tmp_path):
    # Only huggingface-cli is installed; it "downloads" by copying the fake model folder.
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "huggingface-cli", f'mkdir -p "$4" && cp -R "{sharded_model}/." "$4"')
    local_dir = tmp_path / "models" / "InternVL3-8B"
    result = run_script(bin_dir, "--local-dir", str(local_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is complete" in result.stdout and f"MODEL_PATH={local_dir}" in result.stdout
    assert (bin_dir / "huggingface-cli.args").read_text().split()[:2] == ["download", "OpenGVLab/InternVL3-8B"]

    # A complete folder is not downloaded again (works offline, e.g. after copying it from another machine).
    (bin_dir / "huggingface-cli.args").unlink()
    result = run_script(bin_dir, "--local-dir", str(local_dir), HF_HUB_OFFLINE="1")
    assert result.returncode == 0 and "nothing to download" in result.stdout
    assert not (bin_dir / "huggingface-cli.args").exists()
