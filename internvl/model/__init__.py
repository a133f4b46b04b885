"""InternVL chat model: configs, InternViT, the composite model and its loaders."""

from internvl.model.adapters import load_model_for_inference
from internvl.model.configuration import InternVisionConfig, InternVLChatConfig
from internvl.model.internvl_chat import InternVLChatModel
from internvl.model.loading import build_bnb_config, load_internvl_model, load_tokenizer
from internvl.model.vision import InternVisionModel

__all__ = [
    "InternVisionConfig",
    "InternVLChatConfig",
    "InternVisionModel",
    "InternVLChatModel",
    "build_bnb_config",
    "load_internvl_model",
    "load_model_for_inference",
    "load_tokenizer",
]
