"""Deterministic synthetic demo videos: coloured shapes moving across a white frame, with matching summaries.

Each clip is a real H.264 MP4 (MPEG-4 Part 2 where the PyAV build lacks libx264), small enough to decode in
milliseconds on a CPU. The summary is written from the motion that was drawn, so a model that learns the task
learns something checkable. The same arguments give byte-identical files.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from internvl.data.files import atomic_path, atomic_write_text

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
# Motion name -> start and end centre, as fractions of the frame (x, y).
MOTIONS = {
    "from left to right": ((0.15, 0.5), (0.85, 0.5)),
    "from right to left": ((0.85, 0.5), (0.15, 0.5)),
    "from top to bottom": ((0.5, 0.15), (0.5, 0.85)),
    "from bottom to top": ((0.5, 0.85), (0.5, 0.15)),
    "from the top left corner to the bottom right corner": ((0.15, 0.15), (0.85, 0.85)),
    "from the bottom left corner to the top right corner": ((0.15, 0.85), (0.85, 0.15)),
}
ANNOTATIONS_FILE = "annotations.csv"


@dataclass(frozen=True)
class MovingShape:
    shape: str
    colour: str
    motion: str

    def describe(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} moves {self.motion}"


def _draw_shape(draw: ImageDraw.ImageDraw, item: MovingShape, centre: tuple[float, float], radius: float) -> None:
    x, y = centre
    fill = COLOURS[item.colour]
    box = (x - radius, y - radius, x + radius, y + radius)
    if item.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif item.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=fill)


def render_frames(items: list[MovingShape], *, frames: int, size: int) -> list[Image.Image]:
    """Draw each shape along its motion path, linearly from the first frame to the last."""
    radius = size * 0.12
    images = []
    for t in range(frames):
        progress = t / max(frames - 1, 1)
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for item in items:
            (x0, y0), (x1, y1) = MOTIONS[item.motion]
            centre = ((x0 + (x1 - x0) * progress) * size, (y0 + (y1 - y0) * progress) * size)
            _draw_shape(draw, item, centre, radius)
        images.append(image)
    return images


def encode_mp4(images: list[Image.Image], path: str | Path, *, fps: int) -> None:
    """Encode RGB frames as an MP4 (H.264 when available), written atomically."""
    import av  # imported here so that training without PyAV (frame folders) never needs it

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    width, height = images[0].size
    with atomic_path(path) as tmp_path:
        with av.open(str(tmp_path), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # One encoder thread keeps the output byte-identical from run to run.
            stream.codec_context.thread_count = 1
            if codec == "libx264":
                stream.options = {"crf": "20", "preset": "medium"}
            else:
                stream.bit_rate = 400_000
            for image in images:
                # Convert to YUV here: the encoder's own conversion may run threaded and vary by a few bytes.
                frame = av.VideoFrame.from_image(image).reformat(format="yuv420p")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())


def summarize(items: list[MovingShape]) -> str:
    text = " while ".join(item.describe() for item in items)
    return text[0].upper() + text[1:] + "."


def make_demo_videos(
    output_dir: str | Path,
    num_videos: int = 8,
    seed: int = 0,
    frames: int = 24,
    size: int = 96,
    fps: int = 12,
) -> Path:
    """Write ``num_videos`` clips ``demo_000.mp4``, ... and ``annotations.csv`` (``video,summary``) into
    ``output_dir``; return ``output_dir``.

    Each clip shows one or two shapes of distinct colours, each moving along one of a few straight paths.
    ``size`` must be even (yuv420p).
    """
    if not 1 <= num_videos <= 1000 or frames < 2:
        raise ValueError("make_demo_videos needs 1 <= num_videos <= 1000 and frames >= 2")
    if size % 2 or size < 16:
        raise ValueError(f"size must be an even number of pixels >= 16, got {size}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colour_names, motion_names = list(COLOURS), list(MOTIONS)

    rows, seen = [], set()
    for index in range(num_videos):
        num_shapes = 1 + index % 2
        # Redraw until the clip differs from every earlier one; there are thousands of combinations.
        while True:
            colours = rng.choice(len(colour_names), size=num_shapes, replace=False)
            motions = rng.choice(len(motion_names), size=num_shapes, replace=False)
            items = [
                MovingShape(SHAPES[int(rng.integers(len(SHAPES)))], colour_names[c], motion_names[m])
                for c, m in zip(colours, motions)
            ]
            if summarize(items) not in seen:
                break
        seen.add(summarize(items))
        name = f"demo_{index:03d}.mp4"
        encode_mp4(render_frames(items, frames=frames, size=size), output_dir / name, fps=fps)
        rows.append((name, summarize(items)))

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("video", "summary"))
    writer.writerows(rows)
    atomic_write_text(output_dir / ANNOTATIONS_FILE, buffer.getvalue())
    return output_dir
