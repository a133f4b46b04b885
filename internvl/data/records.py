"""One record of the official InternVL JSONL format, read and checked in one place.

Each line of an annotation file is an object::

    {"id": "clip_a", "video": "clips/a.mp4",
     "conversations": [{"from": "system", "value": "..."},        # optional, first turn only
                       {"from": "human", "value": "<video>\\nSummarize the video."},
                       {"from": "gpt", "value": "A red circle moves from left to right."}],
     "decoded_frames": 96, "decoder": "pyav", "fps": 24.0, "clip": [2.0, 6.5], "length": 4500}

with ``image`` (one path or a list of paths) instead of ``video`` for images, and neither for text. ``video`` is a
file, a GIF or a frame folder (ending in ``/``); ``decoded_frames`` and ``fps`` are what ``prepare`` measured
(``decoder``: what counted the frames, as decoders disagree on damaged files), ``clip`` a ``[start_s, end_s]`` range
to sample in, ``length`` a token count for length-grouped batching. Other keys are allowed and ignored.

``parse_record`` turns one such object into a ``Record`` or raises ``RecordError`` naming ``file:line`` and why;
``read_records`` does it for a whole file. Training, the setup check and evaluation all read records through
them, so they accept and refuse the same records.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Role(str, enum.Enum):
    """The ``from`` of a turn, as the official format spells it."""

    SYSTEM = "system"
    HUMAN = "human"
    GPT = "gpt"


@dataclass(frozen=True)
class Turn:
    role: Role
    value: str


class RecordError(ValueError):
    """A record that training, the setup check and evaluation all refuse: ``file:line: reason``."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str):
        super().__init__(path, line, reason)  # the arguments, so that the error pickles (DataLoader workers)
        self.path, self.line, self.reason = Path(path), line, reason

    @property
    def source(self) -> str:
        """``annotation.jsonl:12``: the file name and line, for logs."""
        return f"{self.path.name}:{self.line}"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class Record:
    path: Path  # the annotation file
    line: int  # 1-based line in it
    conversations: tuple[Turn, ...]
    images: tuple[str, ...] = ()  # paths relative to the dataset's root
    video: str | None = None  # a path relative to the dataset's root
    id: str | None = None
    length: int | None = None  # token count given by the record, for length-grouped batching
    decoded_frames: int | None = None  # frames that decode, as measured by prepare
    decoder: str | None = None  # what counted them (see internvl.data.video.recorded_frame_count)
    fps: float | None = None
    clip: tuple[float, float] | None = None  # (start_s, end_s): sample inside this range only

    @property
    def source(self) -> str:
        """``annotation.jsonl:12``: the file name and line, for logs and as the fallback id."""
        return f"{self.path.name}:{self.line}"

    @property
    def media(self) -> tuple[str, ...]:
        """The referenced image paths, or the video path, or nothing for a text record."""
        return self.images or ((self.video,) if self.video else ())

    @property
    def answers(self) -> list[str]:
        return [turn.value for turn in self.conversations if turn.role is Role.GPT]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _turns(raw: Any) -> tuple[Turn, ...] | str:
    """The turns, or why they are unusable."""
    roles = ", ".join(repr(role.value) for role in Role)
    if not isinstance(raw, list):
        return f"'conversations' must be a list of turns, got {str(raw)[:80]}"
    turns = []
    for position, turn in enumerate(raw):
        role = turn.get("from") if isinstance(turn, dict) else None
        if role not in {r.value for r in Role} or not isinstance(turn.get("value"), str):
            return f"each turn needs 'from' in {roles} and a string 'value', got {str(turn)[:80]}"
        if role == Role.SYSTEM and position > 0:
            return "a 'system' turn may only come first"
        turns.append(Turn(Role(role), turn["value"]))
    if not any(turn.role is Role.HUMAN for turn in turns):
        return "no 'human' turn"
    if not any(turn.role is Role.GPT and turn.value.strip() for turn in turns):
        return "no non-empty 'gpt' turn (the answer)"
    return tuple(turns)


def parse_record(raw: Any, path: str | os.PathLike, line: int) -> Record:
    """``raw`` (one decoded JSONL line) as a ``Record``; ``RecordError`` naming ``path:line`` if it is unusable.

    An empty ``image`` / ``video`` (``""``, ``[]``, ``null``) counts as absent, as in the official code.
    """

    def error(reason: str) -> RecordError:
        return RecordError(path, line, reason)

    if not isinstance(raw, dict) or "conversations" not in raw:
        raise error("a record must be an object with a 'conversations' list")
    turns = _turns(raw["conversations"])
    if isinstance(turns, str):
        raise error(turns)

    image, video = raw.get("image") or (), raw.get("video") or None
    images = (image,) if isinstance(image, str) else image
    if not isinstance(images, (list, tuple)) or not all(isinstance(p, str) and p for p in images):
        raise error(f"'image' must be a path or a list of paths, got {image!r}")
    if video is not None and not isinstance(video, str):
        raise error(f"'video' must be a path string, got {video!r}")
    if images and video:
        raise error("a record has either 'image' or 'video', not both")

    record_id, length, fps, clip = raw.get("id"), raw.get("length"), raw.get("fps"), raw.get("clip")
    decoded_frames, decoder = raw.get("decoded_frames"), raw.get("decoder")
    if record_id is not None and not (isinstance(record_id, (str, int)) and not isinstance(record_id, bool)):
        raise error(f"'id' must be a string or an integer, got {record_id!r}")
    if length is not None and not _is_count(length, 0):
        raise error(f"'length' must be a token count (an integer >= 0), got {length!r}")
    if decoded_frames is not None and not _is_count(decoded_frames, 1):
        raise error(f"'decoded_frames' must be a positive integer, got {decoded_frames!r}")
    if decoder is not None and not isinstance(decoder, str):
        raise error(f"'decoder' must be the name of a video decoder, got {decoder!r}")
    if fps is not None and not (_is_number(fps) and fps > 0):
        raise error(f"'fps' must be a positive number, got {fps!r}")
    if clip is not None:
        valid = isinstance(clip, list) and len(clip) == 2 and all(map(_is_number, clip)) and 0 <= clip[0] < clip[1]
        if not valid:
            raise error(f"'clip' must be [start_s, end_s] with 0 <= start_s < end_s, got {clip!r}")
    return Record(
        path=Path(path),
        line=line,
        conversations=turns,
        images=tuple(images),
        video=video,
        id=None if record_id is None else str(record_id),
        length=length,
        decoded_frames=decoded_frames,
        decoder=decoder,
        fps=None if fps is None else float(fps),
        clip=None if clip is None else (float(clip[0]), float(clip[1])),
    )


def read_records(path: str | os.PathLike) -> list[Record | RecordError]:
    """Every record of a JSONL file in order: a ``Record``, or the ``RecordError`` saying why that one is unusable.

    A line that is not JSON at all raises ``RecordError``: the file is damaged (cut or concatenated), and where one
    record ends is no longer known. Blank lines are skipped.
    """
    path = Path(path)
    entries: list[Record | RecordError] = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(path, line_number, f"not valid JSON ({error})") from None
            try:
                entries.append(parse_record(raw, path, line_number))
            except RecordError as error:
                entries.append(error)
    return entries
