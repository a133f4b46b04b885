"""What one section of checks hands to the next: the settings, and what earlier checks found on the way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from internvl.tools.checks.results import CheckResult
from internvl.tools.checks.settings import SetupSettings
from internvl.tools.resource_estimates import DiskEstimate, MemoryEstimate


@dataclass(frozen=True)
class CheckContext:
    """Every check takes one and returns it with what it found filled in (``dataclasses.replace``); a field left
    ``None`` means that the check producing it did not get that far, and later checks say so or assume defaults."""

    settings: SetupSettings
    gpu_memory: tuple[int, ...] = ()  # total bytes per visible GPU (environment)
    deepspeed_config: dict | None = None  # the DeepSpeed JSON (deepspeed)
    model_config: Any = None  # InternVLChatConfig of the model folder (model)
    tokenizer: Any = None  # the model folder's tokenizer, with the InternVL tokens (model)
    answer_tokens: int | None = None  # the most supervised tokens of one record (data)
    memory_estimate: MemoryEstimate | None = None  # (resources)
    disk_estimate: DiskEstimate | None = None  # (resources)


# What every check returns: its results, and the context it was given with what it found filled in.
Checked = tuple[list[CheckResult], CheckContext]
