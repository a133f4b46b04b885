"""Frame sampling, video decoding on real (and damaged) files, and the demo videos."""

from __future__ import annotations

import csv
import filecmp
import sys

import av
import numpy as np
import pytest
from PIL import Image

from internvl.data.demo import make_demo_videos
from internvl.data.video import (
    NotAVideoError,
    VideoDecodeError,
    clip_frame_range,
    get_frame_indices,
    probe_video,
    read_video_frames,
    recorded_frame_count,
)


def _encode(path, frames: list[np.ndarray], fps: int = 12, faststart: bool = False) -> None:
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def _noise_frames(count: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def _decode_all(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


# --- get_frame_indices --------------------------------------------------------------------------------------------


def test_middle_sampling_takes_segment_middles():
    # 10 frames in 4 segments: [0,2) [2,5) [5,7) [7,10) -> middles 0, 3, 5, 8.
    assert get_frame_indices(4, 10, "middle") == [0, 3, 5, 8]
    assert get_frame_indices(8, 24, "middle") == [1, 4, 7, 10, 13, 16, 19, 22]


def test_fix_start_offsets_each_segment_start():
    assert get_frame_indices(4, 10, "middle", fix_start=1) == [1, 3, 6, 8]


def test_rand_sampling_takes_one_frame_per_segment():
    rng = np.random.default_rng(0)
    edges = np.linspace(0, 100, 9).astype(int)
    draws = [get_frame_indices(8, 100, "rand", rng=rng) for _ in range(50)]
    for indices in draws:
        assert all(edges[k] <= index < edges[k + 1] for k, index in enumerate(indices))
    assert len({tuple(indices) for indices in draws}) > 1


def test_short_video_repeats_its_last_frame():
    assert get_frame_indices(6, 3, "middle") == [0, 1, 2, 2, 2, 2]
    assert get_frame_indices(5, 2, "rand", rng=np.random.default_rng(0)) == [0, 1, 1, 1, 1]


def test_fps_sampling():
    # 100 frames at 10 fps = 10 s; one frame every 2 s at the middle of each interval: 1, 3, 5, 7, 9 s.
    assert get_frame_indices(0, 100, "fps0.5", input_fps=10) == [10, 30, 50, 70, 90]
    assert get_frame_indices(0, 100, "fps0.5", input_fps=10, max_num_frames=3) == [10, 30, 50]


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="unknown frame sampling"):
        get_frame_indices(4, 10, "uniform")
    with pytest.raises(ValueError, match="0 frames"):
        get_frame_indices(4, 0, "middle")


# --- decoding -----------------------------------------------------------------------------------------------------


def test_probe_reports_decoded_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    _encode(path, _noise_frames(20, size=48), fps=10)
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (20, 10.0, 48, 48)
    assert info.duration == pytest.approx(2.0)


def test_read_returns_the_frames_at_the_sampled_indices(tmp_path):
    path = tmp_path / "clip.mp4"
    _encode(path, _noise_frames(30))
    reference = _decode_all(path)
    frames = read_video_frames(path, 5, "middle")
    expected = [reference[i] for i in get_frame_indices(5, 30, "middle")]
    assert all(np.array_equal(np.asarray(frame), want) for frame, want in zip(frames, expected))
    assert all(frame.mode == "RGB" for frame in frames)


def test_clip_samples_inside_its_time_range(tmp_path):
    path = tmp_path / "clip.mp4"
    _encode(path, _noise_frames(30), fps=10)
    reference = _decode_all(path)
    # Seconds 1 to 2 are frames 10..19; their two segment middles are frames 12 and 17.
    frames = read_video_frames(path, 2, "middle", clip=(1.0, 2.0))
    assert np.array_equal(np.stack([np.asarray(frame) for frame in frames]), np.stack([reference[12], reference[17]]))
    # A frame folder has no frame rate, so seconds mean nothing there.
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "f_0.png")
    with pytest.raises(VideoDecodeError, match="needs the frame rate"):
        read_video_frames(str(folder) + "/", 1, "middle", clip=(0.0, 1.0))


@pytest.mark.parametrize("fps", [24.0, 25.0, 29.97, 30.0, 60.0])
def test_clip_frames_follow_the_official_definition(fps):
    # The official reader: first frame int(start * fps), int((end - start) * fps) frames. Taking
    # int(end * fps) - int(start * fps) instead differs by one frame on many of these clips.
    for start in np.arange(0, 5, 0.1).round(1):
        for end in (start + np.arange(0.1, 5, 0.1)).round(1):
            official = (int(start * fps), int((end - start) * fps))
            if official[1] >= 1:
                assert clip_frame_range((start, end), fps, 10_000) == official, (start, end)


def test_clip_stays_inside_the_decoded_frames():
    assert clip_frame_range((2.0, 9.0), 10.0, 50) == (20, 30)  # the video ends at frame 50
    assert clip_frame_range((7.0, 8.0), 10.0, 50) == (49, 1)  # starts after the end: the last frame
    assert clip_frame_range((1.0, 1.01), 10.0, 50) == (10, 1)  # shorter than a frame: one frame
    for clip in [(2.0, 1.0), (1.0, 1.0), (-1.0, 2.0)]:
        with pytest.raises(VideoDecodeError, match="0 <= start < end"):
            clip_frame_range(clip, 10.0, 50)


def test_clip_reads_the_officially_defined_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    _encode(path, _noise_frames(30, size=32), fps=30)
    reference = _decode_all(path)
    # [0.2, 0.6] s at 30 fps: frames 6..16 officially (11 frames; int(0.6 * 30) - int(0.2 * 30) would give 12).
    frames = read_video_frames(path, 11, "middle", clip=(0.2, 0.6))
    assert np.array_equal(np.stack([np.asarray(f) for f in frames]), np.stack(reference[6:17]))


def test_truncated_video_counts_what_decodes(tmp_path):
    # moov atom first: the container still announces every frame after the data is cut in half.
    path = tmp_path / "clip.mp4"
    _encode(path, _noise_frames(48), faststart=True)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    info = probe_video(truncated)
    assert info.announced_frames == 48
    assert 1 <= info.num_frames < 48
    frames = read_video_frames(truncated, 4, "middle", num_decoded_frames=info.num_frames)
    assert len(frames) == 4
    # Asking for frames past what decodes (a stale count) is a clear error, not a silent short read.
    with pytest.raises(VideoDecodeError, match="only .* frames decode"):
        read_video_frames(truncated, 4, "middle", num_decoded_frames=48)


def test_broken_and_non_video_files_are_errors(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="garbage.mp4"):
        probe_video(garbage)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video")
    with pytest.raises(NotAVideoError):
        probe_video(notes)
    still = tmp_path / "still.png"
    Image.new("RGB", (32, 32)).save(still)
    with pytest.raises(NotAVideoError, match="still image"):
        probe_video(still)
    with pytest.raises(VideoDecodeError, match="not found"):
        probe_video(tmp_path / "missing.mp4")


def test_frame_folder_is_ordered_by_frame_number(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    # Written out of order, with numbers that sort wrongly as text (2 < 10).
    for index in (10, 2, 33, 0):
        Image.new("RGB", (16, 16), (index, 0, 0)).save(folder / f"clip_{index}.png")
    info = probe_video(str(folder) + "/")
    assert info.num_frames == 4 and info.fps is None
    frames = read_video_frames(str(folder) + "/", 4, "middle")
    assert [frame.getpixel((0, 0))[0] for frame in frames] == [0, 2, 10, 33]


def test_frame_folder_with_unnumbered_files_is_an_error(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "cover.jpg")
    with pytest.raises(VideoDecodeError, match="cover.jpg"):
        probe_video(folder)


def test_gif(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(6)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    info = probe_video(path)
    assert (info.num_frames, info.fps) == (6, 10.0)
    read = read_video_frames(path, 3, "middle")
    assert [frame.getpixel((0, 0))[0] for frame in read] == [0, 80, 160]


def test_backend_choice(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown video backend"):
        probe_video(tmp_path / "x.mp4", backend="ffmpeg-cli")
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    with pytest.raises(ValueError, match="pip install opencv-python-headless"):
        probe_video(tmp_path / "x.mp4", backend="opencv")


@pytest.mark.parametrize("backend", ["opencv", "decord"])
def test_optional_backends_decode_the_same_frames_as_pyav(tmp_path, backend):
    """OpenCV and decord are optional at run time (requirements_dev.txt installs them for this test)."""
    smooth = [np.full((64, 64, 3), (20 * i, 255 - 20 * i, 128), dtype=np.uint8) for i in range(10)]
    path = tmp_path / "clip.mp4"
    _encode(path, smooth, fps=10)
    reference = probe_video(path)
    info = probe_video(path, backend=backend)
    assert info.num_frames == reference.num_frames == 10
    assert info.fps == pytest.approx(reference.fps)
    expected = read_video_frames(path, 4, "middle")
    frames = read_video_frames(path, 4, "middle", backend=backend)
    # Decoders may round the YUV -> RGB conversion differently; the frames themselves must be the same ones.
    for got, want in zip(frames, expected, strict=True):
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).mean() < 4

    truncated = tmp_path / "truncated.mp4"
    _encode(truncated, _noise_frames(48), faststart=True)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    if backend == "decord":  # decord refuses a cut-off file outright, with a clear error
        with pytest.raises(VideoDecodeError, match="decord cannot open it"):
            probe_video(truncated, backend=backend)
    else:  # OpenCV, like PyAV, counts the frames that really decode
        assert 1 <= probe_video(truncated, backend=backend).num_frames < 48


def test_decoders_disagree_on_a_damaged_file_so_a_count_holds_for_its_decoder_only(damaged_video, tmp_path):
    by_pyav, by_decord = probe_video(damaged_video), probe_video(damaged_video, backend="decord")
    assert (by_pyav.decoder, by_decord.decoder) == ("pyav", "decord")
    assert by_pyav.num_frames != by_decord.num_frames
    count = by_decord.num_frames
    assert recorded_frame_count(damaged_video, "decord", count, "decord") == count
    assert recorded_frame_count(damaged_video, "pyav", count, "decord") is None  # probe with PyAV instead
    assert recorded_frame_count(damaged_video, "pyav", count, None) == count  # hand-written: trusted as before
    # GIFs and frame folders are read by Pillow whatever the backend; a folder's listing is always the truth.
    gif = tmp_path / "clip.gif"
    frames = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    assert probe_video(gif, backend="decord").decoder == "pillow"
    assert recorded_frame_count(gif, "opencv", 3, "pillow") == 3
    assert recorded_frame_count(tmp_path, "pyav", 3, "pyav") is None


# --- demo videos --------------------------------------------------------------------------------------------------


def test_demo_videos_are_deterministic(tmp_path):
    first = make_demo_videos(tmp_path / "a", num_videos=3, seed=1)
    second = make_demo_videos(tmp_path / "b", num_videos=3, seed=1)
    names = sorted(p.name for p in first.iterdir())
    assert names == ["annotations.csv", "demo_000.mp4", "demo_001.mp4", "demo_002.mp4"]
    assert all(filecmp.cmp(first / name, second / name, shallow=False) for name in names)
    other = make_demo_videos(tmp_path / "c", num_videos=3, seed=2)
    assert (first / "annotations.csv").read_text() != (other / "annotations.csv").read_text()


def _shape_centre(frame: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero((frame < 200).any(axis=2))  # non-white pixels
    return xs.mean(), ys.mean()


def test_demo_summaries_describe_the_motion(demo_videos_dir):
    with open(demo_videos_dir / "annotations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and len({row["summary"] for row in rows}) == 6
    single = [row for row in rows if " while " not in row["summary"]]
    assert single
    for row in single:
        frames = _decode_all(demo_videos_dir / row["video"])
        assert len(frames) == 24 and frames[0].shape == (96, 96, 3)
        (x0, y0), (x1, y1) = _shape_centre(frames[0]), _shape_centre(frames[-1])
        summary = row["summary"]
        if "left to right" in summary or "left corner to" in summary:
            assert x1 > x0 + 30, summary
        if "right to left" in summary:
            assert x1 < x0 - 30, summary
        if "top to bottom" in summary or "top left corner to" in summary:
            assert y1 > y0 + 30, summary
        if "bottom to top" in summary or "bottom left corner to" in summary:
            assert y1 < y0 - 30, summary
