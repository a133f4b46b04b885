"""GPU-memory and disk estimates: the InternVL3-8B sizes, how the estimate moves with each setting (layers left out of
gradient checkpointing included), and its distance from the GPU measurements of docs/BENCHMARKS.md and issue 11."""

from __future__ import annotations

import pytest

from internvl.constants import INTERNVL3_8B_CONFIG
from internvl.model.configuration import InternVLChatConfig
from internvl.model.dims import ModelDims
from internvl.tools.resource_estimates import GIB, estimate_disk_usage, estimate_gpu_memory, max_uncheckpointed_layers

# One GPU, ZeRO-2, micro-batch 1 of 4,490 tokens (16 frames, 77 supervised): the 1 x GA 16 rows measured on
# 1 x H200 on 2026-12-01 (issue 11): peak allocated 10.3 GiB with every layer checkpointed, 41.2 GiB with none.
ONE_GPU_ZERO2 = dict(lora_rank=32, micro_batch_size=1, max_seq_length=4490, max_num_frame=16, answer_tokens=77,
                     num_gpus=1, zero_stage=2, offload_param=False, offload_optimizer=False)  # fmt: skip


@pytest.fixture(scope="module")
def internvl3_8b() -> ModelDims:
    return ModelDims.from_config(InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG))


def test_internvl3_8b_sizes(internvl3_8b):
    # Official numbers: 7.9B parameters (model card); LoRA r=16 on the seven projections adds 1,441,792
    # parameters per layer over 28 layers.
    assert 7.85e9 < internvl3_8b.total_params < 8.0e9
    assert internvl3_8b.lora_params(16) == 28 * 1_441_792
    assert internvl3_8b.lora_params(32) == 2 * internvl3_8b.lora_params(16)


def _estimate(dims, **overrides):
    settings = dict(lora_rank=32, micro_batch_size=1, max_seq_length=8192, max_num_frame=32, answer_tokens=256,
                    num_gpus=2, zero_stage=3, offload_param=True, offload_optimizer=True)  # fmt: skip
    settings.update(overrides)
    return estimate_gpu_memory(dims, **settings)


def test_memory_estimate_behaves(internvl3_8b):
    base = _estimate(internvl3_8b)
    # Loading puts the whole 4-bit model on each GPU: a 4-bit Qwen2.5-7B measures 5.2 GiB, plus the bf16 ViT.
    assert 5.4 < base.load_peak / GIB < 6.2
    assert _estimate(internvl3_8b, micro_batch_size=2).peak > base.peak
    assert _estimate(internvl3_8b, max_seq_length=4096, max_num_frame=16).peak < base.peak
    assert _estimate(internvl3_8b, offload_param=False, offload_optimizer=False).train_peak > base.train_peak
    no_offload = dict(offload_param=False, offload_optimizer=False)
    zero3 = _estimate(internvl3_8b, **no_offload).train_peak
    assert _estimate(internvl3_8b, num_gpus=4, **no_offload).train_peak < zero3
    assert _estimate(internvl3_8b, zero_stage=2, **no_offload).train_peak > zero3
    assert _estimate(internvl3_8b, answer_tokens=1024).logits == 4 * base.logits
    assert base.frames_per_sample == 32 and _estimate(internvl3_8b, max_seq_length=2048).frames_per_sample == 8


# Peak PyTorch-allocated GiB per GPU measured on H200s (docs/BENCHMARKS.md, 2026-11-28): InternVL3-8B shape, NF4 +
# LoRA r32, batch 4 x 4,490 tokens (16 frames, 77 supervised tokens per sample).
MEASURED_PEAK_ALLOCATED_GIB = [
    (dict(num_gpus=2, zero_stage=3, offload_param=True, offload_optimizer=True), 15.29),
    (dict(num_gpus=1, zero_stage=3, offload_param=True, offload_optimizer=True), 15.12),
    (dict(num_gpus=2, zero_stage=3, offload_param=False, offload_optimizer=False), 18.57),
    (dict(num_gpus=2, zero_stage=2, offload_param=False, offload_optimizer=False), 16.88),
]


@pytest.mark.parametrize("deepspeed, measured_gib", MEASURED_PEAK_ALLOCATED_GIB)
def test_memory_estimate_is_close_to_the_gpu_measurements(internvl3_8b, deepspeed, measured_gib):
    estimate = _estimate(internvl3_8b, micro_batch_size=4, max_seq_length=4490, max_num_frame=16, answer_tokens=77,
                         **deepspeed)  # fmt: skip
    # Within 20%, and never more than 10% below: an estimate that is too low would pass a GPU that is too small.
    assert 0.9 * measured_gib < estimate.peak / GIB < 1.2 * measured_gib


def test_disk_estimate(internvl3_8b):
    one = estimate_disk_usage(internvl3_8b, lora_rank=32, save_total_limit=1)
    three = estimate_disk_usage(internvl3_8b, lora_rank=32, save_total_limit=3)
    assert three.total - one.total == 2 * one.checkpoint
    assert one.merged_model == 2 * internvl3_8b.total_params  # bf16
    assert 14 < one.merged_model / GIB < 16  # the official release is 15.9 GB


def test_each_uncheckpointed_layer_adds_what_its_forward_keeps(internvl3_8b):
    d = internvl3_8b
    tokens = ONE_GPU_ZERO2["micro_batch_size"] * ONE_GPU_ZERO2["max_seq_length"]
    kept = 18 * d.hidden_size + 2 * d.kv_width + 4.5 * d.intermediate_size  # bf16 elements per token
    peaks = [estimate_gpu_memory(d, uncheckpointed_layers=n, **ONE_GPU_ZERO2).train_peak for n in range(7, 29, 7)]
    steps = {later - earlier for earlier, later in zip(peaks, peaks[1:])}
    # Per layer, its activations come in (bf16) and its checkpointed input goes.
    assert steps == {7 * 2 * tokens * (kept - d.hidden_size)}


def test_layers_left_out_are_freed_before_the_recompute(internvl3_8b):
    # The last layers keep their activations through the logits and their own backward; the recompute of the
    # checkpointed layers comes after, so one left-out layer costs less than its activations when the recompute
    # was the largest phase.
    none, one = (estimate_gpu_memory(internvl3_8b, uncheckpointed_layers=n, **ONE_GPU_ZERO2) for n in (0, 1))
    assert max(none.phases(), key=none.phases().get) == "layer recompute"
    assert one.train_peak - none.train_peak < one.uncheckpointed_activations
    assert one.phases()["logits"] == one.uncheckpointed_activations + max(one.logits, one.layer_gradients)


# Peak PyTorch-allocated GiB measured on 1 x H200 on 2026-12-02 (docs/BENCHMARKS.md), batch 4 x 4,490 tokens, with
# --use_liger True: (ZeRO config, layers left out of checkpointing, measured).
MEASURED_WITH_LIGER_GIB = [
    (dict(zero_stage=2, offload_param=False, offload_optimizer=False), 0, 16.29),
    (dict(zero_stage=2, offload_param=False, offload_optimizer=False), 4, 27.10),
    (dict(zero_stage=3, offload_param=True, offload_optimizer=True), 5, 29.21),
    (dict(zero_stage=3, offload_param=True, offload_optimizer=True), 1, 14.08),
]


@pytest.mark.parametrize("deepspeed, layers, measured_gib", MEASURED_WITH_LIGER_GIB)
def test_estimate_with_liger_and_layers_left_out_is_close_to_the_measurements(
    internvl3_8b, deepspeed, layers, measured_gib
):
    settings = dict(lora_rank=32, micro_batch_size=4, max_seq_length=4490, max_num_frame=16, answer_tokens=77,
                    num_gpus=1, uncheckpointed_layers=layers, **deepspeed)  # fmt: skip
    estimate = estimate_gpu_memory(internvl3_8b, fused_kernels=True, **settings)
    assert 0.9 * measured_gib < estimate.peak / GIB < 1.2 * measured_gib
    if layers:  # Liger's kernels keep less per layer
        assert estimate.peak < estimate_gpu_memory(internvl3_8b, fused_kernels=False, **settings).peak


@pytest.mark.parametrize("layers, measured_gib", [(0, 10.3), (28, 41.2)])
def test_estimate_with_and_without_checkpointing_is_close_to_the_measurements(internvl3_8b, layers, measured_gib):
    estimate = estimate_gpu_memory(internvl3_8b, uncheckpointed_layers=layers, **ONE_GPU_ZERO2)
    assert 0.9 * measured_gib < estimate.peak / GIB < 1.2 * measured_gib


def test_uncheckpointed_layers_must_exist(internvl3_8b):
    with pytest.raises(ValueError, match=r"uncheckpointed_layers must be in \[0, 28\], got 29"):
        estimate_gpu_memory(internvl3_8b, uncheckpointed_layers=29, **ONE_GPU_ZERO2)


def test_the_most_layers_that_fit_a_budget(internvl3_8b):
    def peak(layers):
        return estimate_gpu_memory(internvl3_8b, uncheckpointed_layers=layers, **ONE_GPU_ZERO2).peak

    assert max_uncheckpointed_layers(internvl3_8b, peak(10), **ONE_GPU_ZERO2) == 10
    assert max_uncheckpointed_layers(internvl3_8b, peak(11) - 1, **ONE_GPU_ZERO2) == 10
    assert max_uncheckpointed_layers(internvl3_8b, peak(28), **ONE_GPU_ZERO2) == 28
    # Leaving the last layer out costs nothing here (its activations are gone before the recompute, the largest
    # phase, and its checkpointed input is not kept twice), so it fits wherever full checkpointing does.
    assert peak(1) <= peak(0)
    assert max_uncheckpointed_layers(internvl3_8b, min(peak(0), peak(1)) - 1, **ONE_GPU_ZERO2) == 0
    assert "10 un-checkpointed layers" in estimate_gpu_memory(internvl3_8b, uncheckpointed_layers=10,
                                                              **ONE_GPU_ZERO2).summary()  # fmt: skip
