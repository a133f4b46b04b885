"""The README's first command: the whole pipeline on the tiny model, through the real scripts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prepared import VAL, annotation_path

REPO = Path(__file__).resolve().parents[2]

# Real multi-process runs through the scripts: minutes each (`pytest -m "not e2e"` leaves them out).
pytestmark = pytest.mark.e2e


def test_demo_trains_evaluates_and_merges(tmp_path):
    env = {**os.environ, "DEMO_ROOT": str(tmp_path), "PYTHON": sys.executable}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    match = re.search(r"Training loss: ([0-9.]+) at the first logged step, ([0-9.]+) at the last", result.stdout)
    assert match, result.stdout[-3000:]
    first, last = map(float, match.groups())
    assert last < first - 0.2, (first, last)

    output_dir = tmp_path / "work_dirs" / "demo_tiny_internvl3_4bit_lora"
    assert (output_dir / "adapter_model.safetensors").stat().st_size > 0
    assert (output_dir / "loss_curves.png").stat().st_size > 0
    val_records = annotation_path(tmp_path / "internvl3_data" / "demo", VAL).read_text().splitlines()
    evaluation = json.loads((output_dir / "eval" / "metrics.json").read_text())["models"]["model"]
    assert evaluation["num_scored"] == len(val_records) > 0
    assert set(evaluation["scores"]) >= {"rouge1", "rouge2", "rougeL", "bleu4", "cider"}
    assert len((output_dir / "eval" / "predictions.jsonl").read_text().splitlines()) == len(val_records)

    merged = tmp_path / "work_dirs" / "demo_tiny_internvl3_merged"
    merged_config = json.loads((merged / "config.json").read_text())
    assert merged_config["use_llm_lora"] == 0 and merged_config["use_backbone_lora"] == 0
    assert list(merged.glob("*.safetensors"))
