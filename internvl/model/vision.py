"""InternViT, the InternVL vision tower, with the official parameter names.

A plain pre-norm ViT: patchify + CLS + (interpolated) position embedding, then blocks of
``x + drop_path(ls1 * attn(norm1(x)))`` and ``x + drop_path(ls2 * mlp(norm2(x)))``. There is no final norm; the
pooler output is the CLS token. Attention is bidirectional and goes through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling

from internvl.model.configuration import InternVisionConfig


class InternRMSNorm(nn.Module):
    """RMSNorm computed in float32, as the official InternViT (and Qwen2) do."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(input_dtype)


def build_norm(config: InternVisionConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return InternRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_patches + 1, self.embed_dim))

    def grid_position_embedding(self, height: int, width: int) -> torch.Tensor:
        """Patch position embeddings for a ``height x width`` grid: the trained square grid, bicubically resized."""
        side = self.image_size // self.patch_size
        grid = self.position_embedding[:, 1:, :]
        if (height, width) == (side, side):
            return grid
        grid = grid.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(self.position_embedding.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(weight_dtype))  # [N, C, H, W]
        batch_size, _, height, width = patch_embeds.shape
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)  # row-major tokens
        class_embeds = self.class_embedding.expand(batch_size, 1, -1).to(weight_dtype)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        position_embedding = torch.cat(
            [self.position_embedding[:, :1, :], self.grid_position_embedding(height, width)], dim=1
        )
        return embeddings + position_embedding.to(weight_dtype)


class InternAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and optional query/key normalization."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            # Normalizes the full query/key vectors (all heads together), as the official model does.
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        query, key, value = self.qkv(hidden_states).chunk(3, dim=-1)
        if self.qk_normalization:
            query, key = self.q_norm(query), self.k_norm(key)

        def split_heads(states: torch.Tensor) -> torch.Tensor:
            return states.view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        attn_output = F.scaled_dot_product_attention(
            split_heads(query),
            split_heads(key),
            split_heads(value),
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        attn_output = attn_output.transpose(1, 2).reshape(batch_size, seq_len, self.embed_dim)
        return self.proj_drop(self.proj(attn_output))


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: InternVisionConfig, drop_path_rate: float):
        super().__init__()
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = build_norm(config)
        self.norm2 = build_norm(config)
        # Layer scale; initialised from ``initializer_factor`` like the official model.
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.drop_path1(self.attn(self.norm1(hidden_states)) * self.ls1)
        return hidden_states + self.drop_path2(self.mlp(self.norm2(hidden_states)) * self.ls2)


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        # Stochastic depth grows linearly from 0 to ``drop_path_rate`` over the layers.
        rates = torch.linspace(
            0, config.drop_path_rate, config.num_hidden_layers, dtype=torch.float64, device="cpu"
        ).tolist()
        self.layers = nn.ModuleList([InternVisionEncoderLayer(config, rate) for rate in rates])
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict = {}

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        # Checkpointing only pays off when a backward pass will run (a frozen tower runs under no_grad).
        use_checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_checkpointing:
                hidden_states = checkpoint(layer, hidden_states, **self.checkpoint_kwargs)
            else:
                hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states


class InternVisionModel(PreTrainedModel):
    config_class = InternVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "vision_model"
    _no_split_modules = ["InternVisionEncoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def __init__(self, config: InternVisionConfig):
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, InternVisionEmbeddings):
            init.normal_(module.class_embedding, std=self.config.initializer_range)
            init.normal_(module.position_embedding, std=self.config.initializer_range)
        elif isinstance(module, InternVisionEncoderLayer):
            init.constant_(module.ls1, self.config.initializer_factor)
            init.constant_(module.ls2, self.config.initializer_factor)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, return_dict: bool = True
    ) -> BaseModelOutputWithPooling | tuple:
        """``last_hidden_state`` [N, 1 + patches, C]; ``pooler_output`` is the CLS token; ``hidden_states`` has
        num_layers + 1 entries (index 0 = embeddings) when ``output_hidden_states``."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [num_tiles, 3, H, W], got shape {tuple(pixel_values.shape)}")
        hidden_states = self.embeddings(pixel_values)
        last_hidden_state, all_hidden_states = self.encoder(hidden_states, output_hidden_states=output_hidden_states)
        pooled_output = last_hidden_state[:, 0, :]
        if not return_dict:
            return (last_hidden_state, pooled_output, all_hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooled_output, hidden_states=all_hidden_states
        )
