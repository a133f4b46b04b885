"""Video decoding and frame-index sampling.

Three kinds of video source, dispatched on the path as in the official data format:

- a **frame folder** (a path ending in ``/`` or an existing directory) of ``<name>_<index>.jpg`` images, ordered by
  the number after the last underscore;
- a **GIF**, read with Pillow;
- any other **video file**, read with PyAV (default), decord or OpenCV (``backend``).

Containers often announce more frames than they hold (a header saying 444 frames over 68 decodable ones is
common in real collections), so counts here are what actually decodes: ``probe_video`` decodes the whole file,
and readers use the decoded count recorded by ``prepare`` (``num_decoded_frames``) when they are given one.
Damaged packets are skipped as FFmpeg's own tools do, so a file with a bad stretch keeps the frames around it.
Decoders disagree on damaged files (PyAV skips a bad packet, decord and OpenCV stop at it, or conceal it as one
more frame), so a count holds only for the decoder that made it: ``recorded_frame_count`` says when one applies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

VIDEO_BACKENDS = ("pyav", "decord", "opencv")
FRAME_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = tuple(".mp4 .m4v .mov .mkv .webm .avi .wmv .flv .mpg .mpeg .ts .3gp .ogv .gif".split())
_FRAME_NUMBER = re.compile(r"_(\d+)$")
# FFmpeg demuxers that read still images: such a file "decodes" to one frame but is not a video.
_STILL_IMAGE_FORMATS = re.compile(r"^(image2|.*_pipe)$")


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened or yields no frame. The message names the file."""


class NotAVideoError(VideoDecodeError):
    """A file that is not a video at all: a still image, audio only, or an unknown extension FFmpeg cannot open."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video really holds. ``fps`` is ``None`` when the source has no frame rate (frame folders)."""

    num_frames: int
    fps: float | None
    width: int
    height: int
    decoder: str  # what counted the frames (see ``frame_decoder``)
    announced_frames: int | None = None  # the container's claim, for reporting only

    @property
    def duration(self) -> float | None:
        return self.num_frames / self.fps if self.fps else None


def get_frame_indices(
    num_frames: int,
    vlen: int,
    sample: str = "rand",
    fix_start: int | None = None,
    input_fps: float = 1,
    max_num_frames: int = -1,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Pick frame indices in ``[0, vlen)``.

    - ``"rand"`` / ``"middle"``: split the video into ``min(num_frames, vlen)`` equal segments and take one frame
      per segment, uniformly at random or at its middle (``fix_start`` takes the frame that far into each
      segment instead); a video shorter than ``num_frames`` repeats its last index up to ``num_frames``.
    - ``"fpsX"`` (e.g. ``"fps0.5"``): one frame every 1/X seconds, at the middle of each interval, using
      ``input_fps``; at most ``max_num_frames`` when that is positive.
    """
    if vlen < 1:
        raise ValueError(f"cannot sample frames from a video of {vlen} frames")
    if sample in ("rand", "middle"):
        segments = min(num_frames, vlen)
        edges = np.linspace(0, vlen, segments + 1).astype(int)
        starts, stops = edges[:-1], edges[1:]  # segment k is [starts[k], stops[k]), never empty as vlen >= segments
        if sample == "rand":
            rng = rng if rng is not None else np.random.default_rng()
            indices = [int(rng.integers(start, stop)) for start, stop in zip(starts, stops)]
        elif fix_start is not None:
            indices = [int(start) + fix_start for start in starts]
        else:
            indices = [int(start + stop - 1) // 2 for start, stop in zip(starts, stops)]
        return indices + [indices[-1]] * (num_frames - len(indices))
    if sample.startswith("fps"):
        output_fps = float(sample[3:])
        step = 1 / output_fps
        seconds = np.arange(step / 2, vlen / input_fps + step / 2, step)
        indices = [int(i) for i in np.around(seconds * input_fps) if i < vlen]
        return indices[:max_num_frames] if max_num_frames > 0 else indices
    raise ValueError(f"unknown frame sampling {sample!r}: use 'rand', 'middle' or 'fpsX' (e.g. 'fps1')")


def is_frame_folder(path: str | os.PathLike) -> bool:
    return str(path).endswith(("/", os.sep)) or os.path.isdir(path)


def frame_decoder(path: str | os.PathLike, backend: str) -> str:
    """What reads the frames of ``path`` with ``backend``: Pillow for frame folders and GIFs, else the backend."""
    return "pillow" if is_frame_folder(path) or str(path).lower().endswith(".gif") else backend


def recorded_frame_count(
    path: str | os.PathLike, backend: str, decoded_frames: int | None, decoder: str | None
) -> int | None:
    """The frame count ``prepare`` recorded, when it holds for reading ``path`` with ``backend``; else ``None``
    (probe the video instead). A frame folder's listing is always the truth; a count made by another decoder does
    not hold; a count without its decoder (hand-written records) is trusted."""
    if not decoded_frames or is_frame_folder(path):
        return None
    if decoder is not None and decoder != frame_decoder(path, backend):
        return None
    return int(decoded_frames)


# --- frame sources -----------------------------------------------------------------------------------------------
# Each source yields its frames in order as zero-argument functions returning a PIL RGB image, so counting frames
# never pays for a colour conversion it does not need. A function is valid until the next frame is taken.

FrameIterator = Iterator[Callable[[], Image.Image]]


class _DecodeErrorMidway(Exception):
    """Raised by a frame source whose decoding failed after it started: the caller decides if frames came first."""

    def __init__(self, path, error: Exception):
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, error


def _frame_folder_files(path: str | os.PathLike) -> list[Path]:
    folder = Path(path)
    if not folder.is_dir():
        raise VideoDecodeError(f"frame folder {folder} does not exist")
    files = [p for p in folder.iterdir() if p.suffix.lower() in FRAME_IMAGE_SUFFIXES]
    if not files:
        raise VideoDecodeError(f"frame folder {folder} holds no {'/'.join(FRAME_IMAGE_SUFFIXES)} images")
    numbered = []
    for file in files:
        match = _FRAME_NUMBER.search(file.stem)
        if match is None:
            raise VideoDecodeError(
                f"frame folder {folder}: {file.name} is not named <name>_<index>{file.suffix}, so its place in the "
                "video is unknown; rename the frames with their index after the last underscore"
            )
        numbered.append((int(match.group(1)), file.name, file))
    return [file for _, _, file in sorted(numbered)]


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _iter_frame_folder(path) -> FrameIterator:
    for file in _frame_folder_files(path):
        yield lambda file=file: _load_rgb(file)


def _iter_gif(path) -> FrameIterator:
    try:
        with Image.open(path) as gif:
            for frame in ImageSequence.Iterator(gif):
                yield lambda frame=frame: frame.convert("RGB")
    except (OSError, EOFError, SyntaxError, ValueError) as error:
        # Pillow raises on a damaged frame; the frames before it are the GIF.
        raise _DecodeErrorMidway(path, error) from error


def _gif_fps(path) -> float | None:
    with Image.open(path) as gif:
        durations = []
        for frame in ImageSequence.Iterator(gif):
            durations.append(frame.info.get("duration", 0))
    mean_ms = sum(durations) / len(durations) if durations else 0
    return 1000.0 / mean_ms if mean_ms > 0 else None


def _open_pyav(path):
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        if Path(path).suffix.lower() not in VIDEO_SUFFIXES:
            raise NotAVideoError(f"{path}: not a video (unknown extension, and FFmpeg cannot open it)") from error
        raise VideoDecodeError(f"{path}: cannot open as a video ({error})") from error
    if _STILL_IMAGE_FORMATS.match(container.format.name):
        container.close()
        raise NotAVideoError(f"{path}: a still image ({container.format.name}), not a video")
    if not container.streams.video:
        container.close()
        raise NotAVideoError(f"{path}: has no video stream")
    return container


def _pyav_fps(container) -> float | None:
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _iter_pyav(path) -> FrameIterator:
    import av

    container = _open_pyav(path)
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        first_error = None
        try:
            for packet in container.demux(stream):
                # Like FFmpeg's own tools, skip a damaged packet and go on: the frames after it still count.
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as error:
                    first_error = first_error or error
                    continue
                for frame in frames:
                    yield lambda frame=frame: frame.to_image()
        except av.error.FFmpegError as error:  # the container itself is damaged from here on
            raise _DecodeErrorMidway(path, error) from error
        if first_error is not None:
            raise _DecodeErrorMidway(path, first_error)


def _open_opencv(path):
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoDecodeError(f"{path}: OpenCV cannot open it as a video")
    return capture


def _iter_opencv(path) -> FrameIterator:
    import cv2

    capture = _open_opencv(path)
    try:
        while capture.grab():

            def retrieve(capture=capture):
                ok, bgr = capture.retrieve()
                if not ok:
                    raise VideoDecodeError(f"{path}: OpenCV decoded a frame it then could not return")
                return Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

            yield retrieve
    finally:
        capture.release()


def _iter_frames(path, backend: str) -> FrameIterator:
    if frame_decoder(path, backend) == "pillow":
        return _iter_frame_folder(path) if is_frame_folder(path) else _iter_gif(path)
    if backend == "pyav":
        return _iter_pyav(path)
    if backend == "opencv":
        return _iter_opencv(path)
    if backend == "decord":
        return _iter_decord(path)
    raise ValueError(f"unknown video backend {backend!r}; choose one of {', '.join(VIDEO_BACKENDS)}")


def _iter_decord(path) -> FrameIterator:
    reader = _open_decord(path)
    while True:
        try:
            array = reader.next().asnumpy()
        except StopIteration:
            return
        except Exception as error:  # decord raises its own DECORDError for damaged frames
            raise _DecodeErrorMidway(path, error) from error
        yield lambda array=array: Image.fromarray(array)


def _open_decord(path):
    import decord

    try:
        return decord.VideoReader(str(path), num_threads=1)
    except Exception as error:  # DECORDError and RuntimeError, depending on the failure
        raise VideoDecodeError(f"{path}: decord cannot open it as a video ({error})") from error


def _check_backend(backend: str, path: str | os.PathLike) -> None:
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {', '.join(VIDEO_BACKENDS)}")
    if frame_decoder(path, backend) == "pillow":
        return  # the backend's package is not needed
    module = {"pyav": "av", "decord": "decord", "opencv": "cv2"}[backend]
    try:
        __import__(module)
    except ImportError:
        package = {"pyav": "av", "decord": "decord", "opencv": "opencv-python-headless"}[backend]
        raise ValueError(f"video backend {backend!r} needs the {package} package: pip install {package}") from None


def _decode(path, backend: str, keep: set[int] | None, stop_after: int | None) -> tuple[int, dict[int, Image.Image]]:
    """Decode frames in order. Returns (frames decoded, {index: image} for indices in ``keep``).

    Stops after frame ``stop_after``. An error after some frames ends the video there; before any, it is fatal.
    """
    count, kept = 0, {}
    frames = _iter_frames(path, backend)
    try:
        for index, to_image in enumerate(frames):
            count = index + 1
            if keep is not None and index in keep:
                try:
                    kept[index] = to_image()
                except (OSError, ValueError) as error:
                    raise VideoDecodeError(f"{path}: frame {index} cannot be read ({error})") from error
            if stop_after is not None and index >= stop_after:
                break
    except _DecodeErrorMidway as failure:
        if count == 0:
            raise VideoDecodeError(f"{path}: no frame decodes ({failure.error})") from failure.error
    finally:
        frames.close()
    if count == 0:
        raise VideoDecodeError(f"{path}: no frame decodes")
    return count, kept


def probe_video(path: str | os.PathLike, backend: str = "pyav") -> VideoInfo:
    """Decode ``path`` completely and report what it really holds."""
    _check_backend(backend, path)
    path_str = str(path)
    if not is_frame_folder(path) and not os.path.isfile(path):
        raise VideoDecodeError(f"{path}: file not found")
    count, first = _decode(path, backend, keep={0}, stop_after=None)
    width, height = first[0].size
    fps, announced = None, None
    if is_frame_folder(path):
        pass
    elif path_str.lower().endswith(".gif"):
        fps = _gif_fps(path)
    elif backend == "pyav":
        with _open_pyav(path) as container:
            fps = _pyav_fps(container)
            announced = container.streams.video[0].frames or None
    elif backend == "opencv":
        import cv2

        capture = _open_opencv(path)
        fps = capture.get(cv2.CAP_PROP_FPS) or None
        announced = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        capture.release()
    else:
        reader = _open_decord(path)
        fps, announced = reader.get_avg_fps() or None, len(reader)
    return VideoInfo(
        num_frames=count,
        fps=fps,
        width=width,
        height=height,
        decoder=frame_decoder(path, backend),
        announced_frames=announced,
    )


def clip_frame_range(
    clip: tuple[float, float], fps: float, num_decoded_frames: int, *, where: str = "video"
) -> tuple[int, int]:
    """(first frame, number of frames) of the clip ``[start_s, end_s]``, as the official reader defines them:
    ``int(start_s * fps)`` and ``int((end_s - start_s) * fps)``, kept inside the frames that decode (at least one)."""
    start_s, end_s = clip
    if not 0 <= start_s < end_s:
        raise VideoDecodeError(f"{where}: clip {list(clip)} must be [start, end] in seconds with 0 <= start < end")
    first = min(int(start_s * fps), num_decoded_frames - 1)
    return first, max(1, min(int((end_s - start_s) * fps), num_decoded_frames - first))


def read_video_frames(
    path: str | os.PathLike,
    num_frames: int,
    sample: str = "rand",
    *,
    backend: str = "pyav",
    fix_start: int | None = None,
    clip: tuple[float, float] | None = None,
    num_decoded_frames: int | None = None,
    fps: float | None = None,
    rng: np.random.Generator | None = None,
) -> list[Image.Image]:
    """Read ``num_frames`` RGB frames sampled with ``sample`` (see ``get_frame_indices``).

    ``num_decoded_frames`` and ``fps`` are the values recorded by ``prepare``; without them the video is probed
    first (one extra decoding pass). ``clip`` = ``(start_s, end_s)`` samples inside that time range only.
    """
    if num_decoded_frames is None or (fps is None and (clip or sample.startswith("fps"))):
        info = probe_video(path, backend)
        num_decoded_frames, fps = info.num_frames, info.fps
    first, vlen = 0, num_decoded_frames
    if clip is not None:
        if not fps:
            raise VideoDecodeError(f"{path}: a clip needs the frame rate, which this source does not have")
        first, vlen = clip_frame_range(clip, fps, num_decoded_frames, where=str(path))
    if sample.startswith("fps") and not fps:
        raise VideoDecodeError(f"{path}: '{sample}' sampling needs the frame rate, which this source does not have")
    indices = [first + i for i in get_frame_indices(num_frames, vlen, sample, fix_start, fps or 1, num_frames, rng)]
    return read_frames_at(path, indices, backend=backend)


def read_frames_at(path: str | os.PathLike, indices: list[int], *, backend: str = "pyav") -> list[Image.Image]:
    """The RGB frames at ``indices`` (0-based, in decoding order; repeats allowed)."""
    _check_backend(backend, path)
    if frame_decoder(path, backend) == "decord":
        # decord reads by index directly instead of decoding up to the last wanted frame.
        reader = _open_decord(path)
        try:
            batch = reader.get_batch(indices).asnumpy()
        except Exception as error:
            raise VideoDecodeError(f"{path}: decord cannot read frames {indices} ({error})") from error
        return [Image.fromarray(array) for array in batch]

    count, kept = _decode(path, backend, keep=set(indices), stop_after=max(indices))
    missing = sorted(set(indices) - kept.keys())
    if missing:
        raise VideoDecodeError(
            f"{path}: only {count} frames decode with {frame_decoder(path, backend)} but frame {missing[0]} was "
            "requested: the frame count given (decoded_frames from prepare) is larger, so the file changed since it "
            "was prepared, or it was counted by another decoder or decoder version; run the prepare script again"
        )
    return [kept[i] for i in indices]
