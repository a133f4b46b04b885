"""Data-loading throughput: video decode + preprocess, in samples/s, for 16-frame samples of a 720p clip.

    python scripts/benchmark_data.py [--samples 24] [--frames 16] [--workers 2] [--video PATH]

Without --video it encodes a synthetic 1280x720 H.264 clip (a textured background panning under moving shapes,
so the decoder has real motion to work on). It reports, for one process: probing (a full decode, as prepare
does), decoding the sampled frames, decoding + tiling/normalising them, and a full dataset sample (tokenization
included); then a DataLoader with --workers processes. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl.bench.data import run_data_benchmark  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, help="benchmark this file instead of a synthetic clip")
    parser.add_argument("--samples", type=int, default=24, help="samples per measurement (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=16, help="frames per sample (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10, help="synthetic clip length (default: %(default)s)")
    parser.add_argument("--fps", type=int, default=30, help="synthetic clip frame rate (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: %(default)s)")
    args = parser.parse_args()
    run_data_benchmark(
        args.video, samples=args.samples, frames=args.frames, seconds=args.seconds, fps=args.fps, workers=args.workers
    )


if __name__ == "__main__":
    main()
