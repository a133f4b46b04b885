"""Packing samples into rows (first-fit decreasing), sample lengths read back from a batch, and packed training
computing what unpacked training does."""

from __future__ import annotations

import pytest
import torch

from internvl.data.collate import InternVLDataCollator
from internvl.data.packing import pack_rows, packed_token_mask, sample_lengths


def test_rows_hold_whole_samples_within_the_limit():
    lengths = [5, 9, 2, 7, 3, 3, 10, 1]
    rows = pack_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 40 tokens in rows of 10: as few as possible
    assert rows == pack_rows(lengths, 10)  # deterministic


def test_rows_leave_the_least_padding():
    # Rows as long as the longest sample: [9], [5, 3], 18 tokens once padded. Rows of up to 17: one row, no padding.
    assert pack_rows([9, 5, 3], 9) == [[0], [1, 2]]
    assert pack_rows([9, 5, 3], 17) == [[0, 1, 2]]
    # Filling rows up to the limit is not always the least padding: rows of 10 give [6, 4] + [5, 3] (2 x 10 tokens),
    # rows of 9 give [6, 3] + [5, 4] (2 x 9).
    assert pack_rows([6, 5, 4, 3], 10) == [[0, 3], [1, 2]]
    # Never more tokens than one row per sample.
    for lengths, limit in [([10, 5, 4], 12), ([3, 3, 3], 5), ([6, 1, 1, 1, 1, 1, 1], 7), ([4, 4, 4, 4, 1], 9)]:
        rows = pack_rows(lengths, limit)
        assert len(rows) * max(sum(lengths[i] for i in row) for row in rows) <= len(lengths) * max(lengths)


def test_a_sample_longer_than_a_row_is_an_error():
    with pytest.raises(ValueError, match="at least --max_seq_length"):
        pack_rows([3, 12], 10)


def test_sample_lengths_of_packed_and_unpacked_batches():
    unpacked = {"attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "position_ids": torch.zeros(2, 3)}
    assert sample_lengths(unpacked) == [3, 2]
    # Padding has position 0: a one-token sequence, not a sample.
    packed = {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]])}
    assert sample_lengths(packed) == [3, 2, 7]
    assert packed_token_mask(packed["position_ids"]).int().tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]


# --- packed training computes what unpacked training does ---------------------------------------------------------


def loss_and_lora_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch, return_logits=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reduction", ["token", "square"])
def test_packed_loss_and_gradients_equal_unpacked(tiny_lora_model, tiny_tokenizer, tiny_video_samples, reduction):
    samples = tiny_video_samples
    lengths = [len(sample["input_ids"]) for sample in samples]
    unpacked = InternVLDataCollator(tiny_tokenizer.pad_token_id, loss_reduction=reduction)(samples)
    packed = InternVLDataCollator(tiny_tokenizer.pad_token_id, loss_reduction=reduction,
                                  max_packed_tokens=max(lengths) + 300)(samples)  # fmt: skip
    assert packed["input_ids"].shape[0] < len(samples)  # several samples do share rows
    assert sample_lengths(packed) != lengths and sorted(sample_lengths(packed)) == sorted(lengths)
    loss, grads = loss_and_lora_grads(tiny_lora_model, unpacked)
    packed_loss, packed_grads = loss_and_lora_grads(tiny_lora_model, packed)
    assert grads and grads.keys() == packed_grads.keys()
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def test_attention_does_not_cross_samples_in_a_row(tiny_lora_model, tiny_tokenizer, tiny_video_samples):
    # Without the restarting positions (one sequence per row) the samples would see each other, and the loss moves.
    samples = tiny_video_samples
    packed = InternVLDataCollator(tiny_tokenizer.pad_token_id, max_packed_tokens=4096)(samples)
    assert packed["input_ids"].shape[0] == 1
    one_sequence = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).unsqueeze(0)}
    unpacked = InternVLDataCollator(tiny_tokenizer.pad_token_id)(samples)
    with torch.no_grad():
        reference = tiny_lora_model(**unpacked, return_logits=False).loss
        assert torch.allclose(tiny_lora_model(**packed, return_logits=False).loss, reference, atol=1e-5)
        assert not torch.allclose(tiny_lora_model(**one_sequence, return_logits=False).loss, reference, atol=1e-3)
