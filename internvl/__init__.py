"""InternVL3 4-bit QLoRA fine-tuning toolkit for video summarization."""

from internvl import log_filters

__version__ = "0.1.0"

log_filters.install()
