"""A folder of benchmark reports (what ``scripts/gpu_benchmark_suite.sh`` writes) as Markdown tables for
docs/BENCHMARKS.md: one row per run in the order they ran, beside the plain QLoRA loop of the same folder, then each
profiled step.

    python -m internvl.bench.summary RESULTS_DIR     # prints, and writes RESULTS_DIR/summary.md
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from internvl.bench.profiling import profile_markdown
from internvl.data.files import atomic_write_text

BASELINE_NAME = "plain_baseline.json"
SUMMARY_NAME = "summary.md"


def plain_loop_tokens_per_second(results_dir: Path) -> float | None:
    """The plain loop's NF4 tokens/s at the largest batch it measured, or None without a baseline."""
    path = results_dir / BASELINE_NAME
    if not path.is_file():
        return None
    rows = [r for r in json.loads(path.read_text(encoding="utf-8")) if r.get("quant") and "tokens_per_s" in r]
    return max(rows, key=lambda r: r["batch"])["tokens_per_s"] if rows else None


def nvidia_smi_peaks_mib(csv_path: Path) -> dict[int, int]:
    """GPU index -> the most memory it used while a run ran (``nvidia-smi`` samples of index, MiB)."""
    peaks: dict[int, int] = {}
    if not csv_path.is_file():
        return peaks
    with open(csv_path, encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) == 2 and row[0].strip().isdigit() and row[1].strip().isdigit():
                index, used = int(row[0]), int(row[1])
                peaks[index] = max(used, peaks.get(index, 0))
    return peaks


def _peak_and_lowest(values: list, fmt: str) -> str:
    """The largest per-GPU value, and with several GPUs the smallest beside it."""
    text = format(max(values), fmt)
    return text + (f" (lowest {min(values):{fmt}})" if len(values) > 1 else "")


def run_row(report: dict, plain: float | None, smi_mib: dict[int, int]) -> str:
    settings = report.get("settings", {})
    name = settings.get("name", "?")
    flags = " ".join(settings.get("recipe_args", []))
    config = f"`{Path(settings.get('deepspeed', '?')).name}`" + (f" `{flags}`" if flags else "")
    cap = settings.get("gpu_memory_cap_gb")
    shape = f"{settings.get('per_device_batch_size')} × GA {settings.get('gradient_accumulation_steps')}"
    gpus = report.get("run", {}).get("world_size", "")
    if "results" not in report:
        return f"| {name} | {config} | {gpus} | {shape} | {report.get('status', '?').upper()} | | | | | | {cap or ''} | |"
    r = report["results"]
    tokens = r["tokens_per_second_per_gpu"]
    ratio = f"{tokens / plain:.2f}×" if plain else "–"
    allocated, reserved = r.get("peak_train_gpu_memory_gib"), r.get("peak_train_gpu_reserved_gib")
    memory = f"{_peak_and_lowest(allocated, '.1f')} / {_peak_and_lowest(reserved, '.1f')}" if allocated else "–"
    smi = _peak_and_lowest(list(smi_mib.values()), ",") if smi_mib else "–"
    return (
        f"| {name} | {config} | {gpus} | {shape} | {tokens:,.0f} | {ratio} | {r['step_time_s']:.2f} s | {memory} | "
        f"{100 * r['mfu']:.1f}% | {100 * r['dataloader_wait_share']:.1f}% | {cap or ''} | {smi} |"
    )


def summarize(results_dir: Path) -> str:
    plain = plain_loop_tokens_per_second(results_dir)
    reports = []
    for path in sorted(results_dir.glob("*.json"), key=lambda p: p.stat().st_mtime):  # in the order they ran
        if path.name == BASELINE_NAME or path.name.endswith((".report.json", ".checks.json")):
            continue
        report = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(report, dict) and "settings" in report:
            reports.append((path, report))
    plain_line = f"Plain QLoRA loop (NF4, its largest batch): {plain:,.0f} tokens/s" if plain else "No plain loop here."
    lines = [
        plain_line,
        "",
        "| run | DeepSpeed config and flags | GPUs | batch × GA | tokens/s per GPU | × plain | step | allocated / "
        "reserved GiB per GPU | MFU | data wait | cap GiB | `nvidia-smi` max MiB per GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, report in reports:
        lines.append(run_row(report, plain, nvidia_smi_peaks_mib(path.with_suffix(".nvidia-smi.csv"))))
    for path, report in reports:
        if "profile" in report:
            lines += ["", profile_markdown(report["profile"], report["settings"]["name"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path)
    args = parser.parse_args(argv)
    text = summarize(args.results_dir)
    atomic_write_text(args.results_dir / SUMMARY_NAME, text)
    print(text, end="")


if __name__ == "__main__":
    main()
