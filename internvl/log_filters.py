"""Known-benign messages of the dependencies, filtered on the loggers that emit them, so that what a run prints is
what matters. Each process would print them, some at every start; each entry says why it is benign.

Installed when the package is imported (``internvl/__init__.py``), before any of those libraries is.
"""

from __future__ import annotations

import logging
import re

BENIGN_MESSAGES: dict[str, re.Pattern] = {
    # bitsandbytes on CPUs with AVX512-BF16 tries to fetch a faster 4-bit CPU kernel through the optional `kernels`
    # package (from the Hugging Face Hub) when it is imported; without it, it uses its own kernel.
    "bitsandbytes.backends.cpu.ops": re.compile(r"^Failed to load CPU gemm_4bit_forward from kernels-community"),
    # With DeepSpeed the HF Trainer gives accelerate's plugin 1 accumulation step and DeepSpeed's config, which it
    # filled from --gradient_accumulation_steps, the real value; accelerate takes DeepSpeed's, as it should.
    "accelerate.accelerator": re.compile(
        r"Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has \d+\. "
        r"Using DeepSpeed's value\."
    ),
    # torch's extension builder on a machine without CUDA (DeepSpeed's CPU ops need none).
    "torch.utils.cpp_extension": re.compile(r"^No CUDA runtime is found"),
}


class DropBenignMessages(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install() -> None:
    """Add the filters (once per logger, however often it is called)."""
    for name, pattern in BENIGN_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropBenignMessages) for f in logger.filters):
            logger.addFilter(DropBenignMessages(pattern))
