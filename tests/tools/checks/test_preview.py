"""The first-sample preview: the rendered prompt marks exactly the supervised tokens, the counts are the sample's,
and the contact sheet shows the very tiles the vision tower gets."""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

from internvl.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl.data import build_datasets
from internvl.data.tiling import build_transform
from internvl.model.configuration import InternVLChatConfig
from internvl.tools.checks.preview import (
    SUPERVISED_END,
    SUPERVISED_START,
    frames_as_images,
    preview_first_sample,
    render_tokens,
)

MARKED = re.compile(re.escape(SUPERVISED_START) + "(.*?)" + re.escape(SUPERVISED_END), re.S)
DATA_OPTIONS = dict(min_num_frame=3, max_num_frame=3, max_seq_length=4096)


def test_the_marks_hold_exactly_the_supervised_tokens(tiny_tokenizer):
    """Two answers of a two-turn conversation, each marked on its own; nothing else is marked."""
    pieces = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello there.<|im_end|>",
              "\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n", "A red circle.<|im_end|>",
              "\n"]  # fmt: skip
    ids, labels = [], []
    for index, piece in enumerate(pieces):
        piece_ids = tiny_tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        labels += piece_ids if index % 2 else [IGNORE_INDEX] * len(piece_ids)
    text = render_tokens(torch.tensor(ids), torch.tensor(labels), tiny_tokenizer)
    assert MARKED.findall(text) == ["Hello there.<|im_end|>", "A red circle.<|im_end|>"]
    assert MARKED.sub(r"\1", text) == "".join(pieces)


def test_preview_of_the_first_training_sample(good_setup, tiny_tokenizer, tmp_path):
    meta = good_setup / "data" / "meta.json"
    config = InternVLChatConfig.from_pretrained(good_setup / "model")
    preview = preview_first_sample(meta, tiny_tokenizer, num_image_token=config.num_image_token,
                                   dataset_options=DATA_OPTIONS, contact_sheet=tmp_path / "frames.png")  # fmt: skip

    # The same sample training builds first.
    train, _ = build_datasets(meta, tiny_tokenizer, num_image_token=config.num_image_token, **DATA_OPTIONS)
    sample = train[0]
    supervised = sample["labels"] != IGNORE_INDEX
    assert MARKED.findall(preview.text) == [tiny_tokenizer.decode(sample["input_ids"][supervised])]
    assert preview.text.count(f"<IMG_CONTEXT x {config.num_image_token}>") == 3
    assert IMG_CONTEXT_TOKEN not in preview.text  # every run shortened
    assert (preview.num_tokens, preview.num_supervised_tokens, preview.num_frames) == (
        len(sample["input_ids"]), int(supervised.sum()), 3
    )
    assert preview.num_image_tokens == 3 * config.num_image_token
    report = preview.format()
    assert report.startswith(f"First training sample: {train.datasets[0].describe(0)}\n")
    assert (f"{preview.num_tokens} tokens of max_seq_length 4096: {3 * config.num_image_token} image tokens (3 "
            f"frames x {config.num_image_token})") in report  # fmt: skip

    with Image.open(preview.contact_sheet) as sheet:
        assert sheet.format == "PNG" and sheet.width > 3 * 100


def test_the_contact_sheet_shows_what_the_transform_made():
    """Un-normalizing the tiles gives back the frame (448 px in, no resize: only rounding is lost)."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(448, 448, 3), dtype=np.uint8)
    for normalize_type in ("imagenet", "clip", "siglip"):
        tile = build_transform(False, 448, normalize_type=normalize_type)(Image.fromarray(frame))
        (image,) = frames_as_images(tile[None], normalize_type)
        assert image.dtype == np.uint8 and np.abs(image.astype(int) - frame).max() <= 1
