"""Raw videos + reference summaries -> official InternVL fine-tuning data.

Input is an annotation file (CSV, JSON list or JSONL; one video path and one summary per record) or a folder of
videos with same-name ``.txt`` summaries (or an ``annotations.csv|jsonl|json`` inside it). Every record is checked:
the video path and the summary are UTF-8 text without NUL characters, the video path stays inside the video root,
the file exists, opens and decodes at least one frame, the summary is not empty, and the (video, summary) pair is
not a duplicate. Bad records are skipped with a reason (``--strict`` makes them fatal) and written to
``rejected_records.jsonl``; a CSV whose quoting would merge or cut records is refused, naming the line. Summaries
too long to ever fit a training sample are kept and warned about.

Output (``OUTPUT_DIR``): ``meta.json`` (official keys) and a folder ``prepared-<version>/`` holding the JSONL files,
``rejected_records.jsonl`` and, with ``--extract-frames``, the frames. ``meta.json`` names the entry
``video_summary_dataset_train`` and, when the split holds records, ``video_summary_dataset_val``: an empty split
gets no entry. Records of one video never straddle the split. ``meta.json`` names the video root and the files as
they were given: relative to the working directory unless absolute (the official convention, so the official trainer
started from the same folder finds them); ``absolute_root`` makes them absolute, ``portable`` relative to
``OUTPUT_DIR`` (an entry marked so). Nothing depends on the clock, so the same input gives byte-identical files
(the version is a hash of the content).

The outputs change as a set: the version folder is written under a temporary name and renamed into place, then
``meta.json`` is switched to it (a temporary file renamed over the old one), and only then are older versions
removed. A run killed at any point leaves ``meta.json`` naming either the old set or the new one, both complete.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from internvl.constants import VIDEO_PLACEHOLDER
from internvl.conversation import get_conv_template
from internvl.data.dataset import META_FOLDER, MetaEntry, SampleOptions, video_frame_token_estimate, write_meta
from internvl.data.files import LockHeldError, atomic_directory, atomic_write_text, exclusive_lock
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
VERSION_PREFIX = "prepared-"
_VERSION_FOLDER = re.compile(re.escape(VERSION_PREFIX) + "[0-9a-f]{12}")
LOCK_FILE = ".prepare.lock"
ANNOTATION_FILE_NAMES = ("annotations.csv", "annotations.jsonl", "annotations.json")
ANNOTATION_SUFFIXES = (".csv", ".json", ".jsonl")
VIDEO_KEY_ALIASES = tuple(
    "video video_path videopath video_file video_name path file filename file_name clip media".split()
)
SUMMARY_KEY_ALIASES = tuple("summary caption text description answer reference response target label output".split())
# Delimiters people export "CSV" with instead of commas, by name.
OTHER_CSV_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "pipe"}
# A line that starts like a CSV record of its own (a video path, then a comma): inside a field, a runaway quote.
_RECORD_LIKE_LINE = re.compile(
    r'^\s*"?[^",\n]*(' + "|".join(re.escape(suffix) for suffix in VIDEO_SUFFIXES) + r')"?\s*,', re.IGNORECASE
)
# Qwen2.5's tokenizer turns English prose into about one token per 4 to 5 characters, and Chinese into about one per
# character (3 UTF-8 bytes): one token per 4 bytes is a fair estimate for both, without loading a tokenizer.
UTF8_BYTES_PER_TOKEN = 4
# Surrogate escapes stand for bytes that were not UTF-8 (text is read with errors="surrogateescape").
_UNDECODABLE = re.compile("[\udc80-\udcff]")

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
NOT_UTF8 = "not_utf8"
NUL_CHARACTER = "nul_character"
EXTRA_FIELDS = "extra_fields"


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
    summary_file: str | None = None  # folder input: the .txt the summary comes from


def printable(text: str) -> str:
    """``text`` with bytes that were not UTF-8 shown as ``\\xe9``, so it can be printed and written as UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Rejection:
    source: str
    video: str | None
    reason: str
    detail: str

    # Paths and text from the input may hold bytes that are not UTF-8: they are shown as \xe9 when written.
    def to_json(self) -> str:
        fields = {"source": self.source, "video": self.video, "reason": self.reason, "detail": self.detail}
        return json.dumps({k: printable(v) if isinstance(v, str) else v for k, v in fields.items()}, ensure_ascii=False)

    def __str__(self) -> str:
        return printable(f"{self.source}: {self.reason}: {self.detail}")


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
    val_ratio: float = 0.0
    summary_room: int = 0  # estimated tokens a summary has room for, next to min_num_frame frames
    long_summaries: list[LongSummary] = field(default_factory=list)
    version_dir: Path | None = None  # the published folder, named by meta.json
    meta: dict[str, MetaEntry] = field(default_factory=dict)  # what meta.json holds

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
        ]
        if self.val_records:
            lines.append(f"val: {self.val_records} records ({self.val_videos} videos)")
        else:
            why = "--val-ratio 0" if self.val_ratio == 0 else "a single video cannot be split"
            lines.append(f"val: none ({why}): meta.json has no {VAL_NAME} entry, training runs without evaluation")
        if self.long_summaries:
            longest = max(self.long_summaries, key=lambda item: item.tokens)
            lines.append(
                f"summaries too long for any training sample: {len(self.long_summaries)} (longest: {longest.source}, "
                f"about {longest.tokens:,} tokens; room for about {self.summary_room:,}); kept, see the warnings"
            )
        if self.short_videos:
            video, decoded, announced = max(self.short_videos, key=lambda item: item[2] - item[1])
            lines.append(
                f"videos that decode fewer frames than their container announces: {len(self.short_videos)} (largest "
                f"gap: {video}, {decoded} of {announced}); the decoded counts are recorded and used"
            )
        lines.append(f"wrote {self.output_dir / META_FILE} (data in {self.version_dir})")
        entries = self.meta.values()
        if any(not Path(path).is_absolute() for entry in entries for path in (entry.root, entry.annotation)):
            if any(entry.paths_relative_to for entry in entries):
                lines.append(
                    f"paths in {META_FILE} are relative to its folder (--portable): the official trainer must be "
                    "started there"
                )
            else:
                lines.append(
                    f"paths in {META_FILE} are relative to the working directory {Path.cwd()}, as the official "
                    "trainer reads them: start the training there (or prepare with --portable for a folder that "
                    "can move)"
                )
        return lines


# --- reading the input --------------------------------------------------------------------------------------------


def _pick_key(available: list[str], wanted: str | None, aliases: tuple[str, ...], what: str, source: Path) -> str:
    by_lower = {key.lower(): key for key in available}
    listed = ", ".join(printable(key) for key in available) or "nothing"
    if wanted is not None:
        if wanted in available:
            return wanted
        if wanted.lower() in by_lower:
            return by_lower[wanted.lower()]
        raise PrepareError(f"{source}: no {wanted!r} field; the records have: {listed}")
    for alias in aliases:
        if alias in by_lower:
            return by_lower[alias]
    option = "--video-key" if what == "video" else "--summary-key"
    raise PrepareError(
        f"{source}: no {what} field found among {listed} (looked for {', '.join(aliases)}); name the column with "
        f"{option}"
    )


def _text(value):
    """JSON numbers become text (a video named 17, a summary "42"); other non-text values are left to validation."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise PrepareError(f"{path}: cannot read it ({error.strerror}); check the file and its permissions") from None


def _decode(data: bytes) -> str:
    """UTF-8 text; bytes that are not UTF-8 become surrogate escapes, for validation to reject the records holding
    them: nothing is guessed or replaced."""
    return data.decode("utf-8-sig", errors="surrogateescape")


def _read_annotation_text(path: Path) -> str:
    data = _read_bytes(path)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise PrepareError(f"{path}: UTF-16 text; save it as UTF-8")
    return _decode(data)


def _csv_error(path: Path, start: int, line: int, error: csv.Error) -> PrepareError:
    quote_rule = 'a quote inside a field is written as two ("")'
    if "unexpected end of data" in str(error):
        return PrepareError(
            f"{path}:{start}: a quoted field opens on this line and is never closed, so lines {start}-{line} would "
            f"be one field; close the quote ({quote_rule})"
        )
    if "expected after" in str(error):
        if line > start:
            return PrepareError(
                f"{path}:{start}: a quoted field opens on this line and runs to line {line}, where a quote ends it "
                f"in the middle; close the quote on line {start} where the field ends ({quote_rule})"
            )
        return PrepareError(
            f"{path}:{line}: a quote ends a quoted field in the middle (only a comma or the end of the line may "
            f"follow a closing quote); {quote_rule}"
        )
    return PrepareError(f"{path}:{line}: not valid CSV ({error}); fix that line")


def _csv_rows(path: Path) -> list[tuple[int, int, list[str]]]:
    """(first line, last line, fields) of every non-blank row of a comma-separated file, the header first.

    Quoting is strict: a stray quote would otherwise merge records into one field or cut a field short, silently.
    """
    reader = csv.reader(io.StringIO(_read_annotation_text(path), newline=""), strict=True, skipinitialspace=True)
    rows, end = [], 0
    # Long fields are the length check's business, not a crash: lift the 128 KiB default while reading.
    field_limit = csv.field_size_limit(2**31 - 1)
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if fields:
                rows.append((start, end, fields))
    except csv.Error as error:
        raise _csv_error(path, end + 1, reader.line_num, error) from None
    finally:
        csv.field_size_limit(field_limit)
    return rows


def _runaway_quote(path: Path, start: int, end: int, fields: list[str]) -> PrepareError | None:
    """A row whose field holds a line that looks like a record of its own: a quote was opened and closed only
    rows later, swallowing the rows between."""
    lines_before = 0
    for value in fields:
        for offset, line in enumerate(value.split("\n")[1:], 1):
            if _RECORD_LIKE_LINE.match(line):
                return PrepareError(
                    f"{path}:{start}: a quoted field opens on this line and runs to line {end}, taking in line "
                    f"{start + lines_before + offset} ({printable(line[:60])!r}) as text; close the quote where the "
                    'field ends (a quote inside a field is written as two: "")'
                )
        lines_before += value.count("\n")
    return None


def _read_csv(path: Path, video_key: str | None, summary_key: str | None) -> tuple[list[RawRecord], list[Rejection]]:
    rows = _csv_rows(path)
    if not rows:
        raise PrepareError(f"{path}: holds no records")
    (_, _, header), rows = rows[0], rows[1:]
    if len(header) == 1:
        for delimiter, name in OTHER_CSV_DELIMITERS.items():
            if delimiter in header[0]:
                raise PrepareError(
                    f"{path}: the header {printable(header[0])!r} is one field: the file is {name}-separated, and "
                    "CSV input must be comma-separated; export it with commas (or as JSONL)"
                )
    if any(_UNDECODABLE.search(name) or "\x00" in name for name in header):
        raise PrepareError(f"{path}: the header {printable(','.join(header))!r} is not UTF-8 text; save it as UTF-8")
    if not rows:
        raise PrepareError(f"{path}: holds no records")
    video_field = _pick_key(header, video_key, VIDEO_KEY_ALIASES, "video", path)
    summary_field = _pick_key(header, summary_key, SUMMARY_KEY_ALIASES, "summary", path)
    records, rejected = [], []
    for start, end, fields in rows:
        runaway = _runaway_quote(path, start, end, fields)
        if runaway is not None:
            raise runaway
        row = dict(zip(header, fields))
        source = f"{path.name}:{start}"
        if any(extra.strip() for extra in fields[len(header) :]):
            cut = printable(row.get(summary_field) or "")
            rejected.append(
                Rejection(
                    source,
                    row.get(video_field),
                    EXTRA_FIELDS,
                    f"{len(fields)} fields where the header has {len(header)}: a comma inside an unquoted field "
                    f"splits it (the {summary_field} would be cut to {cut!r}); put the field in double quotes",
                )
            )
            continue
        records.append(RawRecord(source, row.get(video_field), row.get(summary_field)))
    return records, rejected


def read_annotation_file(
    path: Path, video_key: str | None = None, summary_key: str | None = None
) -> tuple[list[RawRecord], list[Rejection]]:
    """Records of a CSV (with a header row), a JSON list of objects or a JSONL file, and the CSV rows rejected
    while reading (extra fields)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, video_key, summary_key)
    rows: list[tuple[str, dict]] = []
    if suffix == ".jsonl":
        for line_number, line in enumerate(_read_annotation_text(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path.name}:{line_number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise PrepareError(f"{path}:{line_number}: not valid JSON ({error}); fix that line") from None
    elif suffix == ".json":
        try:
            data = json.loads(_read_annotation_text(path))
        except json.JSONDecodeError as error:
            raise PrepareError(f"{path}: not valid JSON ({error}); fix the file or convert it to CSV") from None
        if not isinstance(data, list):
            raise PrepareError(f"{path}: a JSON annotation file must hold a list of records")
        rows = [(f"{path.name}[{index}]", row) for index, row in enumerate(data)]
    else:
        raise PrepareError(f"{path}: unsupported annotation format; use {', '.join(ANNOTATION_SUFFIXES)}")
    for source, row in rows:
        if not isinstance(row, dict):
            raise PrepareError(f"{source}: a record must be an object with a video path and a summary")
    if not rows:
        raise PrepareError(f"{path}: holds no records")
    keys = list(dict.fromkeys(key for _, row in rows for key in row))
    video_field = _pick_key(keys, video_key, VIDEO_KEY_ALIASES, "video", path)
    summary_field = _pick_key(keys, summary_key, SUMMARY_KEY_ALIASES, "summary", path)
    return [RawRecord(source, _text(row.get(video_field)), _text(row.get(summary_field))) for source, row in rows], []


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
            summary = _decode(_read_bytes(summary_file))
            records.append(RawRecord(relative, relative, summary, summary_file.relative_to(folder).as_posix()))
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
        return *read_annotation_file(input_path, video_key, summary_key), input_path.parent
    if not input_path.is_dir():
        raise PrepareError(f"input {input_path} does not exist")
    annotation_files = [input_path / name for name in ANNOTATION_FILE_NAMES if (input_path / name).is_file()]
    if len(annotation_files) > 1:
        raise PrepareError(
            f"{input_path} holds several annotation files ({', '.join(p.name for p in annotation_files)}); "
            "pass the one to use with --input"
        )
    if annotation_files:
        return *read_annotation_file(annotation_files[0], video_key, summary_key), input_path
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


def _text_problem(field_name: str, value: str, fix: str) -> tuple[str, str] | None:
    """(reason, detail) when ``value`` is not clean text. One rule for every input format: bytes that are not UTF-8
    are refused, never repaired by a guess, and so is a NUL character, which no summary holds on purpose."""
    undecodable = _UNDECODABLE.search(value)
    if undecodable:
        byte = ord(undecodable.group()) - 0xDC00
        before = printable(value[: undecodable.start()][-20:])
        return NOT_UTF8, f"the {field_name} is not UTF-8 text (byte 0x{byte:02x} after {before!r}); {fix}"
    if "\x00" in value:
        return NUL_CHARACTER, f"the {field_name} holds a NUL character (at character {value.index(chr(0))}); remove it"
    return None


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
        path_fix = "give the video a UTF-8 name" if record.summary_file else "save the file as UTF-8"
        for field_name, value, fix in (
            ("video path", record.video, path_fix),
            ("summary", record.summary, f"save {record.summary_file or 'the file'} as UTF-8"),
        ):
            problem = _text_problem(field_name, value or "", fix)
            if problem:
                return reject(*problem)
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


def extract_frames(record: ValidRecord, video_root: Path, folder: Path, num_frames: int, backend: str) -> None:
    """Decode ``num_frames`` frames (segment middles) into ``folder/<folder name>_<frame index>.jpg``."""
    indices = get_frame_indices(min(num_frames, record.info.num_frames), record.info.num_frames, "middle")
    try:
        frames = read_frames_at(os.path.join(video_root, record.video), indices, backend=backend)
    except VideoDecodeError as error:
        raise PrepareError(f"{record.source}: extracting frames failed: {error}; nothing was changed") from None
    folder.mkdir(parents=True)
    for index, frame in zip(indices, frames):
        frame.save(folder / f"{folder.name}_{index:06d}.jpg", quality=95)


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
        decoder=record.info.decoder,  # decoders disagree on damaged files: the count holds for this one
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


def _path_for_meta(path: Path, output_dir: Path, *, absolute: bool, portable: bool) -> str:
    """``path`` as meta.json names it: as given (relative to the working directory unless absolute), absolute, or
    relative to ``output_dir`` (``portable``)."""
    if absolute:
        return os.path.abspath(path)
    if not portable:
        return path.as_posix()
    try:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(output_dir))).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return os.path.abspath(path)


def _check_output_dir(output_dir: Path) -> None:
    """Refuse an output folder that cannot be written before any video is decoded."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == output_dir else f"cannot be created: {existing} is a file"
        raise PrepareError(f"output folder {output_dir} {where}; pass another --output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PrepareError(f"output folder {output_dir}: {existing} is not writable; pass another --output-dir")


def _write_error(error: OSError, output_dir: Path) -> PrepareError:
    """One line for a disk that is full, read-only or otherwise failing while writing."""
    where = error.filename or output_dir
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that disk or pass another --output-dir"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "the folder is not writable: pass another --output-dir"
    else:
        fix = "check that disk, or pass another --output-dir"
    reason = error.strerror or type(error).__name__
    return PrepareError(f"cannot write {where}: {reason}; {fix}. The previous outputs in {output_dir} are unchanged")


def estimated_tokens(text: str) -> int:
    return -(-len(text.encode("utf-8", "surrogateescape")) // UTF8_BYTES_PER_TOKEN)


@dataclass(frozen=True)
class LongSummary:
    """A summary that leaves no room for the fewest frames training draws: such a sample can never be built."""

    source: str
    characters: int
    tokens: int  # estimated
    room: int  # estimated tokens left for the summary

    def __str__(self) -> str:
        return (
            f"{self.source}: the summary is about {self.tokens:,} tokens ({self.characters:,} characters), more than "
            f"the about {self.room:,} a sample has room for; training cannot use this record and will skip it: "
            "shorten the summary, or raise max_seq_length (--max_seq_length in training, --max-seq-length here)"
        )


def summary_token_room(max_seq_length: int, frames: int, text: str) -> int:
    """Tokens left for the summary in a sample of ``max_seq_length`` tokens that also holds ``frames`` video frames
    and ``text`` (the system message and the prompt), estimated from UTF-8 bytes (``UTF8_BYTES_PER_TOKEN``)."""
    return max_seq_length - frames * video_frame_token_estimate(SampleOptions.num_image_token) - estimated_tokens(text)


def find_long_summaries(
    records: list[ValidRecord], max_seq_length: int, min_num_frame: int, text: str, max_frames: int | None = None
) -> list[LongSummary]:
    """Records whose summary does not fit next to the fewest frames training draws: ``min_num_frame``, or every
    frame of a shorter video (of its ``max_frames`` extracted ones, with ``--extract-frames``)."""
    long = []
    for record in records:
        frames = min(min_num_frame, record.info.num_frames, max_frames or record.info.num_frames)
        room = summary_token_room(max_seq_length, frames, text)
        if estimated_tokens(record.summary) > room:
            long.append(LongSummary(record.source, len(record.summary), estimated_tokens(record.summary), room))
    return long


def _remove_old_outputs(output_dir: Path, current: str) -> None:
    """Other versions, and what killed runs left (staging folders, temporary meta files). Runs under the lock, so
    none of it belongs to a running prepare; what cannot be removed now, the next run removes."""
    for entry in output_dir.iterdir():
        name = entry.name
        leftover = name.startswith((f".{VERSION_PREFIX}", f".{META_FILE}.")) and name.endswith((".tmp", ".old"))
        old_version = _VERSION_FOLDER.fullmatch(name) is not None and name != current
        if not (leftover or old_version):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _holds(folder: Path, files: dict[str, str]) -> bool:
    """Whether ``folder`` already holds ``files`` (a rerun on the same input): it is then kept as it is."""
    return all(
        (folder / name).is_file() and (folder / name).read_bytes() == text.encode() for name, text in files.items()
    )


def publish(
    output_dir: Path, version: str, files: dict[str, str], meta: dict[str, MetaEntry], write_more=None
) -> None:
    """Make ``meta`` (naming files in the folder ``version``) the outputs of ``output_dir``, as one switch.

    Under the lock: the folder ``version`` is written under a temporary name (``files``, and what
    ``write_more(folder)`` adds) and renamed into place, unless it already holds ``files``; then ``meta.json`` is
    replaced by one rename; then older versions and leftovers are removed. Raises ``PrepareError`` when another run
    holds the lock or the disk fails; until the rename of ``meta.json``, the previous outputs are in use.
    """
    version_dir = output_dir / version
    try:
        with exclusive_lock(output_dir / LOCK_FILE):
            if not _holds(version_dir, files):
                with atomic_directory(version_dir) as staging:
                    if write_more is not None:
                        write_more(staging)
                    for file_name, text in files.items():
                        atomic_write_text(staging / file_name, text)
            write_meta(output_dir / META_FILE, meta)
            _remove_old_outputs(output_dir, version)
    except LockHeldError:
        raise PrepareError(
            f"another prepare run is writing to {output_dir}; wait for it to finish, or pass another --output-dir"
        ) from None
    except OSError as error:
        raise _write_error(error, output_dir) from None


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
    portable: bool = False,
    video_backend: str = "pyav",
    max_seq_length: int = SampleOptions.max_seq_length,
    min_num_frame: int = SampleOptions.min_num_frame,
    progress: bool = True,
) -> PrepareReport:
    """Validate the input, split it and publish ``meta.json`` with its version folder (see the module docstring).

    Raises ``PrepareError`` for unusable input, for any bad record under ``strict``, when nothing is left, and when
    the output cannot be written; the previous outputs are then unchanged.
    """
    if not 0 <= val_ratio < 1:
        raise PrepareError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if not prompt.strip():
        raise PrepareError("the prompt is empty")
    if extract and num_frames < 1:
        raise PrepareError(f"--num-frames must be at least 1, got {num_frames}")
    if absolute_root and portable:
        raise PrepareError("--absolute-root and --portable exclude each other: pass one of them")
    # What a sample holds besides the summary: the system message (the template's without one) and the prompt.
    sample_text = (system_prompt or get_conv_template(SampleOptions.template_name).system_message) + prompt
    if summary_token_room(max_seq_length, min_num_frame, sample_text) <= 0:
        raise PrepareError(
            f"--max-seq-length {max_seq_length} leaves no room for a summary next to {min_num_frame} frames "
            f"({video_frame_token_estimate(SampleOptions.num_image_token)} tokens each): training could build no "
            "sample; pass the training's --max_seq_length and --min_num_frame values"
        )
    input_path, output_dir = Path(input_path), Path(output_dir)
    _check_output_dir(output_dir)
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
    report = PrepareReport(output_dir=output_dir, kept=kept, rejected=rejected, val_ratio=val_ratio)
    report.short_videos = sorted(
        {
            (record.video, record.info.num_frames, record.info.announced_frames)
            for record in kept
            if record.info.announced_frames and record.info.num_frames < record.info.announced_frames
        }
    )
    report.summary_room = summary_token_room(max_seq_length, min_num_frame, sample_text)
    report.long_summaries = find_long_summaries(
        kept, max_seq_length, min_num_frame, sample_text, num_frames if extract else None
    )

    # The version folder's files: paths in them are relative to it or to the video root, never naming the version.
    frame_folders = {r.real_path: f"{FRAMES_DIR}/{_frames_folder_name(r.video)}/" for r in kept} if extract else {}
    files = {REJECTS_FILE: "".join(rejection.to_json() + "\n" for rejection in rejected)}
    splits = {name: records for name, records in ((TRAIN_NAME, train), (VAL_NAME, val)) if records}
    for name, records in splits.items():
        ids = _record_ids(records)
        lines = []
        for position, record in enumerate(records):
            video = frame_folders.get(record.real_path, record.video)
            extracted = min(num_frames, record.info.num_frames) if extract else None
            lines.append(_record_json(record, ids[position], video, prompt, system_prompt, extracted) + "\n")
        files[f"{name}.jsonl"] = "".join(lines)
    version_dir = output_dir / (VERSION_PREFIX + hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12])

    # An empty split gets no entry: the launcher switches evaluation on for a "_val" entry.
    style = dict(absolute=absolute_root, portable=portable)
    meta = {
        name: MetaEntry(
            root=_path_for_meta(version_dir if extract else root, output_dir, **style),
            annotation=_path_for_meta(version_dir / f"{name}.jsonl", output_dir, **style),
            length=len(records),
            max_dynamic_patch=1,
            paths_relative_to=META_FOLDER if portable else None,
        )
        for name, records in splits.items()
    }

    def write_frames(folder: Path) -> None:
        videos = {record.real_path: record for record in kept if record.real_path in frame_folders}
        for real_path, record in tqdm(videos.items(), desc="extracting frames", unit="video", disable=not progress):
            extract_frames(record, root, folder / frame_folders[real_path], num_frames, video_backend)

    publish(output_dir, version_dir.name, files, meta, write_frames)
    report.version_dir, report.meta = version_dir, meta
    report.train_records, report.val_records = len(train), len(val)
    report.train_videos = len({record.real_path for record in train})
    report.val_videos = len({record.real_path for record in val})
    return report
