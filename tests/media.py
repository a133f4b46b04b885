"""Small synthetic test videos, encoded the way real collections are (H.264 MP4; MPEG-4 Part 2 without libx264)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_noise_video(path: Path, num_frames: int, *, faststart: bool = False) -> Path:
    """``num_frames`` 64x64 frames of noise at 12 fps. ``faststart`` puts the index first, so a cut file still
    announces every frame."""
    rng = np.random.default_rng(0)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=12)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for _ in range(num_frames):
            frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
