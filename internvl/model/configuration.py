"""Configurations with the official InternVL field names, so official ``config.json`` files load unchanged.

``InternVLChatConfig`` nests an ``InternVisionConfig`` (``vision_config``) and a transformers LLM config
(``llm_config``, Qwen2 or Llama) and writes both back as nested dicts. Unknown keys that real checkpoints carry
(MoE leftovers, ``_name_or_path``, ``system_message``, ...) are kept as plain attributes.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, LlamaConfig, PreTrainedConfig, Qwen2Config

# LLM architectures this toolkit builds, by ``llm_config["architectures"][0]``.
SUPPORTED_LLM_CONFIGS = {"Qwen2ForCausalLM": Qwen2Config, "LlamaForCausalLM": LlamaConfig}
# Architectures official InternVL checkpoints use that this toolkit does not implement.
UNSUPPORTED_LLM_ARCHITECTURES = ("InternLM2ForCausalLM", "Phi3ForCausalLM")


class InternVisionConfig(PreTrainedConfig):
    """InternViT configuration. Defaults are the official ones (InternViT-6B); InternVL3 checkpoints override them."""

    model_type = "intern_vit_6b"
    base_config_key = "vision_config"

    def __init__(
        self,
        num_channels: int = 3,
        patch_size: int = 14,
        image_size: int = 224,
        qkv_bias: bool = False,
        hidden_size: int = 3200,
        num_attention_heads: int = 25,
        intermediate_size: int = 12800,
        qk_normalization: bool = True,
        num_hidden_layers: int = 48,
        use_flash_attn: bool = True,
        hidden_act: str = "gelu",
        norm_type: str = "rms_norm",
        layer_norm_eps: float = 1e-6,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 0.1,
        **kwargs: Any,
    ):
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        # Kept for config compatibility only: attention always goes through SDPA, which picks flash kernels itself.
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        # The official code uses it as the layer-scale init value.
        self.initializer_factor = initializer_factor
        if norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"vision_config.norm_type must be 'layer_norm' or 'rms_norm', got {norm_type!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                f"({num_attention_heads})"
            )
        super().__init__(**kwargs)


def build_llm_config(llm_config: dict | PreTrainedConfig | None) -> PreTrainedConfig:
    """The transformers config of the LLM, chosen like the official code by ``architectures[0]``."""
    if isinstance(llm_config, PreTrainedConfig):
        architecture = (llm_config.architectures or ["Qwen2ForCausalLM"])[0]
        llm_config_dict = None
    else:
        llm_config_dict = dict(llm_config or {"architectures": ["Qwen2ForCausalLM"]})
        architecture = (llm_config_dict.get("architectures") or ["Qwen2ForCausalLM"])[0]
    if architecture in UNSUPPORTED_LLM_ARCHITECTURES:
        raise NotImplementedError(
            f"llm_config architecture {architecture!r} is not supported: this toolkit runs InternVL checkpoints whose "
            f"language model is one of {', '.join(SUPPORTED_LLM_CONFIGS)} (InternVL2.5/InternVL3 Qwen2.5-based "
            "models such as OpenGVLab/InternVL3-8B). InternLM2-based checkpoints such as InternVL2.5-8B need the "
            "official remote code."
        )
    if architecture not in SUPPORTED_LLM_CONFIGS:
        raise ValueError(
            f"unknown llm_config architecture {architecture!r}; supported: {', '.join(SUPPORTED_LLM_CONFIGS)}"
        )
    if llm_config_dict is None:
        llm_config.tie_word_embeddings = False
        return llm_config
    llm_config_dict.setdefault("architectures", [architecture])
    llm_config_dict.pop("model_type", None)
    # InternVL never ties the LM head to the input embeddings.
    llm_config_dict["tie_word_embeddings"] = False
    return SUPPORTED_LLM_CONFIGS[architecture](**llm_config_dict)


class InternVLChatConfig(PreTrainedConfig):
    """The InternVL chat model: vision tower + ``mlp1`` projector + LLM, with the official field names."""

    model_type = "internvl_chat"
    # ``sub_configs`` lets transformers propagate dtype and attention implementation into both parts.
    sub_configs = {"vision_config": InternVisionConfig, "llm_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | InternVisionConfig | None = None,
        llm_config: dict | PreTrainedConfig | None = None,
        use_backbone_lora: int = 0,
        use_llm_lora: int = 0,
        pad2square: bool = False,
        select_layer: int = -1,
        force_image_size: int | None = None,
        downsample_ratio: float = 0.5,
        template: str | None = None,
        dynamic_image_size: bool = False,
        use_thumbnail: bool = False,
        ps_version: str = "v1",
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 6,
        **kwargs: Any,
    ):
        if isinstance(vision_config, InternVisionConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = InternVisionConfig(**(vision_config or {}))
        self.llm_config = build_llm_config(llm_config)
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.pad2square = pad2square
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        if ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version must be 'v1' or 'v2', got {ps_version!r}")
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        # DeepSpeed "auto" bucket sizes read ``config.hidden_size``.
        self.hidden_size = self.llm_config.hidden_size
        kwargs["tie_word_embeddings"] = False
        kwargs.pop("hidden_size", None)
        super().__init__(**kwargs)

    @property
    def image_size(self) -> int:
        """Tile side in pixels."""
        return self.force_image_size or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:
        """``<IMG_CONTEXT>`` tokens per tile: (image_size // patch)^2 * downsample_ratio^2 (256 for 448 px)."""
        patches_per_side = self.image_size // self.vision_config.patch_size
        return int(patches_per_side**2 * self.downsample_ratio**2)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["llm_config"] = with_legacy_rope_keys(output["llm_config"])
        return output


def with_legacy_rope_keys(llm_config: dict[str, Any]) -> dict[str, Any]:
    """``llm_config`` (a dict) with the RoPE settings also under the legacy keys (``rope_theta``, ``rope_scaling``)
    beside ``rope_parameters``: official configs, the official remote code and transformers 4 read those."""
    llm_config = dict(llm_config)
    rope = llm_config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        llm_config.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
        legacy["type"] = legacy.pop("rope_type")
        llm_config.setdefault("rope_scaling", legacy)
    return llm_config


# Lets transformers' Auto classes (AutoTokenizer reads the model config first) recognise these directories
# without remote code.
AutoConfig.register(InternVisionConfig.model_type, InternVisionConfig, exist_ok=True)
AutoConfig.register(InternVLChatConfig.model_type, InternVLChatConfig, exist_ok=True)
