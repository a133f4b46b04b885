"""``meta.json`` -> training and evaluation datasets of InternVL samples.

Every record type of the official format works: text only, one image, several images, and video (a video file,
a GIF or a folder of frames). Each sample is (see docs/ARCHITECTURE.md):

- ``input_ids``, ``labels``: LongTensor ``[L]``, ``labels`` = ``IGNORE_INDEX`` where nothing is trained;
- ``pixel_values``: ``[T, 3, S, S]`` image tiles or video frames (text samples carry one white tile);
- ``image_flags``: LongTensor ``[T]``, 0 for that white tile.

Video samples draw T frames in ``[min_num_frame, max_num_frame]`` (never more than the video holds), one tile per
frame, each announced by a ``Frame-N: <image>`` line, and then drop frames until the sample fits
``max_seq_length``: an image span is never cut. Records come from ``internvl.data.records``; samples that cannot be
built (a record it refuses, a corrupt file, too long) are replaced by others and counted (``bad_samples``); a training
set that is mostly unreadable stops with an error, an evaluation set never stops the run (see ``SupervisedDataset``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from internvl.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from internvl.conversation import video_frame_prompt
from internvl.data.files import atomic_write_text
from internvl.data.records import Record, RecordError, Role, Turn, read_records
from internvl.data.tiling import build_transform, dynamic_preprocess
from internvl.data.tokenize import SampleTooLongError, image_token_ids, preprocess_conversation, truncate_sample
from internvl.data.video import VIDEO_BACKENDS, probe_video, read_video_frames, recorded_frame_count

logger = logging.getLogger(__name__)

EVAL_SUFFIX = "_val"
META_KEYS = ("root", "annotation", "data_augment", "max_dynamic_patch", "repeat_time", "length")
# Our one key beside the official ones (the official trainer reads the entries' keys by name and ignores others):
# with it, the entry's relative paths start from the meta file's folder instead of the working directory.
PATHS_RELATIVE_TO = "paths_relative_to"
META_FOLDER = "meta_folder"
_MARK = f'"{PATHS_RELATIVE_TO}": "{META_FOLDER}"'  # as it reads in the file, for messages
# Bad-sample policy: one unreadable file is skipped; a dataset that is mostly unreadable is an error.
MAX_CONSECUTIVE_FAILURES = 10
FAILURE_WINDOW = 50
MAX_FAILURE_RATE = 0.5
TEXT_ONLY_DUMMY_SIZE = 224


def video_frame_token_estimate(num_image_token: int) -> int:
    """Tokens one video frame takes: its image span (``<img>``, the context tokens, ``</img>``) and its
    ``Frame-N: `` line."""
    return num_image_token + 2 + 6


class DatasetHealthError(RuntimeError):
    """Too many samples in a row (or in a recent window) could not be built."""


class NoEvaluationSampleError(RuntimeError):
    """Not one sample of the evaluation set can be built: the evaluation is skipped, the training goes on."""


@dataclass(frozen=True)
class DatasetSpec:
    """One ``meta.json`` entry, with paths resolved."""

    name: str
    root: Path
    annotation: Path
    data_augment: bool
    max_dynamic_patch: int | None
    repeat_time: float

    @property
    def is_eval(self) -> bool:
        return self.name.endswith(EVAL_SUFFIX)


def _resolve(meta_path: Path, entry: dict, key: str, where: str) -> Path:
    """The path ``entry[key]`` names, by the one rule of ``load_meta``. The other folder is only looked in to say
    what to fix."""
    value = entry[key]
    path = Path(value).expanduser()
    if path.is_absolute():
        if path.exists():
            return path
        raise FileNotFoundError(f"{where}: {key} {value!r} does not exist; fix the path")
    meta_folder, working_directory = meta_path.parent.absolute(), Path.cwd()
    if entry.get(PATHS_RELATIVE_TO) == META_FOLDER:
        if (meta_folder / path).exists():
            return meta_folder / path
        base = f"the meta file's folder {meta_folder}, where this entry's relative paths start ({_MARK})"
        fix = "fix the path"
        if (working_directory / path).exists():
            fix = f'it is in the working directory: remove "{PATHS_RELATIVE_TO}" from the entry'
    else:
        if (working_directory / path).exists():
            return working_directory / path
        base = f"the working directory {working_directory}, where relative paths start (as in the official trainer)"
        fix = "run from the folder they are relative to (the one prepare ran in), or make them absolute"
        if (meta_folder / path).exists():
            fix = f"it is in the meta file's folder: add {_MARK} to the entry, or prepare again with --portable"
    raise FileNotFoundError(f"{where}: {key} {value!r} not found in {base}; {fix}")


@dataclass(frozen=True)
class MetaEntry:
    """One ``meta.json`` entry as ``write_meta`` writes it: the official keys, paths as written (absolute, or relative
    as ``load_meta`` reads them: to the working directory, or to the meta file's folder with
    ``paths_relative_to=META_FOLDER``)."""

    root: str
    annotation: str
    length: int  # records in the annotation file; informational
    data_augment: bool = False
    max_dynamic_patch: int | None = None  # None: not written, the training's --max_dynamic_patch applies
    repeat_time: float = 1
    paths_relative_to: str | None = None  # META_FOLDER, or None: the working directory

    def to_json(self) -> dict:
        keys = (*META_KEYS, PATHS_RELATIVE_TO)
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


def _check_meta_entry(entry, where: str) -> None:
    """What ``load_meta`` refuses in an entry (and so ``write_meta`` never writes), as a ``ValueError``."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with keys {', '.join(META_KEYS)}")
    for key in ("root", "annotation"):
        if not isinstance(entry.get(key), str):
            raise ValueError(f"{where}: missing the {key!r} path")
    if not entry["annotation"].endswith(".jsonl"):
        raise ValueError(f"{where}: 'annotation' must be a .jsonl file, got {entry['annotation']!r}")
    repeat_time = entry.get("repeat_time", 1)
    if not isinstance(repeat_time, (int, float)) or repeat_time <= 0:
        raise ValueError(f"{where}: 'repeat_time' must be a positive number, got {repeat_time!r}")
    if repeat_time > 1 and repeat_time != int(repeat_time):
        raise ValueError(f"{where}: a 'repeat_time' above 1 must be a whole number, got {repeat_time}")
    max_patch = entry.get("max_dynamic_patch")
    if max_patch is not None and (not isinstance(max_patch, int) or max_patch < 1):
        raise ValueError(f"{where}: 'max_dynamic_patch' must be a positive integer, got {max_patch!r}")
    if entry.get(PATHS_RELATIVE_TO, META_FOLDER) != META_FOLDER:
        raise ValueError(
            f'{where}: "{PATHS_RELATIVE_TO}" must be "{META_FOLDER}" (relative paths start from the meta file\'s '
            f"folder), or be left out (they start from the working directory), got {entry[PATHS_RELATIVE_TO]!r}"
        )


def write_meta(meta_path: str | os.PathLike, entries: Mapping[str, MetaEntry]) -> None:
    """Write ``meta.json`` (atomically) with ``entries`` under their dataset names, in the official key order; an
    entry ``load_meta`` would refuse is a ``ValueError`` and nothing is written."""
    meta_path = Path(meta_path)
    if not entries:
        raise ValueError(f"{meta_path}: a meta file needs at least one dataset")
    meta = {name: entry.to_json() for name, entry in entries.items()}
    for name, entry in meta.items():
        _check_meta_entry(entry, f"{meta_path}: dataset {name!r}")
    atomic_write_text(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def load_meta(meta_path: str | os.PathLike) -> list[DatasetSpec]:
    """Read and check ``meta.json``: ``{name: {root, annotation, data_augment, max_dynamic_patch, repeat_time,
    length}}`` (``length`` is informational and ``max_dynamic_patch`` optional).

    Paths, one rule: an absolute path is used as it is; a relative one starts from the working directory, as in the
    official trainer, unless its entry has ``"paths_relative_to": "meta_folder"`` (what prepare's ``--portable``
    writes): then it starts from the meta file's folder. Only that one place is looked in, so a path never resolves
    to a different file by accident; a path not found there is a ``FileNotFoundError`` naming the entry, the
    folder and the fix."""
    meta_path = Path(meta_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"meta file {meta_path} not found; create it with scripts/prepare_internvl3_finetuning.py"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{meta_path}: expected a JSON object {{dataset name: settings}}, with at least one entry")
    specs = []
    for name, entry in meta.items():
        where = f"{meta_path}: dataset {name!r}"
        _check_meta_entry(entry, where)
        root = _resolve(meta_path, entry, "root", where)
        if not root.is_dir():
            raise ValueError(
                f"{where}: root {entry['root']!r} is a file, not a folder; root is the folder the records' media "
                "paths start from"
            )
        specs.append(
            DatasetSpec(
                name=name,
                root=root,
                annotation=_resolve(meta_path, entry, "annotation", where),
                data_augment=bool(entry.get("data_augment", False)),
                max_dynamic_patch=entry.get("max_dynamic_patch"),
                repeat_time=entry.get("repeat_time", 1),
            )
        )
    return specs


def apply_repeat_time(records: list, repeat_time: float) -> list:
    """Below 1, keep the first ``int(N * repeat_time)`` records (the official behaviour); above 1, repeat them."""
    if repeat_time < 1:
        return records[: int(len(records) * repeat_time)]
    return records * int(repeat_time)


_VIDEO_PLACEHOLDER_LINE = re.compile(re.escape(VIDEO_PLACEHOLDER) + r"\n?")


def _with_placeholder(turns: tuple[Turn, ...], placeholder: str) -> tuple[Turn, ...]:
    """Prepend ``placeholder + '\\n'`` to the first user turn when no user turn has it (official behaviour)."""
    user_turns = [index for index, turn in enumerate(turns) if turn.role is Role.HUMAN]  # parse_record: at least one
    if any(placeholder in turns[index].value for index in user_turns):
        return turns
    first = user_turns[0]
    return (*turns[:first], replace(turns[first], value=placeholder + "\n" + turns[first].value), *turns[first + 1 :])


def _expand_video(turns: tuple[Turn, ...], num_frames: int) -> tuple[Turn, ...]:
    found = sum(turn.value.count(VIDEO_PLACEHOLDER) for turn in turns if turn.role is Role.HUMAN)
    if found != 1:
        raise ValueError(f"a video record needs exactly one {VIDEO_PLACEHOLDER} in its user turns, found {found}")
    frames = video_frame_prompt(num_frames)
    expanded = []
    for turn in turns:
        if turn.role is Role.HUMAN:
            turn = replace(turn, value=_VIDEO_PLACEHOLDER_LINE.sub(lambda _: frames, turn.value))
        expanded.append(turn)
    return tuple(expanded)


@dataclass(frozen=True)
class SampleOptions:
    """How records become samples: the keyword arguments of ``build_datasets`` (the training flags of the same
    names; ``template_name`` is ``--conv_style``, ``image_size`` is ``--force_image_size``)."""

    template_name: str = "internvl2_5"
    num_image_token: int = 256
    image_size: int = 448
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    min_num_frame: int = 8
    max_num_frame: int = 32
    max_seq_length: int = 8192
    normalize_type: str = "imagenet"
    pad2square: bool = False
    video_backend: str = "pyav"

    def __post_init__(self):
        if not 1 <= self.min_num_frame <= self.max_num_frame:
            raise ValueError(
                f"need 1 <= min_num_frame <= max_num_frame, got {self.min_num_frame} and {self.max_num_frame}"
            )
        if self.video_backend not in VIDEO_BACKENDS:
            raise ValueError(f"video_backend must be one of {VIDEO_BACKENDS}, got {self.video_backend!r}")


class LazySupervisedDataset(torch.utils.data.Dataset):
    """The records of one ``meta.json`` entry, turned into samples on access. A record ``parse_record`` refuses
    stays in its place as its ``RecordError``, raised when that sample is drawn (and so skipped and counted)."""

    def __init__(self, spec: DatasetSpec, tokenizer, options: SampleOptions, *, frame_sampling: str):
        self.spec = spec
        self.tokenizer = tokenizer
        self.options = options
        self.frame_sampling = frame_sampling
        # The entry's own max_dynamic_patch overrides the global one.
        self.max_dynamic_patch = spec.max_dynamic_patch or options.max_dynamic_patch
        self.transform = build_transform(
            spec.data_augment, options.image_size, options.pad2square, options.normalize_type
        )
        self.img_end_id = image_token_ids(tokenizer)[2]
        self.records: list[Record | RecordError] = apply_repeat_time(read_records(spec.annotation), spec.repeat_time)
        self._lengths: list[int] | None = None
        self._frame_counts: dict[str, tuple[int, float | None]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def media_path(self, relative_path: str) -> str:
        # os.path.join keeps a frame folder's trailing "/".
        return os.path.join(self.spec.root, relative_path)

    def describe(self, index: int) -> str:
        """Where a record comes from, for logs: ``annotation.jsonl:12 (video clip.mp4)``."""
        record = self.records[index]
        if isinstance(record, RecordError):
            media = "unusable record"
        elif record.video:
            media = f"video {record.video}"
        else:
            media = f"image {', '.join(record.images)}" if record.images else "text"
        return f"{self.spec.name} {record.source} ({media})"

    # -- lengths ----------------------------------------------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        """Token-length estimates for length-grouped batching: a record's ``length`` field if it has one, else
        the tokenized text plus the image tokens it will most likely get. Computed on first use."""
        if self._lengths is None:
            # A record's own length, 0 for an unusable one (replaced when drawn), else an estimate (None until then).
            lengths = [0 if isinstance(record, RecordError) else record.length for record in self.records]
            pending = [index for index, length in enumerate(lengths) if length is None]
            if pending:
                texts = ["\n".join(turn.value for turn in self.records[i].conversations) for i in pending]
                for index, ids in zip(pending, self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
                    estimate = len(ids) + self._image_estimate(self.records[index])
                    lengths[index] = min(self.options.max_seq_length, estimate)
            self._lengths = lengths
        return self._lengths

    def _image_estimate(self, record: Record) -> int:
        per_tile = self.options.num_image_token + 2
        if record.images:
            return per_tile * len(record.images) * (self.max_dynamic_patch + int(self.options.use_thumbnail))
        if record.video:
            frames = (self.options.min_num_frame + self.options.max_num_frame) // 2
            if record.decoded_frames:
                frames = min(frames, record.decoded_frames)
            return video_frame_token_estimate(self.options.num_image_token) * frames
        return 0

    # -- samples ----------------------------------------------------------------------------------------------------

    def get_sample(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Build sample ``index``; raises if the record cannot become a valid sample."""
        record = self.records[index]
        if isinstance(record, RecordError):
            raise record.with_traceback(None)  # the same error object every time: no traceback piling up
        if record.images:
            return self._image_sample(record)
        if record.video:
            return self._video_sample(record, rng)
        return self._text_sample(record)

    def _tokenize(self, turns, num_image_token_list, text_only=False) -> dict[str, torch.Tensor]:
        return preprocess_conversation(
            turns,
            self.tokenizer,
            num_image_token_list,
            template_name=self.options.template_name,
            text_only=text_only,
        )

    def _sample(self, turns, tiles: list[Image.Image], tiles_per_image: list[int], text_only=False):
        tokens = self._tokenize(turns, [self.options.num_image_token * n for n in tiles_per_image], text_only)
        input_ids, labels = truncate_sample(
            tokens["input_ids"], tokens["labels"], self.options.max_seq_length, self.img_end_id
        )
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": torch.stack([self.transform(tile) for tile in tiles]),
            "image_flags": torch.full((len(tiles),), 0 if text_only else 1, dtype=torch.long),
        }

    def _load_image(self, relative_path: str) -> Image.Image:
        with Image.open(self.media_path(relative_path)) as image:
            return image.convert("RGB")

    def _tiles(self, image: Image.Image, max_num: int) -> list[Image.Image]:
        if not self.options.dynamic_image_size:
            return [image]
        options = self.options
        return dynamic_preprocess(image, options.min_dynamic_patch, max_num, options.image_size, options.use_thumbnail)

    def _image_sample(self, record: Record):
        paths = record.images
        turns = record.conversations
        if len(paths) == 1:
            turns = _with_placeholder(turns, IMAGE_PLACEHOLDER)
        max_num = max(1, self.max_dynamic_patch // len(paths))
        tiles, tiles_per_image = [], []
        for path in paths:
            image_tiles = self._tiles(self._load_image(path), max_num)
            tiles += image_tiles
            tiles_per_image.append(len(image_tiles))
        return self._sample(turns, tiles, tiles_per_image)

    def _text_sample(self, record: Record):
        white = Image.new("RGB", (TEXT_ONLY_DUMMY_SIZE, TEXT_ONLY_DUMMY_SIZE), (255, 255, 255))
        return self._sample(record.conversations, [white], [], text_only=True)

    def _video_length(self, record: Record, path: str) -> tuple[int, float | None]:
        """(frames that decode, fps): from the prepare metadata when it was counted by this decoder, else from the
        folder listing or a probe (cached)."""
        recorded = recorded_frame_count(path, self.options.video_backend, record.decoded_frames, record.decoder)
        if recorded is not None:
            return recorded, record.fps
        if path not in self._frame_counts:
            info = probe_video(path, self.options.video_backend)
            self._frame_counts[path] = (info.num_frames, info.fps)
        return self._frame_counts[path]

    def _video_sample(self, record: Record, rng: np.random.Generator):
        path = self.media_path(record.video)
        turns = _with_placeholder(record.conversations, VIDEO_PLACEHOLDER)
        vlen, fps = self._video_length(record, path)
        fewest = min(self.options.min_num_frame, vlen)
        num_frames = min(int(rng.integers(self.options.min_num_frame, self.options.max_num_frame + 1)), vlen)
        # Drop frames until the sample fits: every frame is a whole image span, so nothing is ever cut inside one.
        while True:
            tokens = self._tokenize(_expand_video(turns, num_frames), [self.options.num_image_token] * num_frames)
            if len(tokens["input_ids"]) <= self.options.max_seq_length:
                break
            if num_frames <= fewest:
                raise SampleTooLongError(
                    f"{len(tokens['input_ids'])} tokens with {num_frames} frames > max_seq_length "
                    f"{self.options.max_seq_length}; shorten the text or raise max_seq_length"
                )
            num_frames -= 1
        frames = read_video_frames(
            path,
            num_frames,
            self.frame_sampling,
            backend=self.options.video_backend,
            clip=record.clip,
            num_decoded_frames=vlen,
            fps=fps,
            rng=rng,
        )
        return {
            "input_ids": tokens["input_ids"],
            "labels": tokens["labels"],
            "pixel_values": torch.stack([self.transform(frame) for frame in frames]),
            "image_flags": torch.ones(num_frames, dtype=torch.long),
        }


class _SharedCounter:
    """An integer shared with DataLoader worker processes, so the trainer sees the workers' counts."""

    def __init__(self):
        self._value = multiprocessing.Value("q", 0)

    def increment(self) -> None:
        with self._value.get_lock():
            self._value.value += 1

    @property
    def value(self) -> int:
        return self._value.value


class SupervisedDataset(torch.utils.data.ConcatDataset):
    """Several ``LazySupervisedDataset`` as one, with the bad-sample policy.

    A sample that cannot be built is logged with its source, counted in ``bad_samples`` and replaced by another
    one (random for training, the next ones in order for evaluation, so evaluation stays deterministic).
    In training, ``MAX_CONSECUTIVE_FAILURES`` failures in a row, or more than ``MAX_FAILURE_RATE`` of the last
    ``FAILURE_WINDOW`` attempts, raise ``DatasetHealthError``. In evaluation a sample that failed is remembered
    (per process) and not built again, and only a set of which no sample builds raises, with
    ``NoEvaluationSampleError``, which the trainer turns into a skipped evaluation: an evaluation set never ends a
    training run, and its failures repeat identically at every evaluation.
    """

    def __init__(self, datasets: list[LazySupervisedDataset], *, is_eval: bool, seed: int = 0):
        super().__init__(datasets)
        self.is_eval = is_eval
        self.seed = seed
        self._bad_samples = _SharedCounter()
        self._recent: deque[bool] = deque(maxlen=FAILURE_WINDOW)  # per process: True = failed
        self._consecutive_failures = 0
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple | None = None
        self._unbuildable: set[int] = set()  # evaluation samples known to fail, in this process

    @property
    def lengths(self) -> list[int]:
        return [length for dataset in self.datasets for length in dataset.lengths]

    @property
    def bad_samples(self) -> int:
        """Samples skipped so far, over all DataLoader workers."""
        return self._bad_samples.value

    def _locate(self, index: int) -> tuple[LazySupervisedDataset, int]:
        dataset_index = int(np.searchsorted(self.cumulative_sizes, index, side="right"))
        start = self.cumulative_sizes[dataset_index - 1] if dataset_index else 0
        return self.datasets[dataset_index], index - start

    def _training_rng(self) -> np.random.Generator:
        # One generator per process, seeded from torch's seed: DataLoader workers get a fresh torch seed each
        # epoch, so frame draws differ across epochs and workers but repeat for a fixed trainer seed.
        owner = (os.getpid(), getattr(torch.utils.data.get_worker_info(), "id", None))
        if self._rng_owner != owner:
            self._rng = np.random.default_rng([self.seed, torch.initial_seed() % 2**63])
            self._rng_owner = owner
        return self._rng

    def _sample_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index]) if self.is_eval else self._training_rng()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if self.is_eval:
            return self._evaluation_sample(index)
        attempt = index
        while True:
            dataset, local_index = self._locate(attempt)
            try:
                sample = dataset.get_sample(local_index, self._sample_rng(attempt))
            except Exception as error:
                self._record_failure(dataset.describe(local_index), error)
                attempt = int(self._training_rng().integers(len(self)))
                continue
            self._recent.append(False)
            self._consecutive_failures = 0
            return sample

    def _evaluation_sample(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index``, or the next one in order that builds."""
        for offset in range(len(self)):
            attempt = (index + offset) % len(self)
            if attempt in self._unbuildable:
                self._bad_samples.increment()
                continue
            dataset, local_index = self._locate(attempt)
            try:
                return dataset.get_sample(local_index, self._sample_rng(attempt))
            except Exception as error:
                self._unbuildable.add(attempt)
                self._bad_samples.increment()
                logger.warning("skipping bad evaluation sample %s: %s: %s", dataset.describe(local_index),
                               type(error).__name__, error)
        raise NoEvaluationSampleError(
            f"none of the {len(self)} evaluation samples can be built (each is named in a warning above); fix or "
            "remove those records of the '_val' dataset"
        )

    def _record_failure(self, source: str, error: Exception) -> None:
        self._bad_samples.increment()
        self._recent.append(True)
        self._consecutive_failures += 1
        logger.warning("skipping bad sample %s: %s: %s", source, type(error).__name__, error)
        failures = sum(self._recent)
        if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES or (
            len(self._recent) == FAILURE_WINDOW and failures > MAX_FAILURE_RATE * FAILURE_WINDOW
        ):
            raise DatasetHealthError(
                f"{failures} of the last {len(self._recent)} samples could not be built "
                f"({self._consecutive_failures} in a row); the latest, {source}, failed with "
                f"{type(error).__name__}: {error}. Check the paths and roots in meta.json, or rerun "
                "scripts/prepare_internvl3_finetuning.py to validate the data"
            ) from error


def has_eval_records(meta_path: str | os.PathLike) -> bool:
    """Whether ``build_datasets`` returns an evaluation set: a ``_val`` entry with at least one record (empty entries
    are left out). False when meta.json or an evaluation annotation cannot be read: training reports that itself."""
    try:
        return any(
            apply_repeat_time(read_records(spec.annotation), spec.repeat_time)
            for spec in load_meta(meta_path)
            if spec.is_eval
        )
    except (OSError, ValueError):
        return False


def build_datasets(
    meta_path: str | os.PathLike, tokenizer, *, seed: int = 0, **options
) -> tuple[SupervisedDataset, SupervisedDataset | None]:
    """``(train_dataset, eval_dataset_or_None)`` from ``meta.json``; ``options`` are the fields of ``SampleOptions``.

    Entries whose name ends in ``_val`` form the evaluation set, with frames sampled at segment middles; the rest
    form the training set, with random frames. Empty entries are left out; no training entry is an error.
    """
    sample_options = SampleOptions(**options)
    train_parts, eval_parts = [], []
    for spec in load_meta(meta_path):
        frame_sampling = "middle" if spec.is_eval else "rand"
        dataset = LazySupervisedDataset(spec, tokenizer, sample_options, frame_sampling=frame_sampling)
        logger.info("dataset %s: %d samples from %s", spec.name, len(dataset), spec.annotation)
        if len(dataset):
            (eval_parts if spec.is_eval else train_parts).append(dataset)
    if not train_parts:
        raise ValueError(
            f"{meta_path}: no training samples (every entry is empty or ends in {EVAL_SUFFIX!r}, which marks "
            "evaluation data)"
        )
    train = SupervisedDataset(train_parts, is_eval=False, seed=seed)
    evaluation = SupervisedDataset(eval_parts, is_eval=True, seed=seed) if eval_parts else None
    return train, evaluation
