"""The collator pads with the pad id, builds the attention mask from lengths (not from token values), weights the
trained tokens by the official loss reductions, and packs samples into shared rows."""

from __future__ import annotations

import pytest
import torch

from internvl.constants import IGNORE_INDEX
from internvl.data import InternVLDataCollator
from internvl.data.collate import token_loss_weight


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
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
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


def _trained(n_prompt: int, n_answer: int, first_id: int) -> dict:
    ids = list(range(first_id, first_id + n_prompt + n_answer))
    sample = _sample(ids, 1)
    sample["labels"][:n_prompt] = IGNORE_INDEX
    return sample


@pytest.mark.parametrize("reduction, weights", [("token", (1.0, 1.0)), ("sample", (1 / 4, 1 / 1)),
                                                ("square", (1 / 2, 1.0))])  # fmt: skip
def test_loss_weights_follow_the_official_reductions(reduction, weights):
    # 4 and 1 trained tokens: "sample" gives each sample a total weight of 1, "square" a total of sqrt(n).
    batch = InternVLDataCollator(pad_token_id=0, loss_reduction=reduction)([_trained(3, 4, 10), _trained(2, 1, 20)])
    trained = batch["labels"] != IGNORE_INDEX
    assert batch["loss_weight"][~trained].eq(0).all()
    assert batch["loss_weight"][0, trained[0]].tolist() == [pytest.approx(weights[0])] * 4
    assert batch["loss_weight"][1, trained[1]].tolist() == [pytest.approx(weights[1])]


def test_unknown_loss_reduction_is_an_error():
    with pytest.raises(ValueError, match="token, sample, square"):
        InternVLDataCollator(pad_token_id=0, loss_reduction="mean")
    assert token_loss_weight(0, "sample") == 0.0  # nothing trained, nothing weighed


def test_packed_rows_keep_each_sample_apart():
    samples = [_trained(2, 3, 10), _trained(2, 2, 20), _trained(1, 2, 30), _trained(2, 5, 40)]  # 5, 4, 3, 7 tokens
    batch = InternVLDataCollator(pad_token_id=99, loss_reduction="sample", max_packed_tokens=8)(samples)
    assert "attention_mask" not in batch  # transformers derives the block-diagonal mask from position_ids
    # Rows of 7 (the longest sample) leave the least padding: [7], [5], [4, 3]; shorter rows padded with position 0.
    assert batch["input_ids"].tolist() == [
        [40, 41, 42, 43, 44, 45, 46],
        [10, 11, 12, 13, 14, 99, 99],
        [20, 21, 22, 23, 30, 31, 32],
    ]
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 5, 6],
        [0, 1, 2, 3, 4, 0, 0],
        [0, 1, 2, 3, 0, 1, 2],
    ]
    # A sample's first token is never a target, even where the previous sample's last token would predict it.
    assert batch["labels"][2].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 22, 23, IGNORE_INDEX, 31, 32]
    # Each sample keeps its own weights: 1/n of its trained tokens.
    assert batch["loss_weight"][2].tolist() == pytest.approx([0, 0, 1 / 2, 1 / 2, 0, 1 / 2, 1 / 2])
    # Tiles follow the samples' order in the rows.
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [7.0, 5.0, 4.0, 3.0]
