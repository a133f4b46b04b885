"""InternVL3 4-bit QLoRA fine-tuning toolkit for video summarization."""

__version__ = "0.1.0"
