"""Token strings and numeric constants shared by the model, the data pipeline and the tools.

The special tokens and their order match the official InternVL checkpoints (ids 151665..151673 in the
Qwen2-based InternVL3 tokenizer).
"""

from pathlib import Path

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
QUAD_START_TOKEN = "<quad>"
QUAD_END_TOKEN = "</quad>"
REF_START_TOKEN = "<ref>"
REF_END_TOKEN = "</ref>"
BOX_START_TOKEN = "<box>"
BOX_END_TOKEN = "</box>"

# The order in which the official fine-tune script adds them: it fixes their ids.
INTERNVL_SPECIAL_TOKENS = (
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    QUAD_START_TOKEN,
    QUAD_END_TOKEN,
    REF_START_TOKEN,
    REF_END_TOKEN,
    BOX_START_TOKEN,
    BOX_END_TOKEN,
)

# ChatML tokens of the Qwen2 tokenizer, in their official order.
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

IGNORE_INDEX = -100

# Shipped configuration files: DeepSpeed JSONs and the InternVL3-8B model config (its true shape, no weights).
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
INTERNVL3_8B_CONFIG = CONFIGS_DIR / "internvl3_8b_config.json"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.4814546, 0.4578275, 0.40821073)
CLIP_STD = (0.2686295, 0.2613025, 0.2757711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
