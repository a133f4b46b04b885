"""The profiled step's time by category: hand-made traces in torch.profiler's Chrome format with known answers, the
module labels on the tiny model, and a real profile of a tiny LoRA training step on the CPU."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from internvl.bench import profiling
from internvl.bench.profiling import (
    ATTENTION,
    CATEGORIES,
    DATA_WAIT,
    DATA_WAIT_SCOPE,
    DEEPSPEED,
    DEQUANT,
    ELEMENTWISE,
    GEMM,
    IDLE,
    LORA,
    STEP_SCOPE,
    StepProfiler,
    analyze_trace,
    label_modules,
    module_label,
    profile_markdown,
)

HOST, MAIN, BACKWARD_THREAD, STREAM, SIDE_STREAM = 100, 1, 2, 7, 8


def op(name, ts, dur, tid=MAIN, cat="cpu_op", **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": HOST, "tid": tid, "ts": ts, "dur": dur, "args": args}


def launch(ts, correlation, tid=MAIN):
    return op("cudaLaunchKernel", ts, 1, tid=tid, cat="cuda_runtime", correlation=correlation)


def kernel(name, ts, dur, correlation, stream=STREAM, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
            "args": {"correlation": correlation, "stream": stream}}  # fmt: skip


def seconds(summary, category):
    return summary["categories"][category]["seconds"]


def test_gpu_time_is_split_by_the_category_of_the_launching_op_and_overlaps_are_shared():
    events = [
        op(STEP_SCOPE, 0, 1000, cat="user_annotation"),
        op("module::projection", 90, 20, cat="user_annotation"),
        op("aten::mm", 95, 10),
        launch(96, correlation=1),
        op("module::lora", 120, 20, cat="user_annotation"),
        op("aten::mul", 125, 10),
        launch(126, correlation=2),
        op(DATA_WAIT_SCOPE, 600, 200, cat="user_annotation"),
        op("aten::copy_", 840, 5),
        launch(841, correlation=3),
        op(profiling.OPTIMIZER_SCOPE, 920, 60, cat="user_annotation"),  # on the host: the GPU idles
        kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 100, 300, correlation=1),  # 100-400
        kernel("vectorized_elementwise_kernel", 300, 200, correlation=2, stream=SIDE_STREAM),  # 300-500: overlaps
        kernel("Memcpy HtoD (Pinned -> Device)", 850, 50, correlation=3, cat="gpu_memcpy"),
        kernel("outside the step", 1200, 50, correlation=1),
    ]
    summary = analyze_trace({"traceEvents": events})
    assert summary["device"] == "cuda" and summary["step_time_s"] == pytest.approx(1e-3)
    # The 100 us where the GEMM and the LoRA kernel overlap count half for each.
    assert seconds(summary, GEMM) == pytest.approx(250e-6)
    assert seconds(summary, LORA) == pytest.approx(150e-6)
    assert seconds(summary, DEEPSPEED) == pytest.approx(50e-6)
    # Idle: 1000 - 450 busy; the 200 us of it inside the data wait are data wait, the 60 us of the host's optimizer
    # step optimizer.
    assert seconds(summary, DATA_WAIT) == pytest.approx(200e-6)
    assert seconds(summary, profiling.OPTIMIZER) == pytest.approx(60e-6)
    assert seconds(summary, IDLE) == pytest.approx(290e-6)
    assert sum(value["share"] for value in summary["categories"].values()) == pytest.approx(1.0)
    assert list(summary["categories"]) == list(CATEGORIES)
    assert summary["top"][0]["name"].startswith("sm90_xmma_gemm") and summary["top"][0]["category"] == GEMM


def test_communication_kernels_are_counted_by_kind_with_the_time_no_other_kernel_ran():
    events = [
        op(STEP_SCOPE, 0, 1000, cat="user_annotation"),
        kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 100, 200, correlation=1),  # 100-300
        kernel("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 250, 100, correlation=2,
               stream=SIDE_STREAM),  # 250-350: 50 us beside the GEMM, 50 us alone  # fmt: skip
        kernel("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 400, 20, correlation=3),
        kernel("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 500, 40,
               correlation=4),  # fmt: skip
        kernel("Memcpy HtoD (Pinned -> Device)", 600, 30, correlation=5, cat="gpu_memcpy"),
        kernel("vectorized_elementwise_kernel", 590, 100, correlation=6, stream=SIDE_STREAM),  # hides the copy
    ]
    communication = analyze_trace({"traceEvents": events})["communication"]
    assert list(communication) == ["all-gather", "reduce-scatter", "host to device copies"]
    gather = communication["all-gather"]
    assert gather["calls"] == 2
    assert gather["seconds"] == pytest.approx(120e-6) and gather["exposed_seconds"] == pytest.approx(70e-6)
    assert communication["reduce-scatter"]["exposed_seconds"] == pytest.approx(40e-6)
    assert communication["host to device copies"]["seconds"] == pytest.approx(30e-6)
    assert communication["host to device copies"]["exposed_seconds"] == pytest.approx(0.0)
    table = profile_markdown(analyze_trace({"traceEvents": events}), "comm")
    assert "| all-gather | 2 | 0.000 | 0.000 |" in table


def test_backward_kernels_belong_to_the_module_of_their_forward_op():
    events = [
        op(STEP_SCOPE, 0, 1000, cat="user_annotation"),
        # Two forward ops with sequence number 5 (counters are per thread): the later one, in a LoRA layer, is the
        # backward node's.
        op("module::projection", 5, 30, cat="user_annotation"),
        op("aten::linear", 10, 10, **{"Sequence number": 5, "Fwd thread id": 0}),
        op("module::lora", 95, 30, cat="user_annotation"),
        op("aten::linear", 100, 10, **{"Sequence number": 5, "Fwd thread id": 0}),
        op("module::norm", 150, 30, cat="user_annotation"),
        op("aten::mul", 155, 10, **{"Sequence number": 9, "Fwd thread id": 0}),
        # Backward, on the autograd thread.
        op("autograd::engine::evaluate_function: MmBackward0", 600, 50, tid=BACKWARD_THREAD,
           **{"Sequence number": 5, "Fwd thread id": 1}),
        op("aten::mm", 610, 20, tid=BACKWARD_THREAD),
        launch(611, correlation=11, tid=BACKWARD_THREAD),
        op("autograd::engine::evaluate_function: MulBackward0", 700, 50, tid=BACKWARD_THREAD,
           **{"Sequence number": 9, "Fwd thread id": 1}),
        launch(701, correlation=12, tid=BACKWARD_THREAD),
        op("autograd::engine::evaluate_function: MatMul4BitBackward", 800, 50, tid=BACKWARD_THREAD,
           **{"Sequence number": 77, "Fwd thread id": 1}),
        op("bitsandbytes::dequantize_4bit", 801, 10, tid=BACKWARD_THREAD),
        launch(802, correlation=13, tid=BACKWARD_THREAD),
        op("aten::_scaled_dot_product_flash_attention_backward", 900, 50, tid=BACKWARD_THREAD),
        launch(901, correlation=14, tid=BACKWARD_THREAD),
        kernel("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTT", 620, 100, correlation=11),
        kernel("elementwise_kernel", 720, 10, correlation=12),
        kernel("kDequantize4bit", 810, 20, correlation=13),
        kernel("flash_bwd_kernel", 910, 40, correlation=14),
    ]
    summary = analyze_trace({"traceEvents": events})
    assert seconds(summary, LORA) == pytest.approx(100e-6)  # a GEMM kernel, but LoRA's
    assert seconds(summary, GEMM) == 0
    assert seconds(summary, ELEMENTWISE) == pytest.approx(10e-6)
    assert seconds(summary, DEQUANT) == pytest.approx(20e-6)
    assert seconds(summary, ATTENTION) == pytest.approx(40e-6)


def test_cpu_time_is_each_ops_own_time_and_the_rest_is_outside_any_op():
    events = [
        op(STEP_SCOPE, 0, 1000, cat="user_annotation"),
        op("module::lora", 100, 300, cat="user_annotation"),
        op("aten::linear", 110, 200),
        op("aten::mm", 120, 150),
        op(DATA_WAIT_SCOPE, 500, 100, cat="user_annotation"),
        op("aten::mm", 700, 100),  # no module label: a frozen GEMM
        op("aten::mm", 900, 50, tid=MAIN + 5),  # another thread: not the step's
    ]
    summary = analyze_trace({"traceEvents": events})
    assert summary["device"] == "cpu"
    assert seconds(summary, LORA) == pytest.approx(300e-6)
    assert seconds(summary, GEMM) == pytest.approx(100e-6)
    assert seconds(summary, DATA_WAIT) == pytest.approx(100e-6)
    assert seconds(summary, IDLE) == pytest.approx(500e-6)
    assert sum(value["share"] for value in summary["categories"].values()) == pytest.approx(1.0)
    [mm] = [entry for entry in summary["top"] if entry["name"] == "aten::mm"]
    assert mm["calls"] == 2 and mm["seconds"] == pytest.approx(250e-6)


def test_a_trace_without_exactly_one_step_is_refused():
    with pytest.raises(ValueError, match="0 'bench::profiled_step' annotations"):
        analyze_trace({"traceEvents": [op("aten::mm", 0, 10)]})


def test_module_labels_on_the_tiny_lora_model(tiny_lora_model):
    labels = {name: module_label(name, module) for name, module in tiny_lora_model.named_modules()}
    layer = "language_model.base_model.model.model.layers.0"
    assert labels["vision_model"] == labels["mlp1"] == "vision"
    assert labels[f"{layer}.self_attn"] == "attention"
    assert labels[f"{layer}.self_attn.q_proj"] == labels[f"{layer}.mlp.down_proj"] == "lora"
    assert labels[f"{layer}.self_attn.q_proj.base_layer"] == "projection"
    assert labels[f"{layer}.input_layernorm"] == labels[f"{layer}.post_attention_layernorm"] == "norm"
    assert labels[f"{layer}.mlp.act_fn"] == "activation"
    assert labels["language_model.base_model.model.model.rotary_emb"] == "rope"
    assert labels[f"{layer}.self_attn.q_proj.lora_A.default"] is None  # counted in its LoRA layer
    handles = label_modules(tiny_lora_model)
    assert len(handles) == 2 * sum(label is not None for label in labels.values())
    for handle in handles:
        handle.remove()


def test_profiled_training_step_on_the_cpu(tiny_model_dir, tmp_path):
    from tests.model.test_qlora import freeze_vision_and_projector, training_batch

    from internvl.model.loading import load_internvl_model, load_tokenizer

    model = load_internvl_model(tiny_model_dir, load_in_4bit=True, torch_dtype=torch.bfloat16)
    freeze_vision_and_projector(model)
    model.wrap_llm_lora(r=8, lora_alpha=16, lora_dropout=0.05)
    model.gradient_checkpointing_enable()
    model.train()
    batch = training_batch(model, load_tokenizer(tiny_model_dir))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    profiler = StepProfiler(model, tmp_path / "step.trace.json.gz")
    profiler.start()
    with torch.autograd.profiler.record_function(DATA_WAIT_SCOPE):
        inputs = {name: tensor.clone() for name, tensor in batch.items()}
    model(**inputs).loss.backward()
    optimizer.step()
    summary = profiler.stop()

    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    with gzip.open(summary["trace"], "rt") as f:
        assert any(e.get("name") == STEP_SCOPE for e in json.load(f)["traceEvents"])
    shares = {name: value["share"] for name, value in summary["categories"].items()}
    assert summary["device"] == "cpu" and sum(shares.values()) == pytest.approx(1.0)
    for category in (GEMM, DEQUANT, LORA, ATTENTION, ELEMENTWISE, profiling.VISION, profiling.OPTIMIZER):
        assert shares[category] > 0, category
    assert shares[DEEPSPEED] == 0  # no DeepSpeed here
    table = profile_markdown(summary, "tiny")
    assert table.count("\n| ") >= len(CATEGORIES) + 1 and f"| {LORA} |" in table
