"""The suite's Markdown summary: one row per report, the ratio to the plain loop of the same folder, the
nvidia-smi peak per GPU, and each profiled step's tables."""

from __future__ import annotations

import json

from internvl.bench.profiling import CATEGORIES
from internvl.bench.summary import SUMMARY_NAME, main

PROFILE = {
    "device": "cuda", "step_time_s": 2.0, "trace": "t.json.gz",
    "categories": {name: {"seconds": 2.0 / len(CATEGORIES), "share": 1 / len(CATEGORIES)} for name in CATEGORIES},
    "top": [{"name": "nvjet_gemm", "category": CATEGORIES[0], "seconds": 0.5, "calls": 10}],
}  # fmt: skip


def report(name, tokens, profile=None, status="ok"):
    value = {
        "status": status,
        "settings": {"name": name, "deepspeed": "zero_stage2_config.json", "recipe_args": ["--use_liger", "True"],
                     "per_device_batch_size": 4, "gradient_accumulation_steps": 4, "gpu_memory_cap_gb": 48.0},
        "results": {"tokens_per_second_per_gpu": tokens, "step_time_s": 8.0, "mfu": 0.41,
                    "dataloader_wait_share": 0.004, "peak_train_gpu_memory_gib": [17.4],
                    "peak_train_gpu_reserved_gib": [18.8]},
    }  # fmt: skip
    if profile:
        value["profile"] = profile
    return value


def test_summary_rows_beside_the_plain_loop(tmp_path, capsys):
    (tmp_path / "plain_baseline.json").write_text(json.dumps([
        {"vit_ms_per_frame_nograd": 1.0}, {"quant": True, "batch": 1, "tokens_per_s": 3000.0},
        {"quant": True, "batch": 4, "tokens_per_s": 6000.0}, {"quant": False, "batch": 4, "tokens_per_s": 9000.0},
    ]))  # fmt: skip
    (tmp_path / "zero2_liger.json").write_text(json.dumps(report("zero2_liger", 9000.0, PROFILE)))
    (tmp_path / "zero2_liger.nvidia-smi.csv").write_text("0, 1200\n0, 20943\n0, 300\n")
    (tmp_path / "broken.json").write_text(json.dumps({"status": "oom", "settings": report("broken", 0)["settings"]}))
    # A distributed checks' report (it has settings too) is no benchmark row.
    (tmp_path / "check_tiny.checks.json").write_text(json.dumps({"status": "ok", "settings": {"name": "check"}}))
    main([str(tmp_path)])
    text = (tmp_path / SUMMARY_NAME).read_text()
    assert text == capsys.readouterr().out
    assert "Plain QLoRA loop (NF4, its largest batch): 6,000 tokens/s" in text
    row = next(line for line in text.splitlines() if line.startswith("| zero2_liger |"))
    assert "`zero_stage2_config.json` `--use_liger True`" in row and "| 4 × GA 4 | 9,000 | 1.50× | 8.00 s |" in row
    assert "| 17.4 / 18.8 | 41.0% | 0.4% | 48.0 | 20,943 |" in row
    assert "| broken |" in text and "OOM" in text and "| check |" not in text
    assert "**zero2_liger**: one optimizer step, 2.000 s, GPU kernels" in text and "`nvjet_gemm`" in text


def test_several_gpus_show_the_highest_and_the_lowest_gpu(tmp_path):
    value = report("zero2_x2", 8000.0)
    value["run"] = {"world_size": 2}
    value["results"].update(peak_train_gpu_memory_gib=[17.4, 16.9], peak_train_gpu_reserved_gib=[18.8, 18.1])
    (tmp_path / "zero2_x2.json").write_text(json.dumps(value))
    # Samples of both GPUs; GPU 1 peaks lower.
    (tmp_path / "zero2_x2.nvidia-smi.csv").write_text("0, 500\n1, 400\n0, 20943\n1, 20100\n0, 900\n1, 800\n")
    main([str(tmp_path)])
    row = next(line for line in (tmp_path / SUMMARY_NAME).read_text().splitlines() if line.startswith("| zero2_x2 |"))
    assert "| 2 | 4 × GA 4 | 8,000 |" in row
    assert "| 17.4 (lowest 16.9) / 18.8 (lowest 18.1) |" in row
    assert row.endswith("| 20,943 (lowest 20,100) |")
