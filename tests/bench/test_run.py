"""The training benchmark's run: the torchrun command it builds, and a real 2-process CPU run whose JSON report is
checked against the batch shape and an independently built sample, with its profiled step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from internvl.bench import run
from internvl.bench.profiling import CATEGORIES, DEEPSPEED, GEMM, LORA, OPTIMIZER
from internvl.bench.run import BenchmarkSettings, benchmark_command

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_runs_the_guide_flags_with_its_overrides(tmp_path):
    settings = BenchmarkSettings(
        deepspeed="zero_stage2_config.json", nproc_per_node=2, per_device_batch_size=3, gradient_accumulation_steps=5,
        frames=12, max_seq_length=6000, steps=2, warmup_steps=1, load_in_4bit=False, work_dir=str(tmp_path),
        recipe_args=["--dataloader_num_workers", "1"],
    )  # fmt: skip
    command, env, plan = benchmark_command(settings, tmp_path / "ckpt", tmp_path / "meta.json", tmp_path / "r.json")
    assert command[command.index("-m", 3) + 1] == "internvl.bench.worker"
    assert command[command.index("--nproc_per_node") + 1] == "2"
    recipe = command[command.index("--") + 1 :]
    assert recipe == plan.train_args

    def value(flag):  # the last occurrence wins, as in argparse
        return recipe[len(recipe) - 1 - recipe[::-1].index(flag) + 1]

    assert value("--per_device_train_batch_size") == "3"
    assert value("--gradient_accumulation_steps") == "5"
    assert value("--max_steps") == "3"
    assert value("--min_num_frame") == value("--max_num_frame") == "12"
    assert value("--max_seq_length") == "6000"
    assert value("--load_in_4bit") == "False"
    assert value("--use_llm_lora") == "32"
    assert value("--dataloader_num_workers") == "1"
    assert value("--deepspeed") == "zero_stage2_config.json"
    assert value("--model_name_or_path") == str(tmp_path / "ckpt")
    assert "--profile-trace" not in command


def test_a_profiled_benchmark_runs_one_more_step_into_a_trace_beside_the_report(tmp_path):
    settings = BenchmarkSettings(steps=2, warmup_steps=1, profile=True, work_dir=str(tmp_path))
    report = tmp_path / "runs" / f"x.{run.REPORT_NAME}"
    command, _, plan = benchmark_command(settings, tmp_path / "ckpt", tmp_path / "meta.json", report)
    assert command[command.index("--profile-trace") + 1] == str(tmp_path / "runs" / "x.trace.json.gz")
    assert plan.train_args[plan.train_args.index("--max_steps") + 1] == "4"


@pytest.mark.parametrize("caller_setting", [None, "expandable_segments:False"])
def test_benchmark_on_gpus_uses_the_launchers_allocator_default_unless_the_caller_sets_one(
    tmp_path, monkeypatch, caller_setting
):
    monkeypatch.setattr(run, "visible_gpu_count", lambda: 2)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    if caller_setting:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", caller_setting)
    settings = BenchmarkSettings(work_dir=str(tmp_path))
    _, env, plan = benchmark_command(settings, tmp_path / "ckpt", tmp_path / "meta.json", tmp_path / "r.json")
    child_env = {**os.environ, **env}  # what run_benchmark starts torchrun with
    assert child_env["PYTORCH_CUDA_ALLOC_CONF"] == (caller_setting or "expandable_segments:True")
    assert "--use_cpu" not in plan.train_args


@pytest.mark.e2e
def test_cpu_benchmark_run_reports_figures_consistent_with_the_batches(tmp_path):
    from internvl.data.dataset import build_datasets
    from internvl.model.loading import load_tokenizer

    output = tmp_path / "report.json"
    command = [
        sys.executable, str(REPO / "scripts" / "benchmark_training.py"),
        "--model-config", "tiny", "--nproc-per-node", "2", "--deepspeed", "zero_stage3_config.json",
        "--per-device-batch-size", "1", "--grad-accum", "2", "--frames", "2", "--max-seq-length", "2048",
        "--steps", "1", "--warmup-steps", "1", "--work-dir", str(tmp_path / "work"), "--name", "cpu",
        "--output", str(output), "--profile", "--", "--dataloader_num_workers", "1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["status"] == "ok"
    run, results = report["run"], report["results"]
    assert (run["world_size"], run["zero_stage"], run["offload_param"]) == (2, 3, "cpu")
    assert run["load_in_4bit"] and run["lora_rank"] == 32 and run["gradient_checkpointing"]
    assert run["checkpointed_layers"] == 2  # every decoder layer of the tiny model

    # One sample built here from the same data: every sample has its length and supervised-token count.
    work = tmp_path / "work"
    tokenizer = load_tokenizer(work / "checkpoint-tiny")
    train, _ = build_datasets(work / "videos-cpu" / "meta.json", tokenizer, min_num_frame=2, max_num_frame=2,
                              max_seq_length=2048)  # fmt: skip
    sample = train[0]
    length = len(sample["input_ids"])
    assert results["samples_per_step"] == 1 * 2 * 2
    assert results["tokens_per_sample"] == length
    assert results["tokens_per_step"] == 4 * length
    assert results["supervised_tokens_per_sample"] == int((sample["labels"] != -100).sum())
    assert results["frames_per_sample"] == 2

    # Warm-up, measured, profiled (not measured).
    assert len(results["step_times_s"]) == 3 and results["measured_steps"] == 1 and run["profiled_steps"] == 1
    step = results["step_time_s"]
    assert step == results["step_times_s"][1] > 0
    assert results["tokens_per_second_per_gpu"] == pytest.approx(4 * length / step / 2)
    assert results["samples_per_second"] == pytest.approx(4 / step)
    assert 0 <= results["dataloader_wait_share"] < 1
    assert 0 < results["mfu"] < 1 and results["flops_per_step"] > 0
    assert math.isfinite(results["loss"])
    assert results["bad_samples"] == 0
    assert "peak_gpu_memory_gib" not in results  # no GPU here

    # The profiled step: CPU time by category, adding up to the step; ZeRO-3 over 2 processes gathers weights.
    profile = report["profile"]
    assert profile["device"] == "cpu" and list(profile["categories"]) == list(CATEGORIES)
    shares = {name: value["share"] for name, value in profile["categories"].items()}
    assert all(share >= 0 for share in shares.values()) and sum(shares.values()) == pytest.approx(1.0)
    for category in (GEMM, LORA, DEEPSPEED, OPTIMIZER):
        assert shares[category] > 0, category
    assert 0 < profile["step_time_s"] and Path(profile["trace"]).stat().st_size > 0
    table = Path(profile["table"]).read_text()
    assert all(f"| {category} |" in table for category in CATEGORIES)
