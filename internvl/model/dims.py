"""The sizes and parameter counts of an InternVL chat model, read from its ``InternVLChatConfig``.

The one place they are derived: the GPU-memory and disk estimates (``internvl.tools.resource_estimates``) and the
benchmark's FLOP count (``internvl.bench.flops``) both read a ``ModelDims``. Plain arithmetic on the config, so no
weights are built (``tests/model/test_dims.py`` checks every count against a model built on the meta device).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """LLM and vision-tower sizes of an ``InternVLChatConfig``, with the parameter counts derived from them."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    q_width: int  # num_attention_heads * head_dim
    kv_width: int  # num_key_value_heads * head_dim
    vocab_size: int
    qkv_bias: bool
    vision_params: int  # vision tower + mlp1 projector, kept in bf16
    vision_num_layers: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_tokens_per_tile: int  # patches + CLS of one tile as the model is fed (config.image_size)
    projector_in_features: int  # vision width after pixel shuffle: the input of mlp1
    num_image_token: int  # <IMG_CONTEXT> tokens per tile after pixel shuffle

    @classmethod
    def from_config(cls, config) -> ModelDims:
        llm, vision = config.llm_config, config.vision_config
        head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
        num_kv_heads = getattr(llm, "num_key_value_heads", None) or llm.num_attention_heads
        qkv_bias = bool(getattr(llm, "attention_bias", llm.model_type == "qwen2"))

        hv, iv, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
        # The trained position-embedding grid (vision.image_size); tiles of another size interpolate it.
        trained_patches = (vision.image_size // patch) ** 2
        norm = 2 * hv if vision.norm_type == "layer_norm" else hv
        vision_layer = (
            _vision_linear_weights_per_layer(hv, iv)  # attn.qkv, attn.proj, mlp.fc1, mlp.fc2
            + (3 * hv if vision.qkv_bias else 0) + hv + iv + hv  # their biases
            + 2 * norm + 2 * hv  # norm1, norm2, ls1, ls2
            + (2 * hv if vision.qk_normalization else 0)
        )  # fmt: skip
        vision_embeddings = vision.num_channels * patch * patch * hv + hv + hv + (trained_patches + 1) * hv
        # As InternVLChatModel builds mlp1: LayerNorm, Linear, GELU, Linear.
        projector_in = hv * int(round(1 / config.downsample_ratio)) ** 2
        projector = 2 * projector_in + _projector_linear_weights(projector_in, llm.hidden_size) + 2 * llm.hidden_size
        return cls(
            hidden_size=llm.hidden_size,
            num_layers=llm.num_hidden_layers,
            intermediate_size=llm.intermediate_size,
            q_width=llm.num_attention_heads * head_dim,
            kv_width=num_kv_heads * head_dim,
            vocab_size=llm.vocab_size,
            qkv_bias=qkv_bias,
            vision_params=vision.num_hidden_layers * vision_layer + vision_embeddings + projector,
            vision_num_layers=vision.num_hidden_layers,
            vision_hidden_size=hv,
            vision_intermediate_size=iv,
            vision_tokens_per_tile=(config.image_size // patch) ** 2 + 1,
            projector_in_features=projector_in,
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

    @property
    def vision_linear_params(self) -> int:
        """Weights of the matmuls of all vision-tower layers (attention qkv and proj, MLP fc1 and fc2)."""
        per_layer = _vision_linear_weights_per_layer(self.vision_hidden_size, self.vision_intermediate_size)
        return self.vision_num_layers * per_layer

    @property
    def projector_linear_params(self) -> int:
        """Weights of the two matmuls of the ``mlp1`` projector."""
        return _projector_linear_weights(self.projector_in_features, self.hidden_size)


def _vision_linear_weights_per_layer(hidden: int, intermediate: int) -> int:
    return 3 * hidden * hidden + hidden * hidden + 2 * hidden * intermediate


def _projector_linear_weights(in_features: int, llm_hidden: int) -> int:
    return in_features * llm_hidden + llm_hidden * llm_hidden
