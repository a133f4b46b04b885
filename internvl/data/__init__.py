"""The data pipeline: raw videos -> official-format JSONL (``prepare``) -> records (``records``) -> samples
(``dataset``) -> batches (``collate``). See docs/DATA.md.

The root exports the training-time pipeline only; ``internvl.data.prepare`` and ``internvl.data.demo`` (which
needs a video encoder) are imported from their modules."""

from internvl.data.collate import InternVLDataCollator
from internvl.data.dataset import build_datasets
from internvl.data.records import Record, RecordError, Role, Turn, parse_record, read_records
from internvl.data.tiling import build_transform, dynamic_preprocess
from internvl.data.tokenize import preprocess_conversation
from internvl.data.video import get_frame_indices, probe_video, read_video_frames

__all__ = [
    "InternVLDataCollator",
    "Record",
    "RecordError",
    "Role",
    "Turn",
    "build_datasets",
    "build_transform",
    "dynamic_preprocess",
    "get_frame_indices",
    "parse_record",
    "preprocess_conversation",
    "probe_video",
    "read_records",
    "read_video_frames",
]
