"""The FLOP count behind MFU reads the model's sizes from ``ModelDims``, as the memory estimate does; both are checked
against the parameters counted on InternVL3-8B built on the meta device (``tests/model/test_dims.py``)."""

from __future__ import annotations

import pytest
import torch

from internvl.bench.flops import BatchCounts, training_flops
from internvl.constants import IGNORE_INDEX, INTERNVL3_8B_CONFIG
from internvl.data.collate import InternVLDataCollator
from internvl.model.configuration import InternVLChatConfig
from internvl.tools.resource_estimates import estimate_disk_usage, estimate_gpu_memory, nf4_bytes_per_param
from tests.model.test_dims import LORA_RANK, internvl3_8b_counts, internvl3_8b_dims


def _flops(counts: BatchCounts, recompute: bool = True) -> float:
    dims = internvl3_8b_dims()
    return training_flops(dims, counts, lora_rank=LORA_RANK, recomputed_layers=dims.num_layers if recompute else 0)


def test_flop_count_and_memory_estimate_read_the_same_parameter_counts():
    dims, counted = internvl3_8b_dims(), internvl3_8b_counts()
    projections, lora, total = counted["llm_projections"], counted["lora"], counted["total"]

    one_token = BatchCounts(samples=1, tokens=1)
    assert _flops(one_token, recompute=True) == 6 * projections + 8 * lora
    assert _flops(one_token, recompute=False) == 4 * projections + 6 * lora

    estimate = estimate_gpu_memory(
        dims, lora_rank=LORA_RANK, micro_batch_size=1, max_seq_length=4096, max_num_frame=16, answer_tokens=64,
        num_gpus=1, zero_stage=0, offload_param=False, offload_optimizer=False,
    )  # fmt: skip
    # Loading: the projections in NF4, every other parameter in bf16. LoRA: bf16 weight and gradient, fp32 Adam.
    assert estimate.load_peak == int(projections * nf4_bytes_per_param(True) + 2 * (total - projections))
    assert estimate.lora_states == 16 * lora
    assert estimate_disk_usage(dims, lora_rank=LORA_RANK, save_total_limit=1).merged_model == 2 * total


def test_a_frame_costs_one_forward_of_the_vision_tower_and_projector():
    config = InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG)
    vision, counted = config.vision_config, internvl3_8b_counts()
    tokens = counted["vision_tokens_per_tile"]
    attention = 4 * vision.hidden_size * tokens**2 * vision.num_hidden_layers
    expected = 2 * counted["vision_linear"] * tokens + attention + 2 * counted["projector_linear"] * 256
    assert _flops(BatchCounts(frames=1)) == expected


def test_attention_and_lm_head_terms():
    llm = InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG).llm_config
    # Causal attention over the lower triangle, per layer: forward, backward (twice), recomputed forward.
    assert _flops(BatchCounts(squared_lengths=1)) == 8 * llm.hidden_size * llm.num_hidden_layers
    assert _flops(BatchCounts(squared_lengths=1), recompute=False) == 6 * llm.hidden_size * llm.num_hidden_layers
    # LM head at supervised positions only: forward and backward to its input.
    assert _flops(BatchCounts(supervised_tokens=1)) == 4 * llm.vocab_size * llm.hidden_size


def test_the_documented_figures_for_the_16_frame_samples():
    # docs/BENCHMARKS.md: 4,490 tokens (77 supervised) and 16 frames per sample give 4.61e10 FLOPs per token,
    # 6% of it in the vision tower, about 0.74 TFLOP per frame.
    sample = _flops(BatchCounts(samples=1, tokens=4490, squared_lengths=4490**2, supervised_tokens=77, frames=16))
    frames = _flops(BatchCounts(frames=16))
    assert sample / 4490 == pytest.approx(4.61e10, rel=0.005)
    assert frames / sample == pytest.approx(0.06, abs=0.005)
    assert frames / 16 == pytest.approx(0.74e12, rel=0.01)


def test_batch_counts_read_lengths_supervision_and_frames_from_a_collated_batch():
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], [IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX]])
    counts = BatchCounts()
    counts.add({"attention_mask": attention_mask, "labels": labels, "image_flags": torch.tensor([1, 1, 0])})
    assert (counts.samples, counts.tokens, counts.squared_lengths) == (2, 8, 5**2 + 3**2)
    # Positions whose next token is trained: labels from the second position on.
    assert (counts.supervised_tokens, counts.frames) == (5, 2)
    counts += counts
    assert (counts.samples, counts.tokens, counts.frames) == (4, 16, 4)


def test_batch_counts_are_the_same_packed_or_not(tiny_tokenizer, tiny_video_samples):
    counts = {}
    for max_packed_tokens in (None, 4096):
        batch = InternVLDataCollator(tiny_tokenizer.pad_token_id, max_packed_tokens=max_packed_tokens)(
            tiny_video_samples
        )
        counts[max_packed_tokens] = BatchCounts()
        counts[max_packed_tokens].add(batch)
    lengths = [len(sample["input_ids"]) for sample in tiny_video_samples]
    assert counts[None] == counts[4096]
    assert (counts[None].samples, counts[None].tokens) == (4, sum(lengths))
    assert counts[None].squared_lengths == sum(n * n for n in lengths)


def test_layers_left_out_of_checkpointing_are_not_recomputed():
    dims = internvl3_8b_dims()
    sample = BatchCounts(samples=1, tokens=4490, squared_lengths=4490**2, supervised_tokens=77, frames=16)

    def flops(layers):
        return training_flops(dims, sample, lora_rank=LORA_RANK, recomputed_layers=layers)

    # One recomputed forward of the LLM (projections, LoRA, attention) is spread evenly over the layers.
    assert flops(7) - flops(0) == pytest.approx((flops(28) - flops(0)) / 4)
    with pytest.raises(ValueError, match=r"recomputed_layers must be in \[0, 28\]"):
        flops(29)
