"""Data-loading throughput: video decode + preprocess, in samples/s, for N-frame samples of one clip.

For one process: probing (a full decode, as prepare does), decoding the sampled frames, decoding + tiling /
normalising them, and a full dataset sample (tokenization included); then a DataLoader with worker processes.
Not a test: numbers depend on the machine (docs/DATA.md has a measured run).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from internvl.data import InternVLDataCollator, build_datasets, build_transform, probe_video, read_video_frames
from internvl.data.dataset import MetaEntry, write_meta
from internvl.data.demo import encode_mp4
from internvl.model.tiny import build_tiny_tokenizer


def synthetic_clip(path: Path, width: int, height: int, seconds: float, fps: int, seed: int = 0) -> Path:
    """An H.264 clip of a smooth random texture panning under a moving circle, so the decoder has real motion."""
    rng = np.random.default_rng(seed)
    pan = 4  # pixels per frame
    frames = int(seconds * fps)
    # Smooth random texture, wider than the frame so the view can pan across it.
    coarse = rng.integers(0, 256, (height // 16, (width + pan * frames) // 16, 3), dtype=np.uint8)
    texture = Image.fromarray(coarse).resize((width + pan * frames, height), Image.Resampling.BICUBIC)
    images = []
    for t in range(frames):
        image = texture.crop((pan * t, 0, pan * t + width, height))
        draw = ImageDraw.Draw(image)
        x = width * (0.1 + 0.8 * t / max(frames - 1, 1))
        draw.ellipse((x - 60, height / 2 - 60, x + 60, height / 2 + 60), fill=(220, 40, 40))
        images.append(image)
    encode_mp4(images, path, fps=fps)
    return path


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:.2f} samples/s ({1000 * seconds / count:.0f} ms/sample)"


def run_data_benchmark(
    video: Path | None, *, samples: int, frames: int, seconds: float, fps: int, workers: int
) -> None:
    """Print each measurement; without ``video``, on a synthetic 1280x720 clip of ``seconds`` at ``fps``."""
    # One intra-op thread, as PyTorch sets in each DataLoader worker: the single-process numbers are per worker.
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if video is None:
            start = time.perf_counter()
            video = synthetic_clip(tmp / "clip720p.mp4", 1280, 720, seconds, fps)
            print(
                f"encoded a synthetic 1280x720 clip of {seconds:g} s at {fps} fps in "
                f"{time.perf_counter() - start:.1f} s ({video.stat().st_size / 2**20:.1f} MiB)"
            )
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"
        )

        start = time.perf_counter()
        info = probe_video(video)
        print(
            f"probe (full decode, {info.num_frames} frames {info.width}x{info.height}): "
            f"{time.perf_counter() - start:.2f} s"
        )

        rng = np.random.default_rng(0)
        transform = build_transform(False, 448)

        def read():
            return read_video_frames(video, frames, "rand", num_decoded_frames=info.num_frames, fps=info.fps, rng=rng)

        start = time.perf_counter()
        for _ in range(samples):
            read()
        print(f"decode {frames} frames ('rand'), 1 process: {rate(samples, time.perf_counter() - start)}")

        start = time.perf_counter()
        for _ in range(samples):
            torch.stack([transform(frame) for frame in read()])
        print(
            f"decode + resize/normalise to {frames}x3x448x448, 1 process: "
            f"{rate(samples, time.perf_counter() - start)}"
        )

        record = {
            "video": os.path.abspath(video),
            "decoded_frames": info.num_frames,
            "fps": info.fps,
            "conversations": [
                {"from": "human", "value": "<video>\nSummarize the video."},
                {"from": "gpt", "value": "A red circle moves from left to right."},
            ],
        }
        annotation = tmp / "bench.jsonl"
        annotation.write_text(json.dumps(record) + "\n")
        entry = MetaEntry(
            root="/", annotation=str(annotation), length=samples, max_dynamic_patch=1, repeat_time=samples
        )
        write_meta(tmp / "meta.json", {"bench": entry})
        tokenizer = build_tiny_tokenizer()
        dataset, _ = build_datasets(tmp / "meta.json", tokenizer, min_num_frame=frames, max_num_frame=frames)
        start = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
        print(
            f"full dataset sample (decode, tiles, tokens), 1 process: {rate(len(dataset), time.perf_counter() - start)}"
        )

        if workers > 0:
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=1, num_workers=workers, collate_fn=InternVLDataCollator(tokenizer.pad_token_id)
            )
            start = time.perf_counter()
            for _ in loader:
                pass
            print(
                f"DataLoader, {workers} workers (start-up included): "
                f"{rate(len(dataset), time.perf_counter() - start)}"
            )
