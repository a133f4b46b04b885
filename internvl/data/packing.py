"""Packing (``--use_packed_ds True``): the samples of a batch share rows of at most ``max_packed_tokens`` tokens.

A batch of ``per_device_train_batch_size`` samples is laid into rows (first-fit decreasing, at the row length that
leaves the least padding) instead of one row per sample padded to the longest sample. Attention stays within
each sample: packed batches carry no ``attention_mask``, and ``position_ids`` restart at 0 with every sample. From
those position ids transformers builds a block-diagonal causal mask for SDPA and eager attention (the recipe loads
SDPA); its flash-attention path detects packing the same way, but only in a batch of one row. Padding tokens have
position 0, so each is a sequence of its own.

The loss does not change: every sample keeps its own tokens, positions, targets and loss weights, and the first
token of each sample is never a target (in an unpacked row nothing predicts position 0 either; in a packed row the
previous sample's last token would).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most ``max_tokens`` tokens, with the least padding once the rows are
    padded to the longest: first-fit decreasing at ``max_tokens`` and at each row length, from the longest sample
    up, that could hold the batch in 1, 2, ... rows. At the longest sample's length there are never more rows than
    samples, so a packed batch never holds more tokens than the unpacked one. Deterministic; a sample longer than
    ``max_tokens`` is an error."""
    longest, total = max(lengths), sum(lengths)
    if longest > max_tokens:
        raise ValueError(
            f"a sample of {longest} tokens does not fit a packed row of max_packed_tokens {max_tokens}; "
            "--max_packed_tokens must be at least --max_seq_length"
        )
    # Row lengths to try: what would hold the batch in 1, 2, ... rows, and the limit itself.
    candidates = {max(longest, -(-total // num_rows)) for num_rows in range(1, len(lengths) + 1)} | {max_tokens}
    best, best_size = [], None
    # From short rows to long ones: on a tie the shorter rows win (less attention work per row).
    for row_length in sorted(c for c in candidates if c <= max_tokens):
        rows = _first_fit_decreasing(lengths, row_length)
        size = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if best_size is None or size < best_size:
            best, best_size = rows, size
    return best


def _first_fit_decreasing(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if lengths[index] <= free), None)
        if row is None:
            rows.append([index])
            room.append(row_length - lengths[index])
        else:
            rows[row].append(index)
            room[row] -= lengths[index]
    return rows


def packed_token_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """True on the sample tokens of packed rows, False on padding: a padding token has position 0 and is not
    followed by position 1 (a sample is never one token long)."""
    following = torch.cat([position_ids[:, 1:], torch.zeros_like(position_ids[:, :1])], dim=1)
    return (position_ids != 0) | (following == 1)


def sample_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """The token count of every sample in a batch, packed or not (padding excluded)."""
    if "attention_mask" in batch:
        return [int(n) for n in batch["attention_mask"].sum(dim=1)]
    lengths = []
    for positions in batch["position_ids"].tolist():
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        # A padding token is a one-token sequence; a sample is never one token long.
        lengths += [end - start for start, end in zip(starts, starts[1:]) if end - start > 1]
    return lengths
