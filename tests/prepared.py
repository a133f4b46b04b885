"""Where the files of a prepared data folder are: read from its meta.json, as training reads them."""

from __future__ import annotations

from pathlib import Path

TRAIN = "video_summary_dataset_train"
VAL = "video_summary_dataset_val"


def annotation_path(data_dir: Path, dataset: str = TRAIN) -> Path:
    """The JSONL file ``data_dir/meta.json`` names for ``dataset`` (prepare writes it inside a version folder)."""
    from internvl.data.dataset import load_meta

    (spec,) = (spec for spec in load_meta(Path(data_dir) / "meta.json") if spec.name == dataset)
    return spec.annotation
