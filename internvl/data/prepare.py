"""Raw videos + reference summaries -> official InternVL fine-tuning data.

Input is an annotation file (CSV, JSON list or JSONL; one video path and one summary per record) or a folder of
videos with same-name ``.txt`` summaries (or an ``annotations.csv|jsonl|json`` inside it). Every record is checked:
the video path and the summary are text, the video path stays inside the video root, the file exists, opens and
decodes at least one frame, the summary is not empty, and the (video, summary) pair is not a duplicate. Bad records
are skipped with a reason (``--strict`` makes them fatal) and written to ``rejected_records.jsonl``.

Output (``OUTPUT_DIR``): ``meta.json`` with the entries ``video_summary_dataset_train`` and
``video_summary_dataset_val`` (official keys), the two JSONL files, and ``rejected_records.jsonl``. Records of one
video never straddle the split. Paths inside are relative (the video root relative to ``OUTPUT_DIR``) unless
``absolute_root``, and nothing depends on the clock or the machine, so the same input gives byte-identical files.
Every file is written to a temporary name and renamed, so an interrupted run leaves the previous files intact.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from internvl.constants import VIDEO_PLACEHOLDER
from internvl.data.dataset import MetaEntry, write_meta
from internvl.data.files import atomic_directory, atomic_write_text
from internvl.data.video import (
    VIDEO_SUFFIXES,
    NotAVideoError,
    VideoDecodeError,
    VideoInfo,
    get_frame_indices,
    is_frame_folder,
    probe_video,
    read_frames_at,
)

DEFAULT_INPUT = Path("internvl3_data/raw")
DEFAULT_OUTPUT_DIR = Path("internvl3_data")
DEFAULT_PROMPT = "Summarize this video: describe the main events in the order they happen."
TRAIN_NAME = "video_summary_dataset_train"
VAL_NAME = "video_summary_dataset_val"
META_FILE = "meta.json"
REJECTS_FILE = "rejected_records.jsonl"
FRAMES_DIR = "frames"
ANNOTATION_FILE_NAMES = ("annotations.csv", "annotations.jsonl", "annotations.json")
ANNOTATION_SUFFIXES = (".csv", ".json", ".jsonl")
VIDEO_KEY_ALIASES = tuple(
    "video video_path videopath video_file video_name path file filename file_name clip media".split()
)
SUMMARY_KEY_ALIASES = tuple("summary caption text description answer reference response target label output".split())

# Rejection reasons, as written to the rejects file.
MISSING_VIDEO_PATH = "missing_video_path"
EMPTY_SUMMARY = "empty_summary"
MISSING_SUMMARY_FILE = "missing_summary_file"
PATH_ESCAPES_ROOT = "path_escapes_root"
VIDEO_NOT_FOUND = "video_not_found"
NOT_A_VIDEO = "not_a_video"
UNDECODABLE_VIDEO = "undecodable_video"
DUPLICATE = "duplicate"
NOT_TEXT = "not_text"


class PrepareError(Exception):
    """Input that cannot be prepared at all; the message says what to fix. ``rejected`` lists bad records."""

    def __init__(self, message: str, rejected: list[Rejection] | None = None):
        super().__init__(message)
        self.rejected = rejected or []


@dataclass(frozen=True)
class RawRecord:
    source: str  # where the record came from, e.g. "annotations.csv:12"
    # Text as read; a JSON list, object or boolean is kept as is, for validation to reject.
    video: str | None
    summary: str | None


@dataclass(frozen=True)
class Rejection:
    source: str
    video: str | None
    reason: str
    detail: str

    def to_json(self) -> str:
        return json.dumps(
            {"source": self.source, "video": self.video, "reason": self.reason, "detail": self.detail},
            ensure_ascii=False,
        )

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}: {self.detail}"


@dataclass(frozen=True)
class ValidRecord:
    source: str
    video: str  # relative to the video root, POSIX separators
    real_path: str  # identity of the file, for duplicates and the split
    summary: str
    info: VideoInfo


@dataclass
class PrepareReport:
    output_dir: Path
    kept: list[ValidRecord]
    rejected: list[Rejection]
    train_records: int = 0
    val_records: int = 0
    train_videos: int = 0
    val_videos: int = 0
    short_videos: list[tuple[str, int, int]] = field(default_factory=list)  # (video, decoded, announced)

    @property
    def rejected_by_reason(self) -> Counter:
        return Counter(rejection.reason for rejection in self.rejected)

    @property
    def total_duration(self) -> float:
        seen, total = set(), 0.0
        for record in self.kept:
            if record.real_path not in seen and record.info.duration:
                seen.add(record.real_path)
                total += record.info.duration
        return total

    def summary_lines(self) -> list[str]:
        seconds = round(self.total_duration)
        lines = [
            f"kept {len(self.kept)} records ({self.train_videos + self.val_videos} videos, "
            f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} of video)",
            f"rejected {len(self.rejected)} records"
            + "".join(f"\n  {reason}: {count}" for reason, count in sorted(self.rejected_by_reason.items())),
            f"train: {self.train_records} records ({self.train_videos} videos)",
            f"val: {self.val_records} records ({self.val_videos} videos)",
        ]
        if self.short_videos:
            video, decoded, announced = max(self.short_videos, key=lambda item: item[2] - item[1])
            lines.append(
                f"videos that decode fewer frames than their container announces: {len(self.short_videos)} (largest "
                f"gap: {video}, {decoded} of {announced}); the decoded counts are recorded and used"
            )
        lines.append(f"wrote {self.output_dir / META_FILE}")
        return lines


# --- reading the input --------------------------------------------------------------------------------------------


def _pick_key(available: list[str], wanted: str | None, aliases: tuple[str, ...], what: str, source: Path) -> str:
    by_lower = {key.lower(): key for key in available}
    if wanted is not None:
        if wanted in available:
            return wanted
        if wanted.lower() in by_lower:
            return by_lower[wanted.lower()]
        raise PrepareError(f"{source}: no {wanted!r} field; the records have: {', '.join(available) or 'nothing'}")
    for alias in aliases:
        if alias in by_lower:
            return by_lower[alias]
    option = "--video-key" if what == "video" else "--summary-key"
    raise PrepareError(
        f"{source}: no {what} field found among {', '.join(available) or 'nothing'} (looked for "
        f"{', '.join(aliases)}); name the column with {option}"
    )


def _text(value):
    """JSON numbers become text (a video named 17, a summary "42"); other non-text values are left to validation."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def read_annotation_file(path: Path, video_key: str | None = None, summary_key: str | None = None) -> list[RawRecord]:
    """Records of a CSV (with a header row), a JSON list of objects or a JSONL file."""
    suffix = path.suffix.lower()
    rows: list[tuple[str, dict]] = []
    try:
        if suffix == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                keys = list(reader.fieldnames or [])
                rows = [(f"{path.name}:{reader.line_num}", row) for row in reader]
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line_number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append((f"{path.name}:{line_number}", json.loads(line)))
                    except json.JSONDecodeError as error:
                        raise PrepareError(f"{path}:{line_number}: not valid JSON ({error}); fix that line") from None
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise PrepareError(f"{path}: a JSON annotation file must hold a list of records")
            rows = [(f"{path.name}[{index}]", row) for index, row in enumerate(data)]
        else:
            raise PrepareError(f"{path}: unsupported annotation format; use {', '.join(ANNOTATION_SUFFIXES)}")
    except json.JSONDecodeError as error:
        raise PrepareError(f"{path}: not valid JSON ({error}); fix the file or convert it to CSV") from None
    except UnicodeDecodeError as error:
        raise PrepareError(f"{path}: not UTF-8 text ({error}); save it as UTF-8") from None
    for source, row in rows:
        if not isinstance(row, dict):
            raise PrepareError(f"{source}: a record must be an object with a video path and a summary")
    if suffix != ".csv":
        keys = list(dict.fromkeys(key for _, row in rows for key in row))
    if not rows:
        raise PrepareError(f"{path}: holds no records")
    video_field = _pick_key(keys, video_key, VIDEO_KEY_ALIASES, "video", path)
    summary_field = _pick_key(keys, summary_key, SUMMARY_KEY_ALIASES, "summary", path)
    return [RawRecord(source, _text(row.get(video_field)), _text(row.get(summary_field))) for source, row in rows]


def scan_video_folder(folder: Path) -> tuple[list[RawRecord], list[Rejection]]:
    """One record per video under ``folder`` (recursively), its summary read from the same-name ``.txt``.

    A video without a ``.txt`` and a ``.txt`` without a video are rejected here.
    """
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    videos = [path for path in files if path.suffix.lower() in VIDEO_SUFFIXES]
    video_stems = {path.with_suffix("") for path in videos}
    records, rejected = [], []
    for video in videos:
        relative = video.relative_to(folder).as_posix()
        summary_file = video.with_suffix(".txt")
        if summary_file.is_file():
            records.append(RawRecord(relative, relative, summary_file.read_text(encoding="utf-8", errors="replace")))
        else:
            rejected.append(Rejection(relative, relative, MISSING_SUMMARY_FILE, f"no {summary_file.name} beside it"))
    for text_file in files:
        if text_file.suffix.lower() == ".txt" and text_file.with_suffix("") not in video_stems:
            relative = text_file.relative_to(folder).as_posix()
            rejected.append(Rejection(relative, None, VIDEO_NOT_FOUND, "no video of the same name beside it"))
    return records, rejected


def read_input(
    input_path: Path, video_key: str | None = None, summary_key: str | None = None
) -> tuple[list[RawRecord], list[Rejection], Path]:
    """The raw records, the records already rejected while reading, and the folder relative video paths start
    from."""
    if input_path.is_file():
        return read_annotation_file(input_path, video_key, summary_key), [], input_path.parent
    if not input_path.is_dir():
        raise PrepareError(f"input {input_path} does not exist")
    annotation_files = [input_path / name for name in ANNOTATION_FILE_NAMES if (input_path / name).is_file()]
    if len(annotation_files) > 1:
        raise PrepareError(
            f"{input_path} holds several annotation files ({', '.join(p.name for p in annotation_files)}); "
            "pass the one to use with --input"
        )
    if annotation_files:
        return read_annotation_file(annotation_files[0], video_key, summary_key), [], input_path
    records, rejected = scan_video_folder(input_path)
    if not records and not rejected:
        raise PrepareError(
            f"{input_path} holds no videos ({', '.join(VIDEO_SUFFIXES)}) and no annotation file "
            f"({', '.join(ANNOTATION_FILE_NAMES)})"
        )
    return records, rejected, input_path


# --- validation ---------------------------------------------------------------------------------------------------


def relative_to_root(root: Path, video: str) -> str | None:
    """``video`` as a POSIX path relative to ``root``, or ``None`` if it points outside ``root``.

    The check is on the normalised path, not on symlink targets, so a root made of symlinks still works.
    """
    root_abs = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.join(root_abs, os.path.expanduser(video)))
    if os.path.commonpath([root_abs, target]) != root_abs or target == root_abs:
        return None
    relative = Path(os.path.relpath(target, root_abs)).as_posix()
    return relative + "/" if is_frame_folder(target) else relative


class _Validator:
    """Checks records one by one, remembering decoded videos and the (video, summary) pairs already seen."""

    def __init__(self, video_root: Path, backend: str):
        self.video_root = video_root
        self.backend = backend
        self.probes: dict[str, VideoInfo | VideoDecodeError] = {}
        self.first_seen: dict[tuple[str, str], str] = {}

    def check(self, record: RawRecord) -> ValidRecord | Rejection:
        def reject(reason: str, detail: str) -> Rejection:
            return Rejection(record.source, record.video, reason, detail)

        for field_name, value in (("video path", record.video), ("summary", record.summary)):
            if value is not None and not isinstance(value, str):
                kind = {dict: "an object", list: "a list", bool: "a boolean"}.get(type(value), type(value).__name__)
                return reject(NOT_TEXT, f"the {field_name} is {kind}, not text")
        video = (record.video or "").strip()
        summary = (record.summary or "").strip()
        if not video:
            return reject(MISSING_VIDEO_PATH, "the record has no video path")
        if not summary:
            return reject(EMPTY_SUMMARY, "the summary is empty")
        relative = relative_to_root(self.video_root, video)
        if relative is None:
            return reject(
                PATH_ESCAPES_ROOT,
                f"{video} is outside the video root {self.video_root}; move the file under the root or pass a "
                "--video-root that contains it",
            )
        path = os.path.join(self.video_root, relative)
        if not os.path.exists(path):
            return reject(VIDEO_NOT_FOUND, f"{path} does not exist")
        real_path = os.path.realpath(path)
        if (real_path, summary) in self.first_seen:
            return reject(DUPLICATE, f"same video and summary as {self.first_seen[real_path, summary]}")
        self.first_seen[real_path, summary] = record.source
        if real_path not in self.probes:
            try:
                self.probes[real_path] = probe_video(path, self.backend)
            except VideoDecodeError as error:
                self.probes[real_path] = error
        probe = self.probes[real_path]
        if isinstance(probe, VideoDecodeError):
            return reject(NOT_A_VIDEO if isinstance(probe, NotAVideoError) else UNDECODABLE_VIDEO, str(probe))
        return ValidRecord(record.source, relative, real_path, summary, probe)


def validate_records(
    records: list[RawRecord], video_root: Path, *, backend: str = "pyav", progress: bool = True
) -> tuple[list[ValidRecord], list[Rejection]]:
    """Split records into valid ones (with what their video really holds) and rejections, in input order."""
    validator = _Validator(video_root, backend)
    kept, rejected = [], []
    for record in tqdm(records, desc="checking videos", unit="record", disable=not progress):
        result = validator.check(record)
        (rejected if isinstance(result, Rejection) else kept).append(result)
    return kept, rejected


# --- split and output ---------------------------------------------------------------------------------------------


def split_by_video(
    records: list[ValidRecord], val_ratio: float, seed: int
) -> tuple[list[ValidRecord], list[ValidRecord]]:
    """Deterministic split for ``seed``; all records of one video land in the same split.

    Videos are ordered by path before shuffling, so the split depends on the content, not on the input order.
    With two or more videos and ``val_ratio > 0``, each split gets at least one video.
    """
    groups: dict[str, list[ValidRecord]] = defaultdict(list)
    for record in records:
        groups[record.real_path].append(record)
    order = sorted(groups, key=lambda real_path: min(record.video for record in groups[real_path]))
    random.Random(seed).shuffle(order)
    num_val = round(len(order) * val_ratio)
    if val_ratio > 0 and len(order) >= 2:
        num_val = min(max(num_val, 1), len(order) - 1)
    elif len(order) < 2:
        num_val = 0
    val_videos = set(order[:num_val])
    return (
        [record for record in records if record.real_path not in val_videos],
        [record for record in records if record.real_path in val_videos],
    )


def _frames_folder_name(relative_video: str) -> str:
    # "sub/clip.mp4" -> "sub/clip_mp4": unique per video, and a folder name that cannot look like a video file.
    path = Path(relative_video.rstrip("/"))
    return (path.parent / path.name.replace(".", "_")).as_posix()


def extract_frames(record: ValidRecord, video_root: Path, output_dir: Path, num_frames: int, backend: str) -> str:
    """Decode ``num_frames`` frames (segment middles) into ``frames/<video>/<name>_<frame index>.jpg``; returns the
    folder relative to ``output_dir``, ending in ``/`` (the official frame-folder convention)."""
    folder = Path(FRAMES_DIR) / _frames_folder_name(record.video)
    indices = get_frame_indices(min(num_frames, record.info.num_frames), record.info.num_frames, "middle")
    frames = read_frames_at(os.path.join(video_root, record.video), indices, backend=backend)
    with atomic_directory(output_dir / folder) as tmp_dir:
        for index, frame in zip(indices, frames):
            frame.save(tmp_dir / f"{folder.name}_{index:06d}.jpg", quality=95)
    return folder.as_posix() + "/"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _record_json(
    record: ValidRecord, record_id: str, video: str, prompt: str, system_prompt: str | None, extracted: int | None
) -> str:
    conversations = [{"from": "system", "value": system_prompt}] if system_prompt else []
    conversations += [
        {"from": "human", "value": f"{VIDEO_PLACEHOLDER}\n{prompt}"},
        {"from": "gpt", "value": record.summary},
    ]
    entry = {"id": record_id, "video": video, "conversations": conversations}
    if extracted is not None:
        entry["source_video"] = record.video
        entry["extracted_frames"] = extracted
    entry.update(
        duration=_round(record.info.duration),
        decoded_frames=record.info.num_frames,
        fps=_round(record.info.fps),
        width=record.info.width,
        height=record.info.height,
    )
    return json.dumps(entry, ensure_ascii=False)


def _record_ids(records: list[ValidRecord]) -> dict[int, str]:
    """Ids from the video path; a video with several summaries gets ``#2``, ``#3``... on the later ones."""
    seen: Counter = Counter()
    ids = {}
    for position, record in enumerate(records):
        base = record.video.rstrip("/")
        seen[base] += 1
        ids[position] = base if seen[base] == 1 else f"{base}#{seen[base]}"
    return ids


def _path_for_meta(path: Path, output_dir: Path, absolute: bool) -> str:
    if absolute:
        return os.path.abspath(path)
    try:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(output_dir))).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return os.path.abspath(path)


def prepare_dataset(
    input_path: str | os.PathLike = DEFAULT_INPUT,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    *,
    video_key: str | None = None,
    summary_key: str | None = None,
    video_root: str | os.PathLike | None = None,
    val_ratio: float = 0.1,
    seed: int = 0,
    prompt: str = DEFAULT_PROMPT,
    system_prompt: str | None = None,
    strict: bool = False,
    extract: bool = False,
    num_frames: int = 32,
    absolute_root: bool = False,
    video_backend: str = "pyav",
    progress: bool = True,
) -> PrepareReport:
    """Validate the input, split it and write ``meta.json``, the train/val JSONL files and the rejects file.

    Raises ``PrepareError`` for unusable input, for any bad record under ``strict``, or when nothing is left.
    """
    if not 0 <= val_ratio < 1:
        raise PrepareError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if not prompt.strip():
        raise PrepareError("the prompt is empty")
    if extract and num_frames < 1:
        raise PrepareError(f"--num-frames must be at least 1, got {num_frames}")
    input_path, output_dir = Path(input_path), Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise PrepareError(f"output folder {output_dir} is a file; pass another --output-dir")
    raw_records, rejected, default_root = read_input(input_path, video_key, summary_key)
    root = Path(video_root) if video_root is not None else default_root
    if not root.is_dir():
        raise PrepareError(f"video root {root} is not a folder")

    kept, invalid = validate_records(raw_records, root, backend=video_backend, progress=progress)
    rejected += invalid
    if strict and rejected:
        raise PrepareError(f"{len(rejected)} bad records (--strict): nothing was written", rejected)
    if not kept:
        raise PrepareError(f"no usable record in {input_path}: all {len(rejected)} were rejected", rejected)

    train, val = split_by_video(kept, val_ratio, seed)
    report = PrepareReport(output_dir=output_dir, kept=kept, rejected=rejected)
    report.short_videos = sorted(
        {
            (record.video, record.info.num_frames, record.info.announced_frames)
            for record in kept
            if record.info.announced_frames and record.info.num_frames < record.info.announced_frames
        }
    )
    output_dir.mkdir(parents=True, exist_ok=True)

    frame_folders: dict[str, str] = {}
    if extract:
        unique = {record.real_path: record for record in kept}
        for record in tqdm(list(unique.values()), desc="extracting frames", unit="video", disable=not progress):
            frame_folders[record.real_path] = extract_frames(record, root, output_dir, num_frames, video_backend)
    data_root = output_dir if extract else root

    files: dict[str, str] = {REJECTS_FILE: "".join(rejection.to_json() + "\n" for rejection in rejected)}
    meta: dict[str, MetaEntry] = {}
    for name, records in ((TRAIN_NAME, train), (VAL_NAME, val)):
        ids = _record_ids(records)
        lines = []
        for position, record in enumerate(records):
            video = frame_folders.get(record.real_path, record.video)
            extracted = min(num_frames, record.info.num_frames) if extract else None
            lines.append(_record_json(record, ids[position], video, prompt, system_prompt, extracted) + "\n")
        annotation = f"{name}.jsonl"
        files[annotation] = "".join(lines)
        meta[name] = MetaEntry(
            root=_path_for_meta(data_root, output_dir, absolute_root),
            annotation=os.path.abspath(output_dir / annotation) if absolute_root else annotation,
            length=len(records),
            max_dynamic_patch=1,
        )
    for file_name, text in files.items():
        atomic_write_text(output_dir / file_name, text)
    write_meta(output_dir / META_FILE, meta)  # last: it only ever points at complete files

    report.train_records, report.val_records = len(train), len(val)
    report.train_videos = len({record.real_path for record in train})
    report.val_videos = len({record.real_path for record in val})
    return report
