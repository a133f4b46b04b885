"""Data-loading throughput: video decode + preprocess, in samples/s, for 16-frame samples of a 720p clip.

    python scripts/benchmark_data.py [--samples 24] [--frames 16] [--workers 2] [--video PATH]

Without --video it encodes a synthetic 1280x720 H.264 clip (a textured background panning under moving shapes,
so the decoder has real motion to work on). It reports, for one process: probing (a full decode, as prepare
does), decoding the sampled frames, decoding + tiling/normalising them, and a full dataset sample (tokenization
included); then a DataLoader with --workers processes. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from internvl.data import InternVLDataCollator, build_datasets, build_transform, probe_video, read_video_frames  # noqa: E402
from internvl.data.demo import encode_mp4  # noqa: E402
from internvl.model.tiny import build_tiny_tokenizer  # noqa: E402


def synthetic_clip(path: Path, width: int, height: int, seconds: float, fps: int, seed: int = 0) -> Path:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, help="benchmark this file instead of a synthetic clip")
    parser.add_argument("--samples", type=int, default=24, help="samples per measurement (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=16, help="frames per sample (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10, help="synthetic clip length (default: %(default)s)")
    parser.add_argument("--fps", type=int, default=30, help="synthetic clip frame rate (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: %(default)s)")
    args = parser.parse_args()
    # One intra-op thread, as PyTorch sets in each DataLoader worker: the single-process numbers are per worker.
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.video is None:
            start = time.perf_counter()
            args.video = synthetic_clip(tmp / "clip720p.mp4", 1280, 720, args.seconds, args.fps)
            print(
                f"encoded a synthetic 1280x720 clip of {args.seconds:g} s at {args.fps} fps in "
                f"{time.perf_counter() - start:.1f} s ({args.video.stat().st_size / 2**20:.1f} MiB)"
            )
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"
        )

        start = time.perf_counter()
        info = probe_video(args.video)
        print(
            f"probe (full decode, {info.num_frames} frames {info.width}x{info.height}): "
            f"{time.perf_counter() - start:.2f} s"
        )

        rng = np.random.default_rng(0)
        transform = build_transform(False, 448)

        def read():
            return read_video_frames(
                args.video, args.frames, "rand", num_decoded_frames=info.num_frames, fps=info.fps, rng=rng
            )

        start = time.perf_counter()
        for _ in range(args.samples):
            read()
        print(f"decode {args.frames} frames ('rand'), 1 process: {rate(args.samples, time.perf_counter() - start)}")

        start = time.perf_counter()
        for _ in range(args.samples):
            torch.stack([transform(frame) for frame in read()])
        print(
            f"decode + resize/normalise to {args.frames}x3x448x448, 1 process: "
            f"{rate(args.samples, time.perf_counter() - start)}"
        )

        record = {
            "video": os.path.abspath(args.video),
            "decoded_frames": info.num_frames,
            "fps": info.fps,
            "conversations": [
                {"from": "human", "value": "<video>\nSummarize the video."},
                {"from": "gpt", "value": "A red circle moves from left to right."},
            ],
        }
        (tmp / "bench.jsonl").write_text(json.dumps(record) + "\n")
        (tmp / "meta.json").write_text(
            json.dumps(
                {
                    "bench": {
                        "root": "/",
                        "annotation": "bench.jsonl",
                        "data_augment": False,
                        "max_dynamic_patch": 1,
                        "repeat_time": args.samples,
                        "length": args.samples,
                    }
                }
            )
        )
        tokenizer = build_tiny_tokenizer()
        dataset, _ = build_datasets(tmp / "meta.json", tokenizer, min_num_frame=args.frames, max_num_frame=args.frames)
        start = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
        print(
            f"full dataset sample (decode, tiles, tokens), 1 process: {rate(len(dataset), time.perf_counter() - start)}"
        )

        if args.workers > 0:
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=1, num_workers=args.workers, collate_fn=InternVLDataCollator(tokenizer.pad_token_id)
            )
            start = time.perf_counter()
            for _ in loader:
                pass
            print(
                f"DataLoader, {args.workers} workers (start-up included): "
                f"{rate(len(dataset), time.perf_counter() - start)}"
            )


if __name__ == "__main__":
    main()
