"""The checks a run makes before loading anything: its output folder, one run per folder, resuming with the
checkpoint's settings, damaged checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from internvl.data.files import lock_holder
from internvl.model.hf_layout import hf_config_from_chat
from internvl.model.tiny import tiny_config
from internvl.train.arguments import parse_args
from internvl.train.run_guard import (
    LOCK_NAME,
    RunRefused,
    build_run_record,
    check_output_dir,
    check_resume,
    output_dir_lock,
    preflight,
    resume_checkpoint,
    save_run_record,
)
from tests.train.test_launch import write_split_meta

REPO = Path(__file__).resolve().parents[2]


def run_arguments(model: Path, meta: Path, output_dir: Path, *extra: str):
    return parse_args(["--model_name_or_path", str(model), "--meta_path", str(meta), "--output_dir", str(output_dir),
                       "--do_train", "True", "--use_llm_lora", "8", "--freeze_llm", "True", "--report_to", "none",
                       *extra])  # fmt: skip


@pytest.fixture
def base_model(tmp_path) -> Path:
    """A model folder as far as the checks before loading look: the tiny model's config.json (LLM hidden size 128)."""
    folder = tmp_path / "model"
    tiny_config().save_pretrained(folder)
    return folder


def test_output_folder_that_would_overwrite_or_delete_the_base_model_is_refused(tmp_path, base_model):
    with pytest.raises(RunRefused, match="is the base model folder .*config.json and tokenizer.*OUTPUT_DIR"):
        check_output_dir(base_model, base_model)
    with pytest.raises(RunRefused, match="is inside the base model folder"):
        check_output_dir(base_model / "run", base_model)
    inside_checkpoint = tmp_path / "run" / "checkpoint-200" / "merged"
    with pytest.raises(RunRefused, match="inside checkpoint-200 of --output_dir .*rotation"):
        check_output_dir(tmp_path / "run", inside_checkpoint)
    # Beside the model, or holding it where training neither writes nor deletes: fine.
    check_output_dir(tmp_path / "run", base_model)
    check_output_dir(tmp_path, base_model)


def test_output_folder_that_cannot_be_written_is_refused(tmp_path, base_model):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    with pytest.raises(RunRefused, match="notes.txt is a file; set OUTPUT_DIR"):
        check_output_dir(a_file, base_model)
    with pytest.raises(RunRefused, match="cannot be created: .*notes.txt is a file"):
        check_output_dir(a_file / "run", base_model)
    with pytest.raises(RunRefused, match="cannot be written"):  # a read-only file system, even for root
        check_output_dir("/proc/internvl-run", base_model)


def test_one_run_per_output_folder(tmp_path):
    output_dir = tmp_path / "run"
    assert lock_holder(output_dir / LOCK_NAME) is None
    with output_dir_lock(output_dir):
        assert lock_holder(output_dir / LOCK_NAME).startswith(f"pid {os.getpid()} on ")
        with pytest.raises(RunRefused, match=f"in use by another training run \\(pid {os.getpid()} "):
            with output_dir_lock(output_dir):
                pass
    assert lock_holder(output_dir / LOCK_NAME) is None
    with output_dir_lock(output_dir):  # free again
        pass


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    output_dir = tmp_path / "run"
    code = ("import sys, time; from internvl.train.run_guard import output_dir_lock\n"
            f"with output_dir_lock({str(output_dir)!r}):\n    print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock_holder(output_dir / LOCK_NAME).startswith(f"pid {holder.pid} ")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert lock_holder(output_dir / LOCK_NAME) is None


def trained_checkpoint(output_dir: Path, step: int, record: dict) -> Path:
    """A checkpoint folder of the kind the trainer writes without DeepSpeed, with real files."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"lora_A.weight": torch.zeros(4, 8)}, folder / "adapter_model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.zeros(64)}}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_run_record(folder, record)
    return folder


def test_resume_refuses_settings_the_checkpoint_cannot_take(tmp_path, base_model):
    meta = write_split_meta(tmp_path)
    output_dir = tmp_path / "run"
    first = run_arguments(base_model, meta, output_dir)
    checkpoint = trained_checkpoint(output_dir, 4, build_run_record(*first, world_size=2))
    assert check_resume(checkpoint, build_run_record(*first, world_size=2)) == []

    other_rank = run_arguments(base_model, meta, output_dir, "--use_llm_lora", "16")
    with pytest.raises(RunRefused) as refused:
        preflight(*other_rank, world_size=2)
    message = str(refused.value)
    assert message.startswith(f"cannot resume from {checkpoint}: LLM LoRA rank (--use_llm_lora, LORA_RANK) 8 -> 16")
    assert "--overwrite_output_dir True" in message and "\n" not in message

    # Another model shape: the adapter's tensors would not fit.
    config = json.loads((base_model / "config.json").read_text())
    config["llm_config"]["hidden_size"] = 256
    (base_model / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunRefused, match="LLM hidden size 128 -> 256"):
        check_resume(checkpoint, build_run_record(*first, world_size=2))


def test_the_same_model_in_the_hf_layout_resumes_the_run(tmp_path, base_model):
    """The model's shape is read from either layout's config.json: a run trained from the official folder resumes
    from the -hf one of the same model, with the changed path as a warning only."""
    meta = write_split_meta(tmp_path)
    output_dir = tmp_path / "run"
    first = run_arguments(base_model, meta, output_dir)
    record = build_run_record(*first, world_size=1)
    checkpoint = trained_checkpoint(output_dir, 2, record)
    hf_model = tmp_path / "model-hf"
    hf_config_from_chat(tiny_config(), image_token_id=7).save_pretrained(hf_model)
    hf_record = build_run_record(*run_arguments(hf_model, meta, output_dir), world_size=1)
    assert hf_record["model"] == record["model"] and record["model"]["hidden_size"] == 128
    [warning] = check_resume(checkpoint, hf_record)
    assert f"model path {base_model} -> {hf_model}" in warning


def test_resume_under_deepspeed_needs_the_same_process_count(tmp_path, base_model):
    meta = write_split_meta(tmp_path)
    args = run_arguments(base_model, meta, tmp_path / "run", "--deepspeed", "zero_stage3_config.json")
    checkpoint = trained_checkpoint(tmp_path / "run", 2, build_run_record(*args, world_size=2))
    with pytest.raises(RunRefused, match="process count \\(GPUS x NNODES\\) 2 -> 4"):
        check_resume(checkpoint, build_run_record(*args, world_size=4))


def test_resume_warns_when_the_data_or_the_hyperparameters_changed(tmp_path, base_model):
    meta = write_split_meta(tmp_path, train=2)
    args = run_arguments(base_model, meta, tmp_path / "run")
    checkpoint = trained_checkpoint(tmp_path / "run", 2, build_run_record(*args, world_size=1))
    write_split_meta(tmp_path, train=3)  # same meta.json, one more training record
    faster = run_arguments(base_model, meta, tmp_path / "run", "--learning_rate", "1e-3", "--loss_reduction", "sample")
    [warning] = check_resume(checkpoint, build_run_record(*faster, world_size=1))
    assert "learning rate (LR) 5e-05 -> 0.001" in warning and "annotation files' content changed" in warning
    assert "--loss_reduction token -> sample" in warning
    assert str(checkpoint / "run_args.json") in warning


def test_a_damaged_latest_checkpoint_names_the_file_and_the_intact_one(tmp_path, base_model):
    meta = write_split_meta(tmp_path)
    output_dir = tmp_path / "run"
    args = run_arguments(base_model, meta, output_dir)
    record = build_run_record(*args, world_size=1)
    earlier = trained_checkpoint(output_dir, 2, record)
    latest = trained_checkpoint(output_dir, 4, record)
    optimizer = latest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:200])  # cut short, e.g. by an interrupted copy
    with pytest.raises(RunRefused) as refused:
        resume_checkpoint(args[2])
    assert str(refused.value).startswith(f"checkpoint {latest} is damaged (optimizer.pt: BadZipFile")
    assert f"checkpoint-2 is intact: resume from it with --resume_from_checkpoint {earlier}" in str(refused.value)
    assert resume_checkpoint(run_arguments(base_model, meta, output_dir, "--resume_from_checkpoint",
                                           str(earlier))[2]) == earlier  # fmt: skip

    adapter = earlier / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8])
    with pytest.raises(RunRefused, match="adapter_model.safetensors: .*no earlier checkpoint is intact"):
        resume_checkpoint(run_arguments(base_model, meta, output_dir, "--resume_from_checkpoint", str(earlier))[2])


def test_paths_are_checked_before_anything_loads(tmp_path, base_model):
    meta = write_split_meta(tmp_path)
    with pytest.raises(RunRefused, match="--model_name_or_path models/InternVL3-8B does not exist: .*MODEL_PATH"):
        preflight(*run_arguments(Path("models/InternVL3-8B"), meta, tmp_path / "run"), world_size=1)
    with pytest.raises(RunRefused, match="meta file .*missing.json not found"):
        preflight(*run_arguments(base_model, tmp_path / "missing.json", tmp_path / "run"), world_size=1)
    record, warnings = preflight(*run_arguments(base_model, meta, tmp_path / "run"), world_size=1)
    assert warnings == [] and record["model"]["hidden_size"] == 128
