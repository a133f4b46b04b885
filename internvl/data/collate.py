"""Batching: token sequences into padded rows (one sample per row, or packed), image tiles concatenated, loss weights.

The attention mask comes from each sample's length. Deriving it from the ids (``input_ids != 0`` in the official
collator) masks real tokens whose id happens to be 0 (``!`` in Qwen2) and unmasks padding when the pad id is not 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from internvl.constants import IGNORE_INDEX
from internvl.data.packing import pack_rows

# The official --loss_reduction choices: how much each trained token of a sample with n of them weighs.
LOSS_REDUCTIONS = ("token", "sample", "square")


def token_loss_weight(num_trained_tokens: int, loss_reduction: str) -> float:
    """The weight of each trained token of a sample that has ``num_trained_tokens``: 1 for ``token`` (every token
    counts the same), 1/n for ``sample`` (every sample counts the same), 1/sqrt(n) for ``square`` (in between)."""
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got {loss_reduction!r}")
    if num_trained_tokens == 0:
        return 0.0
    if loss_reduction == "sample":
        return 1.0 / num_trained_tokens
    if loss_reduction == "square":
        return num_trained_tokens**-0.5
    return 1.0


@dataclass
class InternVLDataCollator:
    """Samples (``input_ids``, ``labels``, ``pixel_values``, ``image_flags``) -> one batch.

    ``input_ids`` / ``labels`` / ``loss_weight`` / ``position_ids`` become ``[rows, Lmax]``, right-padded with
    ``pad_token_id`` / ``IGNORE_INDEX`` / 0 / 0. Without ``max_packed_tokens`` each sample is a row, with an
    ``attention_mask`` that is 1 on its tokens; with it, samples share rows of at most that many tokens and carry no
    attention mask (see ``internvl.data.packing``). ``position_ids`` count 0, 1, ... within each sample.
    ``loss_weight`` is the weight of each trained token (``token_loss_weight``, 0 where nothing is trained), the
    model's loss is their weighted mean. ``pixel_values`` ``[sum T, 3, S, S]`` and ``image_flags`` ``[sum T]`` are
    concatenated in the order the samples appear in the rows.
    """

    pad_token_id: int
    loss_reduction: str = "token"
    max_packed_tokens: int | None = None

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError("InternVLDataCollator needs the tokenizer's pad_token_id, which is None")
        token_loss_weight(0, self.loss_reduction)  # an unknown reduction fails here, not at the first batch

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(sample["input_ids"]) for sample in features]
        if self.max_packed_tokens is None:
            rows = [[index] for index in range(len(features))]
        else:
            rows = pack_rows(lengths, self.max_packed_tokens)
        num_rows, row_length = len(rows), max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((num_rows, row_length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((num_rows, row_length), IGNORE_INDEX, dtype=torch.long)
        loss_weight = torch.zeros((num_rows, row_length), dtype=torch.float32)
        position_ids = torch.zeros((num_rows, row_length), dtype=torch.long)
        attention_mask = torch.zeros((num_rows, row_length), dtype=torch.long)
        for row, indices in enumerate(rows):
            start = 0
            for index in indices:
                sample, end = features[index], start + lengths[index]
                input_ids[row, start:end] = sample["input_ids"]
                labels[row, start:end] = sample["labels"]
                labels[row, start] = IGNORE_INDEX  # nothing predicts a sample's first token
                trained = int((sample["labels"][1:] != IGNORE_INDEX).sum())
                loss_weight[row, start:end] = token_loss_weight(trained, self.loss_reduction)
                position_ids[row, start:end] = torch.arange(lengths[index])
                start = end
            attention_mask[row, :start] = 1
        order = [index for indices in rows for index in indices]
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "loss_weight": loss_weight * (labels != IGNORE_INDEX),
            "position_ids": position_ids,
            "pixel_values": torch.cat([features[index]["pixel_values"] for index in order]),
            "image_flags": torch.cat([features[index]["image_flags"] for index in order]),
        }
        if self.max_packed_tokens is None:
            batch["attention_mask"] = attention_mask
        return batch
