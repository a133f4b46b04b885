"""The model FLOPs of a training step, for MFU: what the batches held and what the model computes on them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from internvl.constants import IGNORE_INDEX

# Dense BF16 tensor-core rate of an H100 / H200 SXM (vendor datasheet), per GPU.
DEFAULT_PEAK_TFLOPS = 989.0


@dataclass
class BatchCounts:
    """What the measured batches held, summed (one process)."""

    samples: int = 0
    tokens: int = 0  # non-padding tokens
    squared_lengths: int = 0  # sum of L^2 over samples (causal attention cost)
    supervised_tokens: int = 0  # positions whose next token is trained
    frames: int = 0  # real image tiles / video frames (image_flags == 1)

    def add(self, batch: dict) -> None:
        lengths = batch["attention_mask"].sum(dim=1).long().cpu()
        self.samples += int(lengths.numel())
        self.tokens += int(lengths.sum())
        self.squared_lengths += int((lengths**2).sum())
        self.supervised_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.frames += int(batch["image_flags"].sum()) if "image_flags" in batch else 0

    def __iadd__(self, other: BatchCounts) -> BatchCounts:
        for name in asdict(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


def llm_linear_parameters(llm_config) -> int:
    """Weights of the attention and MLP projections of all decoder layers (no embeddings, no LM head)."""
    hidden, inter = llm_config.hidden_size, llm_config.intermediate_size
    head_dim = getattr(llm_config, "head_dim", None) or hidden // llm_config.num_attention_heads
    q_width = llm_config.num_attention_heads * head_dim
    kv_width = llm_config.num_key_value_heads * head_dim
    per_layer = hidden * q_width + 2 * hidden * kv_width + q_width * hidden + 3 * hidden * inter
    return per_layer * llm_config.num_hidden_layers


def llm_lora_parameters(llm_config, rank: int) -> int:
    """LoRA A and B weights on q/k/v/o/gate/up/down: ``rank * (in + out)`` per projection."""
    hidden, inter = llm_config.hidden_size, llm_config.intermediate_size
    head_dim = getattr(llm_config, "head_dim", None) or hidden // llm_config.num_attention_heads
    q_width = llm_config.num_attention_heads * head_dim
    kv_width = llm_config.num_key_value_heads * head_dim
    per_layer = (hidden + q_width) * 2 + (hidden + kv_width) * 2 + (hidden + inter) * 3
    return rank * per_layer * llm_config.num_hidden_layers


def training_flops(config, counts: BatchCounts, *, lora_rank: int, recompute: bool) -> float:
    """Model FLOPs of one training pass over ``counts`` with a frozen base, LoRA on the LLM, frozen vision tower.

    - LLM projections (frozen): forward 2N per token, backward to the inputs 2N (no weight gradient), plus a
      second forward when activations are recomputed: 6N (4N without recomputation).
    - LoRA (trained): forward 2N, backward 4N, recomputation 2N: 8N (6N).
    - causal attention, per layer and sample of length L: forward 2 * width * L^2 (QK^T and AV over the lower
      triangle), backward twice that, plus the recomputed forward: 8 * width * L^2 (6 *).
    - LM head, only at supervised positions (the model computes no other logits): forward and backward to its
      input, 4 * vocab * hidden per position.
    - vision tower and projector (frozen, no gradient): forward only, 2N per patch token plus non-causal
      attention 4 * width * T^2 per layer and frame of T tokens.
    """
    llm = config.llm_config
    passes = 3 if recompute else 2
    head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
    attention_width = llm.num_attention_heads * head_dim
    per_token = 2 * passes * llm_linear_parameters(llm) + (2 * passes + 2) * llm_lora_parameters(llm, lora_rank)
    flops = counts.tokens * per_token
    flops += (2 * passes + 2) * attention_width * counts.squared_lengths * llm.num_hidden_layers
    flops += 4 * llm.vocab_size * llm.hidden_size * counts.supervised_tokens

    vision = config.vision_config
    vit_tokens = (config.image_size // vision.patch_size) ** 2 + 1
    vit_layer = 4 * vision.hidden_size**2 + 2 * vision.hidden_size * vision.intermediate_size  # qkv, proj, fc1, fc2
    vit_linear = vit_layer * vision.num_hidden_layers
    vit_attention = 4 * vision.hidden_size * vit_tokens**2 * vision.num_hidden_layers
    shuffled = vision.hidden_size * int(round(1 / config.downsample_ratio)) ** 2
    projector = 2 * (shuffled * llm.hidden_size + llm.hidden_size**2) * config.num_image_token
    flops += counts.frames * (2 * vit_linear * vit_tokens + vit_attention + projector)
    return float(flops)
