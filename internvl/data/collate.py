"""Batching: right-pad token sequences, concatenate image tiles.

The attention mask comes from each sample's length. Deriving it from the ids (``input_ids != 0`` in the official
collator) masks real tokens whose id happens to be 0 (``!`` in Qwen2) and unmasks padding when the pad id is not 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from internvl.constants import IGNORE_INDEX


@dataclass
class InternVLDataCollator:
    """Samples (``input_ids``, ``labels``, ``pixel_values``, ``image_flags``) -> one batch.

    ``input_ids`` / ``labels`` become ``[B, Lmax]``, right-padded with ``pad_token_id`` / ``IGNORE_INDEX``;
    ``attention_mask`` is 1 on each sample's own tokens; ``position_ids`` count 0, 1, ... along every row;
    ``pixel_values`` ``[sum T, 3, S, S]`` and ``image_flags`` ``[sum T]`` are concatenated in sample order.
    """

    pad_token_id: int

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError("InternVLDataCollator needs the tokenizer's pad_token_id, which is None")

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(sample["input_ids"]) for sample in features]
        batch_size, max_length = len(features), max(lengths)
        input_ids = torch.full((batch_size, max_length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, max_length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, max_length), dtype=torch.long)
        for row, (sample, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = sample["input_ids"]
            labels[row, :length] = sample["labels"]
            attention_mask[row, :length] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": torch.arange(max_length, dtype=torch.long).expand(batch_size, max_length).clone(),
            "pixel_values": torch.cat([sample["pixel_values"] for sample in features]),
            "image_flags": torch.cat([sample["image_flags"] for sample in features]),
        }
