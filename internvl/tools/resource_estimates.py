"""How much GPU memory and disk a fine-tuning run needs, computed from the model's sizes (``ModelDims``).

The formulas are documented in docs/SETUP.md; ``internvl.tools.checks.resources`` compares them with the machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing the model package pulls in torch and transformers: the setup check imports this early
    from internvl.model.dims import ModelDims

GIB = 1024**3
# Supervised tokens per sample assumed when the data is not read (answers of video summaries stay well below it).
ASSUMED_ANSWER_TOKENS = 512
ZERO3_UNCHECKPOINTED_LAYER_FACTOR = 1.15


def nf4_bytes_per_param(double_quant: bool, blocksize: int = 64) -> float:
    """4 bits per weight plus one absmax per block: fp32, or uint8 plus an fp32 per 256 blocks when double-quantized."""
    constants = (1 + 4 / 256) / blocksize if double_quant else 4 / blocksize
    return 0.5 + constants


@dataclass
class MemoryEstimate:
    """Peak GPU memory of one rank, in bytes, by component (see docs/SETUP.md)."""

    load_peak: int  # the whole 4-bit model on each GPU while from_pretrained runs (before ZeRO partitions it)
    resident_weights: int  # weights held during training (partitioned, offloaded or whole)
    lora_states: int  # LoRA weights, gradients and optimizer states on the GPU
    checkpointed_activations: int  # the hidden states gradient checkpointing keeps, for the whole step
    uncheckpointed_activations: int  # what the forward of the layers left out of checkpointing keeps for backward
    # Phases of a step, which do not overlap: the largest one counts. The layers left out of checkpointing are the
    # last ones, so their activations live through the logits and their own backward, and are gone by the time
    # backward reaches the checkpointed layers and recomputes them.
    vision_activations: int  # the frozen ViT forward on every frame of the micro-batch (no grad)
    logits: int  # LM-head output at supervised positions, its fp32 log-softmax and their gradients
    layer_gradients: int  # the gradients one decoder layer's backward creates
    layer_activations: int  # one decoder layer recomputed during backward, with its gradients
    uncheckpointed_layers: int
    dequantized_weight: int  # the largest projection dequantized to bf16 for its matmul
    cuda_overhead: int  # CUDA context and allocator fragmentation
    tokens_per_micro_batch: int
    frames_per_sample: int

    def phases(self) -> dict[str, int]:
        """What each phase of the step adds to the weights, LoRA states, checkpoints and buffers."""
        after_forward = self.logits
        if self.uncheckpointed_layers:
            after_forward = self.uncheckpointed_activations + max(self.logits, self.layer_gradients)
        return {"ViT": self.vision_activations, "logits": after_forward, "layer recompute": self.layer_activations}

    @property
    def train_peak(self) -> int:
        return (
            self.resident_weights + self.lora_states + self.checkpointed_activations + max(self.phases().values())
            + self.dequantized_weight + self.cuda_overhead
        )  # fmt: skip

    @property
    def peak(self) -> int:
        return max(self.load_peak + self.cuda_overhead, self.train_peak)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.update(train_peak=self.train_peak, peak=self.peak)
        return values

    def summary(self) -> str:
        phases = self.phases()
        largest = max(phases, key=phases.get)
        if largest == "logits" and self.uncheckpointed_layers:
            largest = f"logits and backward of {self.uncheckpointed_layers} un-checkpointed layers"
        parts = [
            ("weights", self.resident_weights),
            ("LoRA+optimizer", self.lora_states),
            ("checkpoints", self.checkpointed_activations),
            (largest, max(phases.values())),
            ("CUDA+buffers", self.dequantized_weight + self.cuda_overhead),
        ]
        detail = ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts)
        return (
            f"≈{self.peak / GIB:.1f} GiB per GPU (training {self.train_peak / GIB:.1f}: {detail}; "
            f"loading {(self.load_peak + self.cuda_overhead) / GIB:.1f})"
        )


def estimate_gpu_memory(
    dims: ModelDims,
    *,
    lora_rank: int,
    micro_batch_size: int,
    max_seq_length: int,
    max_num_frame: int,
    answer_tokens: int,
    num_gpus: int,
    zero_stage: int,
    offload_param: bool,
    offload_optimizer: bool,
    double_quant: bool = True,
    uncheckpointed_layers: int = 0,
    fused_kernels: bool = False,
    cuda_overhead: int = GIB,
) -> MemoryEstimate:
    """Peak GPU memory per rank for QLoRA training of ``dims`` in bf16 with gradient checkpointing.

    ``answer_tokens`` is the most supervised tokens of one sample: the model computes logits only there.
    ``num_gpus`` is the number of ranks ZeRO partitions over. ``uncheckpointed_layers`` decoder layers keep their
    activations instead of being recomputed (all of them: no gradient checkpointing). ``fused_kernels``: Liger's
    RMSNorm and SwiGLU (``--use_liger``), which keep no fp32 copies and no SiLU output. The formula is explained in
    docs/SETUP.md.
    """
    if not 0 <= uncheckpointed_layers <= dims.num_layers:
        raise ValueError(f"uncheckpointed_layers must be in [0, {dims.num_layers}], got {uncheckpointed_layers}")
    h, i, kv, v = dims.hidden_size, dims.intermediate_size, dims.kv_width, dims.vocab_size
    n = max(1, num_gpus)
    b, s = micro_batch_size, max_seq_length
    quantized = dims.quantized_params * nf4_bytes_per_param(double_quant)
    whole_model = int(quantized + 2 * (dims.llm_bf16_params + dims.vision_params))

    if zero_stage < 3:
        resident = whole_model
    else:
        # ZeRO-3 gathers a module's weights while it runs: the largest is the bf16 LM head (or the embeddings).
        working_set = int(2 * v * h + dims.quantized_params_per_layer * nf4_bytes_per_param(double_quant))
        resident = working_set + (0 if offload_param else whole_model // n)

    # Per LoRA parameter: bf16 weight 2 + bf16 gradient 2 + fp32 master weight and two Adam moments 12 bytes,
    # partitioned over the ranks from ZeRO stage 3 / 2 / 1 on respectively.
    lora = dims.lora_params(lora_rank)
    lora_states = int(
        2 * lora / (n if zero_stage >= 3 else 1)
        + 2 * lora / (n if zero_stage >= 2 else 1)
        + (0 if offload_optimizer else 12 * lora / (n if zero_stage >= 1 else 1))
    )

    frames = max(1, min(max_num_frame, s // dims.num_image_token))
    tokens = b * s
    # Per token, in bf16 elements: the input of every checkpointed layer plus the embeddings before and after the
    # image splice.
    checkpointed_per_token = (dims.num_layers - uncheckpointed_layers + 2) * h
    # What a layer left out of checkpointing keeps until its backward: its input and the fp32 copies its two RMSNorms
    # make (6h), the dropped-out LoRA inputs with their masks (seven projections: 7.5h + 1.5i), SDPA's q, k, v and
    # output (2h + 2kv), the attention output reshaped for o_proj (h), the SwiGLU intermediates (3i).
    kept_per_layer_token = 18 * h + 2 * kv + 4.5 * i
    # One Qwen2 layer recomputed in backward: the tensors its forward keeps, with the temporaries of its backward
    # (20h + 4kv + 6i), and the gradients its backward creates (4h + 3i).
    layer_per_token = 24 * h + 4 * kv + 9 * i
    if fused_kernels:  # Liger's norms keep only their input, its SwiGLU recomputes the SiLU in backward
        kept_per_layer_token -= 6 * h + i
        layer_per_token -= 6 * h + i
    if zero_stage >= 3:
        # Measured, cause not traced: under ZeRO-3 each layer left out of checkpointing held 15% more than this
        # count (1 x H200, 2026-12-02, docs/BENCHMARKS.md); without it the estimate would fall 10% short.
        kept_per_layer_token *= ZERO3_UNCHECKPOINTED_LAYER_FACTOR
    # Logits [N, vocab] for the N supervised (sample, position) pairs of the micro-batch.
    supervised_tokens = b * min(s, answer_tokens)
    # Frozen ViT under no_grad: one layer's tensors at a time, for every tile of the micro-batch.
    hv, iv = dims.vision_hidden_size, dims.vision_intermediate_size
    vision_per_tile = dims.vision_tokens_per_tile * (6 * hv + iv)
    return MemoryEstimate(
        load_peak=whole_model,
        resident_weights=resident,
        lora_states=lora_states,
        checkpointed_activations=2 * checkpointed_per_token * tokens,
        uncheckpointed_activations=int(2 * uncheckpointed_layers * kept_per_layer_token * tokens),
        vision_activations=2 * vision_per_tile * b * frames,
        # bf16 logits 2 + fp32 log-softmax 4 + fp32 gradient 4 + bf16 gradient 2 bytes per vocabulary entry.
        logits=12 * v * supervised_tokens,
        layer_gradients=2 * (4 * h + 3 * i) * tokens,
        layer_activations=2 * layer_per_token * tokens,
        uncheckpointed_layers=uncheckpointed_layers,
        dequantized_weight=2 * h * i,
        cuda_overhead=cuda_overhead,
        tokens_per_micro_batch=tokens,
        frames_per_sample=frames,
    )


def max_uncheckpointed_layers(dims: ModelDims, memory_budget: int, **settings) -> int:
    """The most decoder layers that can keep their activations (the last ones, see
    ``internvl.model.checkpointing``) with the estimated peak within ``memory_budget`` bytes per GPU; 0 when even
    full checkpointing does not fit. ``settings`` are ``estimate_gpu_memory``'s."""
    for layers in range(dims.num_layers, 0, -1):
        if estimate_gpu_memory(dims, uncheckpointed_layers=layers, **settings).peak <= memory_budget:
            return layers
    return 0


@dataclass
class DiskEstimate:
    """What a run writes to disk, in bytes."""

    checkpoint: int  # one checkpoint-N folder: adapter + fp32 optimizer states
    checkpoints_kept: int  # how many exist at once (save_total_limit + the one being written)
    final_adapter: int
    merged_model: int

    @property
    def total(self) -> int:
        return self.checkpoint * self.checkpoints_kept + self.final_adapter + self.merged_model

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["total"] = self.total
        return values


def estimate_disk_usage(dims: ModelDims, *, lora_rank: int, save_total_limit: int) -> DiskEstimate:
    lora = dims.lora_params(lora_rank)
    adapter = 2 * lora  # bf16
    return DiskEstimate(
        # adapter + DeepSpeed's fp32 master weights and both Adam moments (12 bytes per trainable parameter)
        checkpoint=adapter + 12 * lora,
        # The Trainer deletes the oldest checkpoint only after the new one is written.
        checkpoints_kept=max(1, save_total_limit) + 1,
        final_adapter=adapter,
        merged_model=2 * dims.total_params,  # bf16, the official layout
    )
