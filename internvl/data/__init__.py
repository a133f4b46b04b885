"""The data pipeline: raw videos -> official-format JSONL (``prepare``) -> samples (``dataset``) -> batches
(``collate``). See docs/DATA.md.

The root exports the training-time pipeline only; ``internvl.data.prepare`` and ``internvl.data.demo`` (which
needs a video encoder) are imported from their modules."""

from internvl.data.collate import InternVLDataCollator
from internvl.data.dataset import build_datasets
from internvl.data.tiling import build_transform, dynamic_preprocess
from internvl.data.tokenize import preprocess_conversation
from internvl.data.video import get_frame_indices, probe_video, read_video_frames

__all__ = [
    "InternVLDataCollator",
    "build_datasets",
    "build_transform",
    "dynamic_preprocess",
    "get_frame_indices",
    "preprocess_conversation",
    "probe_video",
    "read_video_frames",
]
