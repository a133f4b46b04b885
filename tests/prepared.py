"""Where the files of a prepared data folder are: read from its meta.json, as training reads them."""

from __future__ import annotations

import json
from pathlib import Path

TRAIN = "video_summary_dataset_train"
VAL = "video_summary_dataset_val"


def annotation_path(data_dir: Path, dataset: str = TRAIN) -> Path:
    """The JSONL file ``data_dir/meta.json`` names for ``dataset`` (prepare writes it inside a version folder)."""
    entry = json.loads((Path(data_dir) / "meta.json").read_text())[dataset]
    return Path(data_dir) / entry["annotation"]
