"""Pre-flight checks for a fine-tuning run: find what would otherwise fail an hour into a GPU job.

``run_setup_checks(settings)`` walks ``SECTIONS`` in order: the machine (Python, torch, GPUs, packages, a real
bitsandbytes NF4 matmul, DeepSpeed), the DeepSpeed config against the batch settings, the model folder (config,
every weight shard, tokenizer and its InternVL tokens), the data (``meta.json``, every record, the referenced videos
and one real batch built by the project's own dataset and collator), the GPU memory the chosen settings need, and
the output folder and its free disk space. Each check takes a ``CheckContext`` (the settings and what earlier checks
found) and returns its ``CheckResult``s with the context it was given, completed: what a check needs from an
earlier one is in the context's fields, so the order below is the whole contract.

``scripts/test_internvl3_setup.py`` prints the report; ``python -m internvl.tools.download`` reuses the model-folder
checks (``check_model_dir``). See docs/SETUP.md.
"""

from __future__ import annotations

from dataclasses import replace

from internvl.tools.checks import data, deepspeed, environment, model, resources
from internvl.tools.checks.context import CheckContext
from internvl.tools.checks.model import check_model_dir
from internvl.tools.checks.results import CheckResult, SetupReport, Status
from internvl.tools.checks.settings import SetupSettings

SECTIONS = (
    ("Python, torch and GPUs", (environment.check_python_and_gpus,)),  # -> gpu_memory
    ("Packages", (environment.check_packages, environment.check_bitsandbytes)),
    ("DeepSpeed", (deepspeed.check_runtime, deepspeed.check_config)),  # -> deepspeed_config
    ("Model", (model.check_model,)),  # -> model_config, tokenizer
    ("Data", (data.check_data,)),  # tokenizer, model_config -> answer_tokens
    ("Memory and disk", (resources.check_memory, resources.check_output_dir)),  # all of the above -> estimates
)


def run_setup_checks(settings: SetupSettings) -> SetupReport:
    context = CheckContext(settings)
    results = []
    for title, checks in SECTIONS:
        for check in checks:
            found, context = check(context)
            results += [replace(result, section=title) for result in found]
    return SetupReport(results, memory_estimate=context.memory_estimate, disk_estimate=context.disk_estimate)


__all__ = [
    "SECTIONS",
    "CheckContext",
    "CheckResult",
    "SetupReport",
    "SetupSettings",
    "Status",
    "check_model_dir",
    "run_setup_checks",
]
