"""scripts/test_internvl3_setup.py: a good setup passes; each planted fault is a ❌ naming it, with a fix, and a
non-zero exit. Also the settings the launcher would use, the memory/disk estimates and the single checks."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file, save_file

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.constants import INTERNVL3_8B_CONFIG
from internvl.data.prepare import prepare_dataset
from internvl.model.configuration import InternVLChatConfig
from internvl.model.dims import ModelDims
from internvl.tools import setup_check
from internvl.tools.resource_estimates import GIB, estimate_disk_usage, estimate_gpu_memory
from internvl.tools.setup_check import FAIL, OK, WARN, SetupChecker, SetupSettings

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "test_internvl3_setup.py"
LAUNCHER_VARIABLES = ("GPUS", "NNODES", "NODE_RANK", "PER_DEVICE_BATCH_SIZE", "BATCH_SIZE", "MODEL_PATH", "META_PATH",
                      "OUTPUT_DIR", "LORA_RANK", "DEEPSPEED_CONFIG", "SLURM_GPUS_ON_NODE", "SLURM_NNODES")  # fmt: skip
# Few frames per video keep the batch check fast on CPU.
FEW_FRAMES = ["--", "--min_num_frame", "2", "--max_num_frame", "4"]

_spec = importlib.util.spec_from_file_location("setup_cli", SCRIPT)
setup_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_cli)


def write_sharded_checkpoint(source: Path, target: Path, num_shards: int = 2) -> list[str]:
    """Copy a single-file checkpoint as ``num_shards`` safetensors shards plus ``model.safetensors.index.json``,
    the layout of the official InternVL3-8B release. Returns the shard names."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    shards = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    weight_map = {}
    for i, shard in enumerate(shards):
        part = {name: tensors[name].contiguous() for name in names[i::num_shards]}
        save_file(part, target / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return shards


@pytest.fixture(scope="module")
def good_setup(tmp_path_factory, tiny_model_dir, demo_videos_dir) -> Path:
    """A sharded tiny model, demo videos and data prepared from them, side by side in one folder."""
    base = tmp_path_factory.mktemp("setup")
    write_sharded_checkpoint(Path(tiny_model_dir), base / "model")
    shutil.copytree(demo_videos_dir, base / "raw")
    prepare_dataset(base / "raw", base / "data", progress=False)
    return base


@pytest.fixture
def setup_copy(good_setup, tmp_path) -> Path:
    """A copy of the good setup to plant a fault in (relative paths inside stay valid)."""
    return Path(shutil.copytree(good_setup, tmp_path / "setup"))


def launcher_env(setup: Path, **overrides: str) -> dict[str, str]:
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


# -- The whole script ----------------------------------------------------------------------------------------------


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
    train_file = setup_copy / "data" / "video_summary_dataset_train.jsonl"
    lines = train_file.read_text().splitlines()
    video = json.loads(lines[1])["video"]
    (setup_copy / "raw" / video).unlink()
    code, output = run_cli(monkeypatch, capsys, setup_copy)
    assert_one_failure(code, output, "data video_summary_dataset_train", video,
                       "video_summary_dataset_train.jsonl:2")


def test_broken_jsonl_line(monkeypatch, capsys, setup_copy):
    train_file = setup_copy / "data" / "video_summary_dataset_train.jsonl"
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
    first_record = (setup_copy / "data" / "video_summary_dataset_train.jsonl").read_text().splitlines()[0]
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
    failed = [check for check in report["checks"] if check["status"] == FAIL]
    assert [check["name"] for check in failed] == ["data video_summary_dataset_train"]
    assert video in failed[0]["message"] and failed[0]["fix"]


# -- Settings --------------------------------------------------------------------------------------------------------


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


# -- Estimates -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def internvl3_8b() -> ModelDims:
    return ModelDims.from_config(InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG))


def test_internvl3_8b_sizes(internvl3_8b):
    # Official numbers: 7.9B parameters (model card); LoRA r=16 on the seven projections adds 1,441,792
    # parameters per layer over 28 layers.
    assert 7.85e9 < internvl3_8b.total_params < 8.0e9
    assert internvl3_8b.lora_params(16) == 28 * 1_441_792
    assert internvl3_8b.lora_params(32) == 2 * internvl3_8b.lora_params(16)


def _estimate(dims, **overrides):
    settings = dict(lora_rank=32, micro_batch_size=1, max_seq_length=8192, max_num_frame=32, answer_tokens=256,
                    num_gpus=2, zero_stage=3, offload_param=True, offload_optimizer=True)  # fmt: skip
    settings.update(overrides)
    return estimate_gpu_memory(dims, **settings)


def test_memory_estimate_behaves(internvl3_8b):
    base = _estimate(internvl3_8b)
    # Loading puts the whole 4-bit model on each GPU: a 4-bit Qwen2.5-7B measures 5.2 GiB, plus the bf16 ViT.
    assert 5.4 < base.load_peak / GIB < 6.2
    assert _estimate(internvl3_8b, micro_batch_size=2).peak > base.peak
    assert _estimate(internvl3_8b, max_seq_length=4096, max_num_frame=16).peak < base.peak
    assert _estimate(internvl3_8b, offload_param=False, offload_optimizer=False).train_peak > base.train_peak
    no_offload = dict(offload_param=False, offload_optimizer=False)
    zero3 = _estimate(internvl3_8b, **no_offload).train_peak
    assert _estimate(internvl3_8b, num_gpus=4, **no_offload).train_peak < zero3
    assert _estimate(internvl3_8b, zero_stage=2, **no_offload).train_peak > zero3
    assert _estimate(internvl3_8b, answer_tokens=1024).logits == 4 * base.logits
    assert base.frames_per_sample == 32 and _estimate(internvl3_8b, max_seq_length=2048).frames_per_sample == 8


# Peak PyTorch-allocated GiB per GPU measured on H200s (docs/BENCHMARKS.md, 2026-11-28): InternVL3-8B shape, NF4 +
# LoRA r32, batch 4 x 4,490 tokens (16 frames, 77 supervised tokens per sample).
MEASURED_PEAK_ALLOCATED_GIB = [
    (dict(num_gpus=2, zero_stage=3, offload_param=True, offload_optimizer=True), 15.29),
    (dict(num_gpus=1, zero_stage=3, offload_param=True, offload_optimizer=True), 15.12),
    (dict(num_gpus=2, zero_stage=3, offload_param=False, offload_optimizer=False), 18.57),
    (dict(num_gpus=2, zero_stage=2, offload_param=False, offload_optimizer=False), 16.88),
]


@pytest.mark.parametrize("deepspeed, measured_gib", MEASURED_PEAK_ALLOCATED_GIB)
def test_memory_estimate_is_close_to_the_gpu_measurements(internvl3_8b, deepspeed, measured_gib):
    estimate = _estimate(internvl3_8b, micro_batch_size=4, max_seq_length=4490, max_num_frame=16, answer_tokens=77,
                         **deepspeed)  # fmt: skip
    # Within 20%, and never more than 10% below: an estimate that is too low would pass a GPU that is too small.
    assert 0.9 * measured_gib < estimate.peak / GIB < 1.2 * measured_gib


def test_disk_estimate(internvl3_8b):
    one = estimate_disk_usage(internvl3_8b, lora_rank=32, save_total_limit=1)
    three = estimate_disk_usage(internvl3_8b, lora_rank=32, save_total_limit=3)
    assert three.total - one.total == 2 * one.checkpoint
    assert one.merged_model == 2 * internvl3_8b.total_params  # bf16
    assert 14 < one.merged_model / GIB < 16  # the official release is 15.9 GB


def _checker(setup: Path, **env: str) -> SetupChecker:
    return SetupChecker(SetupSettings.from_launcher(launcher_env(setup, **env), [], visible_gpus=0))


def test_memory_check_compares_with_the_smallest_gpu(good_setup):
    checker = _checker(good_setup, PER_DEVICE_BATCH_SIZE="4", BATCH_SIZE="8")
    checker.model_config = InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG)
    checker.deepspeed_config = json.loads((REPO / "configs" / "zero_stage3_config.json").read_text())
    checker.gpu_memory = [141 * GIB, 16 * GIB]
    [result] = checker.check_memory()
    assert result.status == FAIL and "PER_DEVICE_BATCH_SIZE" in result.fix
    checker.gpu_memory = [141 * GIB, 141 * GIB]
    [result] = checker.check_memory()
    assert result.status == OK


# -- Single checks ---------------------------------------------------------------------------------------------------


def test_packages_missing_or_too_old(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("torch>=99  # too old\nsurely-not-an-installed-package>=1\nmatplotlib<0.1\n")
    monkeypatch.setattr(setup_check, "REQUIREMENTS_FILE", requirements)
    results = {r.name: r for r in SetupChecker().check_packages()}
    assert results["torch"].status == FAIL and "torch>=99" in results["torch"].fix
    assert results["surely-not-an-installed-package"].status == FAIL
    assert results["matplotlib"].status == WARN  # newer than tested, and only needed for plots


def test_bitsandbytes_check_catches_a_wrong_4bit_matmul(monkeypatch):
    import bitsandbytes

    [result] = SetupChecker().check_bitsandbytes()
    assert result.status == OK
    correct = bitsandbytes.matmul_4bit
    monkeypatch.setattr(bitsandbytes, "matmul_4bit", lambda *args, **kwargs: correct(*args, **kwargs) * 1.5)
    [result] = SetupChecker().check_bitsandbytes()
    assert result.status == FAIL and "matmul error" in result.message


def test_deepspeed_config_syntax_and_schema(good_setup, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    [result] = _checker(good_setup, DEEPSPEED_CONFIG=str(broken)).check_deepspeed_config()
    assert result.status == FAIL and f"{broken}:2:" in result.message

    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_parmas": {"device": "cpu"}}}))
    results = _checker(good_setup, DEEPSPEED_CONFIG=str(typo)).check_deepspeed_config()
    assert results[0].status == FAIL and "offload_parmas" in results[0].message


def test_output_folder_and_disk_space(good_setup, tmp_path, monkeypatch):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    [result] = _checker(good_setup, OUTPUT_DIR=str(a_file)).check_output_dir()
    assert result.status == FAIL

    monkeypatch.setattr(setup_check.shutil, "disk_usage", lambda path: SimpleNamespace(free=1))
    results = _checker(good_setup, OUTPUT_DIR=str(tmp_path / "run")).check_output_dir()
    disk = next(r for r in results if r.name == "disk space")
    assert disk.status == FAIL and "0.0 MiB free" in disk.message


def test_gpu_checks_against_the_visible_gpus(good_setup, monkeypatch):
    import torch

    gpus = [SimpleNamespace(name="NVIDIA A100-SXM4-80GB", total_memory=80 * GIB, major=8, minor=0),
            SimpleNamespace(name="Tesla V100-SXM2-32GB", total_memory=32 * GIB, major=7, minor=0)]  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpus[index])

    checker = _checker(good_setup, GPUS="1")
    results = {r.name: r for r in checker.check_python_and_gpus()}
    assert results["GPUs"].status == OK and "A100" in results["GPUs"].message
    assert results["bf16"].status == OK  # only the first GPU is used
    assert checker.gpu_memory == [80 * GIB, 32 * GIB]

    results = {r.name: r for r in _checker(good_setup, GPUS="3").check_python_and_gpus()}
    assert results["GPUs"].status == FAIL and "GPUS=3" in results["GPUs"].message and "GPUS=2" in results["GPUs"].fix
    assert results["bf16"].status == FAIL and "V100" in results["bf16"].message
