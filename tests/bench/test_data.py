"""The data-loading benchmark: its synthetic clip, and every stage measured on a small one."""

from __future__ import annotations

import re

import numpy as np
import torch

from internvl.bench.data import run_data_benchmark, synthetic_clip
from internvl.data import probe_video, read_video_frames


def test_synthetic_clip_has_the_requested_shape_and_moves(tmp_path):
    clip = synthetic_clip(tmp_path / "clip.mp4", 160, 96, seconds=1, fps=8)
    info = probe_video(clip)
    assert (info.width, info.height, info.num_frames) == (160, 96, 8)
    first, last = (np.asarray(frame, dtype=np.int16) for frame in read_video_frames(clip, 2, "middle"))
    assert np.abs(first - last).mean() > 10  # the background pans and the circle crosses the frame


def test_every_stage_is_measured_on_the_given_video(tmp_path, capsys):
    clip = synthetic_clip(tmp_path / "clip.mp4", 160, 96, seconds=1, fps=8)
    threads = torch.get_num_threads()
    try:
        run_data_benchmark(clip, samples=2, frames=4, seconds=1, fps=8, workers=1)
    finally:
        torch.set_num_threads(threads)  # the benchmark measures with one thread, as a DataLoader worker has
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("probe (full decode, 8 frames 160x96): ")
    stages = ["decode 4 frames ('rand'), 1 process", "decode + resize/normalise to 4x3x448x448, 1 process",
              "full dataset sample (decode, tiles, tokens), 1 process", "DataLoader, 1 workers (start-up included)"]  # fmt: skip
    rates = [re.fullmatch(re.escape(stage) + r": [0-9.]+ samples/s \([0-9]+ ms/sample\)", line) for stage, line in
             zip(stages, lines[2:])]  # fmt: skip
    assert len(lines) == 6 and all(rates), lines
