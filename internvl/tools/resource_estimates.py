"""How much GPU memory and disk a fine-tuning run needs, computed from the model config.

The formulas are documented in docs/SETUP.md; ``internvl.tools.setup_check`` compares them with the machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class ModelDims:
    """The sizes the estimates need, read from an ``InternVLChatConfig``."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    q_width: int  # num_attention_heads * head_dim
    kv_width: int  # num_key_value_heads * head_dim
    vocab_size: int
    qkv_bias: bool
    vision_params: int  # vision tower + mlp1 projector, kept in bf16
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_tokens_per_tile: int  # patches + CLS
    num_image_token: int  # <IMG_CONTEXT> tokens per tile after pixel shuffle

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        llm, vision = config.llm_config, config.vision_config
        head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
        num_kv_heads = getattr(llm, "num_key_value_heads", None) or llm.num_attention_heads
        qkv_bias = bool(getattr(llm, "attention_bias", llm.model_type == "qwen2"))

        hv, iv, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
        patches = (vision.image_size // patch) ** 2
        norm = 2 * hv if vision.norm_type == "layer_norm" else hv
        vision_layer = (
            3 * hv * hv + (3 * hv if vision.qkv_bias else 0)  # attn.qkv
            + hv * hv + hv  # attn.proj
            + 2 * hv * iv + iv + hv  # mlp.fc1, mlp.fc2
            + 2 * norm + 2 * hv  # norm1, norm2, ls1, ls2
            + (2 * hv if vision.qk_normalization else 0)
        )  # fmt: skip
        vision_embeddings = vision.num_channels * patch * patch * hv + hv + hv + (patches + 1) * hv
        projector_in = int(hv / config.downsample_ratio**2)
        projector = 2 * projector_in + projector_in * llm.hidden_size + llm.hidden_size * (llm.hidden_size + 2)
        return cls(
            hidden_size=llm.hidden_size,
            num_layers=llm.num_hidden_layers,
            intermediate_size=llm.intermediate_size,
            q_width=llm.num_attention_heads * head_dim,
            kv_width=num_kv_heads * head_dim,
            vocab_size=llm.vocab_size,
            qkv_bias=qkv_bias,
            vision_params=vision.num_hidden_layers * vision_layer + vision_embeddings + projector,
            vision_hidden_size=hv,
            vision_intermediate_size=iv,
            vision_tokens_per_tile=patches + 1,
            num_image_token=config.num_image_token,
        )

    @property
    def quantized_params_per_layer(self) -> int:
        """Weights of the seven LLM projections of one decoder layer: the ones stored in 4-bit."""
        h, i = self.hidden_size, self.intermediate_size
        return h * self.q_width + 2 * h * self.kv_width + self.q_width * h + 3 * h * i

    @property
    def quantized_params(self) -> int:
        return self.num_layers * self.quantized_params_per_layer

    @property
    def llm_bf16_params(self) -> int:
        """LLM parameters left in bf16: embeddings, lm_head, norms, q/k/v biases."""
        h = self.hidden_size
        biases = (self.q_width + 2 * self.kv_width) if self.qkv_bias else 0
        return 2 * self.vocab_size * h + h + self.num_layers * (2 * h + biases)

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.llm_bf16_params + self.vision_params

    def lora_params(self, rank: int) -> int:
        """LoRA A and B of the seven projections in every layer: rank * (in + out) each."""
        h, i = self.hidden_size, self.intermediate_size
        per_layer = rank * ((h + self.q_width) + 2 * (h + self.kv_width) + (self.q_width + h) + 2 * (h + i) + (i + h))
        return self.num_layers * per_layer


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
    # Three phases of a step, which do not overlap: the largest one counts.
    vision_activations: int  # the frozen ViT forward on every frame of the micro-batch (no grad)
    logits: int  # LM-head output at supervised positions, its fp32 log-softmax and their gradients
    layer_activations: int  # one decoder layer recomputed during backward, with its gradients
    dequantized_weight: int  # the largest projection dequantized to bf16 for its matmul
    cuda_overhead: int  # CUDA context and allocator fragmentation
    tokens_per_micro_batch: int
    frames_per_sample: int

    @property
    def train_peak(self) -> int:
        largest_phase = max(self.vision_activations, self.logits, self.layer_activations)
        return (
            self.resident_weights + self.lora_states + self.checkpointed_activations + largest_phase
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
        phases = {"ViT": self.vision_activations, "logits": self.logits, "layer recompute": self.layer_activations}
        largest = max(phases, key=phases.get)
        parts = [
            ("weights", self.resident_weights),
            ("LoRA+optimizer", self.lora_states),
            ("checkpoints", self.checkpointed_activations),
            (largest, phases[largest]),
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
    cuda_overhead: int = GIB,
) -> MemoryEstimate:
    """Peak GPU memory per rank for QLoRA training of ``dims`` in bf16 with gradient checkpointing.

    ``answer_tokens`` is the most supervised tokens of one sample: the model computes logits only there.
    ``num_gpus`` is the number of ranks ZeRO partitions over. The formula is explained in docs/SETUP.md.
    """
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
    # Per token, in bf16 elements: the input of every layer plus the embeddings before and after the image splice.
    checkpointed_per_token = (dims.num_layers + 2) * h
    # One Qwen2 layer recomputed in backward: the tensors its forward keeps (norm outputs, q/k/v/o, the LoRA inputs,
    # the SwiGLU intermediates: 20h + 4kv + 6i) and the gradients its backward creates (4h + 3i).
    layer_per_token = 24 * h + 4 * kv + 9 * i
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
        vision_activations=2 * vision_per_tile * b * frames,
        # bf16 logits 2 + fp32 log-softmax 4 + fp32 gradient 4 + bf16 gradient 2 bytes per vocabulary entry.
        logits=12 * v * supervised_tokens,
        layer_activations=2 * layer_per_token * tokens,
        dequantized_weight=2 * h * i,
        cuda_overhead=cuda_overhead,
        tokens_per_micro_batch=tokens,
        frames_per_sample=frames,
    )


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
