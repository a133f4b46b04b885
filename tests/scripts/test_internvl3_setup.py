"""scripts/test_internvl3_setup.py: a good setup passes; each planted fault is a ❌ naming it, with a fix, and a
non-zero exit; the process defaults are the quick start's."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.tools.checks import Status
from tests.prepared import VAL, annotation_path
from tests.tools.checks.test_settings import LAUNCHER_VARIABLES, REPO, launcher_env

SCRIPT = REPO / "scripts" / "test_internvl3_setup.py"
# Few frames per video keep the batch check fast on CPU.
FEW_FRAMES = ["--", "--min_num_frame", "2", "--max_num_frame", "4"]

_spec = importlib.util.spec_from_file_location("setup_cli", SCRIPT)
setup_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_cli)


def run_cli(monkeypatch, capsys, setup: Path, *args: str, **env: str) -> tuple[int, str]:
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in launcher_env(setup, **env).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)  # the script moves to the repository root; this restores the folder afterwards
    code = setup_cli.main([*args, *FEW_FRAMES])
    return code, capsys.readouterr().out


def failure_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("❌")]


def assert_one_failure(code: int, output: str, check: str, *mentions: str) -> None:
    """Exit code 1 and exactly one ❌, for ``check``, naming each of ``mentions``, followed by its fix."""
    assert code == 1, output
    failures = failure_lines(output)
    assert len(failures) == 1, output
    assert failures[0].startswith(f"❌ {check}:"), failures[0]
    for mention in mentions:
        assert mention in failures[0], (mention, failures[0])
    lines = output.splitlines()
    assert lines[lines.index(failures[0]) + 1].strip().startswith("fix: ")


def test_good_setup_passes(monkeypatch, capsys, good_setup):
    code, output = run_cli(monkeypatch, capsys, good_setup)
    assert code == 0, output
    assert not failure_lines(output)
    for section in ("Python, torch and GPUs", "Packages", "DeepSpeed", "Model", "Data", "Memory and disk"):
        assert f"== {section} ==" in output
    batch_line = next(line for line in output.splitlines() if line.startswith("✅ batch:"))
    assert "built and collated" in batch_line
    assert re.search(r"0 failures: ready to train\.$", output.strip())


def test_missing_shard(monkeypatch, capsys, setup_copy):
    (setup_copy / "model" / "model-00002-of-00002.safetensors").unlink()
    code, output = run_cli(monkeypatch, capsys, setup_copy)
    assert_one_failure(code, output, "weights", "1 of 2 shards", "model-00002-of-00002.safetensors")


def test_truncated_shard(monkeypatch, capsys, setup_copy):
    shard = setup_copy / "model" / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    code, output = run_cli(monkeypatch, capsys, setup_copy)
    assert_one_failure(code, output, "weights", "model-00001-of-00002.safetensors")


def test_missing_video(monkeypatch, capsys, setup_copy):
    train_file = annotation_path(setup_copy / "data")
    lines = train_file.read_text().splitlines()
    video = json.loads(lines[1])["video"]
    (setup_copy / "raw" / video).unlink()
    code, output = run_cli(monkeypatch, capsys, setup_copy)
    assert_one_failure(code, output, "data video_summary_dataset_train", video,
                       "video_summary_dataset_train.jsonl:2")


def test_broken_jsonl_line(monkeypatch, capsys, setup_copy):
    train_file = annotation_path(setup_copy / "data")
    lines = train_file.read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # a line cut in the middle
    train_file.write_text("\n".join(lines) + "\n")
    code, output = run_cli(monkeypatch, capsys, setup_copy)
    assert_one_failure(code, output, "data video_summary_dataset_train", "video_summary_dataset_train.jsonl:3")


def test_batch_size_not_divisible(monkeypatch, capsys, setup_copy):
    code, output = run_cli(monkeypatch, capsys, setup_copy, BATCH_SIZE="3")
    assert_one_failure(code, output, "batch size", "BATCH_SIZE=3")


def test_deepspeed_batch_value_contradicting_the_environment(monkeypatch, capsys, setup_copy):
    config = json.loads((REPO / "configs" / "zero_stage3_config.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 2
    path = setup_copy / "ds.json"
    path.write_text(json.dumps(config))
    code, output = run_cli(monkeypatch, capsys, setup_copy, DEEPSPEED_CONFIG=str(path))
    assert_one_failure(code, output, "batch size", "train_micro_batch_size_per_gpu=2", "PER_DEVICE_BATCH_SIZE")


def test_tokenizer_without_img_context(monkeypatch, capsys, setup_copy):
    tokenizer_file = setup_copy / "model" / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != IMG_CONTEXT_TOKEN]
    tokenizer["model"]["vocab"].pop(IMG_CONTEXT_TOKEN, None)
    tokenizer_file.write_text(json.dumps(tokenizer))
    code, output = run_cli(monkeypatch, capsys, setup_copy)
    assert_one_failure(code, output, "tokenizer", IMG_CONTEXT_TOKEN)


@pytest.mark.e2e
def test_cli_process_json_and_exit_code(setup_copy):
    first_record = (annotation_path(setup_copy / "data")).read_text().splitlines()[0]
    video = json.loads(first_record)["video"]
    (setup_copy / "raw" / video).unlink()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(launcher_env(setup_copy))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", *FEW_FRAMES], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert report["ok"] is False
    failed = [check for check in report["checks"] if check["status"] == Status.FAIL]
    assert [check["name"] for check in failed] == ["data video_summary_dataset_train"]
    assert video in failed[0]["message"] and failed[0]["fix"]


@pytest.mark.parametrize("slurm_gpus, processes", [("", 2), ("4", 4)])
def test_cli_defaults_to_the_quick_starts_process_count(monkeypatch, capsys, good_setup, slurm_gpus, processes):
    """On an 8-GPU machine the launcher alone would start 8 processes; the quick start (and so the check) 2, unless
    SLURM allocated GPUs per node."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # what the launcher would use
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the GPU checks themselves are tested below
    _, output = run_cli(monkeypatch, capsys, good_setup, GPUS="", PER_DEVICE_BATCH_SIZE="", BATCH_SIZE="",
                        SLURM_GPUS_ON_NODE=slurm_gpus)  # fmt: skip
    batch_line = next(line for line in output.splitlines() if line.startswith("✅ batch size:"))
    assert f"32 = {processes} process(es) × 4 per device × {8 // processes} accumulation steps" in batch_line


def test_meta_root_that_is_a_file(monkeypatch, capsys, setup_copy):
    meta_path = setup_copy / "data" / "meta.json"
    meta = json.loads(meta_path.read_text())
    video = json.loads(annotation_path(setup_copy / "data").read_text().splitlines()[0])["video"]
    meta["video_summary_dataset_train"]["root"] = f"../raw/{video}"
    meta_path.write_text(json.dumps(meta))
    code, output = run_cli(monkeypatch, capsys, setup_copy)
    assert_one_failure(code, output, "meta.json", f"root '../raw/{video}' is a file, not a folder")


def test_video_replaced_since_prepare(monkeypatch, capsys, setup_copy):
    """A file that is still there but no longer a video: found by decoding its first frame."""
    video = json.loads(annotation_path(setup_copy / "data").read_text().splitlines()[0])["video"]
    (setup_copy / "raw" / video).write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(4000))
    code, output = run_cli(monkeypatch, capsys, setup_copy)
    assert_one_failure(code, output, "data video_summary_dataset_train", video, "does not decode")


def test_evaluation_sample_that_cannot_be_built(monkeypatch, capsys, setup_copy):
    """A summary far longer than max_seq_length in the val split: training would skip it at every evaluation."""
    val_file = annotation_path(setup_copy / "data", VAL)
    record = json.loads(val_file.read_text().splitlines()[0])
    record["conversations"][1]["value"] = "word " * 20000
    val_file.write_text(json.dumps(record) + "\n")
    code, output = run_cli(monkeypatch, capsys, setup_copy)
    assert_one_failure(code, output, "batch", "evaluation sample", "video_summary_dataset_val.jsonl:1",
                       "max_seq_length")


def test_empty_validation_split_trains_without_evaluation(monkeypatch, capsys, setup_copy):
    """The empty '_val' entry older prepare versions wrote for --val-ratio 0: the launcher adds no --do_eval, and
    the check agrees that the run is ready, without evaluation."""
    annotation_path(setup_copy / "data", VAL).write_text("")
    code, output = run_cli(monkeypatch, capsys, setup_copy)
    assert code == 0, output
    assert "; no evaluation" in next(line for line in output.splitlines() if line.startswith("✅ meta.json:"))
    assert "evaluation sample" not in output


def test_output_folder_that_is_the_base_model(monkeypatch, capsys, setup_copy):
    code, output = run_cli(monkeypatch, capsys, setup_copy, OUTPUT_DIR=str(setup_copy / "model"))
    assert_one_failure(code, output, "output folder", "is the base model folder")


def test_preview_prints_the_first_sample_and_draws_its_frames(monkeypatch, capsys, good_setup, tmp_path):
    code, output = run_cli(monkeypatch, capsys, good_setup, "--preview", "--output-dir", str(tmp_path / "run"))
    assert code == 0, output
    preview = output[output.index("First training sample: "):]
    assert re.search(r"\d+ tokens of max_seq_length \d+: \d+ image tokens \(\d frames x \d+\)", preview)
    answer = json.loads(annotation_path(good_setup / "data").read_text().splitlines()[0])["conversations"][-1]
    assert f"[[{answer['value']}<|im_end|>]]" in preview  # the first record's answer, and only it, is supervised
    rendered = preview.split("\n\n", 1)[1]  # after the header lines
    assert rendered.count("[[") == rendered.count("]]") == 1 and IMG_CONTEXT_TOKEN not in rendered
    assert (tmp_path / "run" / "first_sample_frames.png").stat().st_size > 1000


def test_no_preview_when_the_data_fails(monkeypatch, capsys, setup_copy):
    (setup_copy / "data" / "meta.json").write_text("{")
    code, output = run_cli(monkeypatch, capsys, setup_copy, "--preview")
    assert code == 1
    assert "No preview of the first sample: fix " in output and "First training sample" not in output
