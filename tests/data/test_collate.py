"""The collator pads with the pad id and builds the attention mask from lengths, not from token values."""

from __future__ import annotations

import pytest
import torch

from internvl.constants import IGNORE_INDEX
from internvl.data import InternVLDataCollator


def _sample(ids: list[int], tiles: int, flag: int = 1) -> dict:
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor([IGNORE_INDEX] + ids[1:]),
        "pixel_values": torch.full((tiles, 3, 8, 8), float(len(ids))),
        "image_flags": torch.full((tiles,), flag),
    }


def test_padding_and_mask_from_lengths():
    pad_id = 151643
    # Token id 0 is a real token ("!" in Qwen2): it must stay visible to attention.
    batch = InternVLDataCollator(pad_token_id=pad_id)([_sample([5, 0, 0, 7], 2), _sample([0, 3], 1, flag=0)])
    assert batch["input_ids"].tolist() == [[5, 0, 0, 7], [0, 3, pad_id, pad_id]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 0, 0, 7], [IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # Tiles are concatenated in sample order.
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [4.0, 4.0, 2.0]
    assert batch["image_flags"].tolist() == [1, 1, 0]


def test_pad_token_that_also_appears_in_text_is_not_masked():
    # Some tokenizers pad with a token that can occur in real text (e.g. <|endoftext|>).
    batch = InternVLDataCollator(pad_token_id=9)([_sample([9, 9, 1], 1), _sample([2], 1)])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_missing_pad_id_is_an_error():
    with pytest.raises(ValueError, match="pad_token_id"):
        InternVLDataCollator(pad_token_id=None)
