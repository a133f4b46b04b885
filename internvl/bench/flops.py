"""The model FLOPs of a training step, for MFU: what the batches held and what the model computes on them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from internvl.constants import IGNORE_INDEX
from internvl.data.packing import sample_lengths
from internvl.model.dims import ModelDims

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
        lengths = sample_lengths(batch)  # packed or not
        self.samples += len(lengths)
        self.tokens += sum(lengths)
        self.squared_lengths += sum(n * n for n in lengths)
        self.supervised_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.frames += int(batch["image_flags"].sum()) if "image_flags" in batch else 0

    def __iadd__(self, other: BatchCounts) -> BatchCounts:
        for name in asdict(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


def training_flops(dims: ModelDims, counts: BatchCounts, *, lora_rank: int, recomputed_layers: int) -> float:
    """Model FLOPs of one training pass over ``counts`` with a frozen base, LoRA on the LLM, frozen vision tower,
    ``recomputed_layers`` of the decoder layers checkpointed (their forward runs again in backward).

    - LLM projections (frozen): forward 2N, backward to the inputs 2N (no weight gradient), plus a
      second forward when activations are recomputed: 6N (4N without recomputation).
    - LoRA (trained): forward 2N, backward 4N, recomputation 2N: 8N (6N).
    - causal attention, per layer and sample of length L: forward 2 * width * L^2 (QK^T and AV over the lower
      triangle), backward twice that, plus the recomputed forward: 8 * width * L^2 (6 *).
    - LM head, only at supervised positions (the model computes no other logits): forward and backward to its
      input, 4 * vocab * hidden per position.
    - vision tower and projector (frozen, no gradient): forward only, 2N per patch token plus non-causal
      attention 4 * width * T^2 per layer and frame of T tokens.
    """
    if not 0 <= recomputed_layers <= dims.num_layers:
        raise ValueError(f"recomputed_layers must be in [0, {dims.num_layers}], got {recomputed_layers}")
    passes = 2 + recomputed_layers / dims.num_layers  # forward, backward, and the recomputed share of a forward
    per_token = 2 * passes * dims.quantized_params + (2 * passes + 2) * dims.lora_params(lora_rank)
    flops = counts.tokens * per_token
    flops += (2 * passes + 2) * dims.q_width * counts.squared_lengths * dims.num_layers
    flops += 4 * dims.vocab_size * dims.hidden_size * counts.supervised_tokens

    vit_tokens = dims.vision_tokens_per_tile
    vit_attention = 4 * dims.vision_hidden_size * vit_tokens**2 * dims.vision_num_layers
    projector = 2 * dims.projector_linear_params * dims.num_image_token
    flops += counts.frames * (2 * dims.vision_linear_params * vit_tokens + vit_attention + projector)
    return float(flops)
