"""Pre-flight checks for a fine-tuning run: find what would otherwise fail an hour into a GPU job.

``SetupChecker(settings).run()`` goes through the machine (Python, torch, GPUs, packages, a real bitsandbytes NF4
matmul, DeepSpeed), the DeepSpeed config against the batch settings, the model folder (config, every weight
shard, tokenizer and its InternVL tokens), the data (``meta.json``, every JSONL line, the referenced videos and
one real batch built by the project's own dataset and collator), the GPU memory the chosen settings need, and
the output folder and its free disk space. Each finding is a ``CheckResult``: ok, warning, or failure with the
fix. ``SetupSettings.from_launcher`` reads the settings exactly as ``internvl.train.launch`` builds the training
command, so the checks see what training will see.

``scripts/test_internvl3_setup.py`` prints the results; ``scripts/download_internvl3_models.sh`` reuses the
model-folder checks (``check_model_dir``). The memory and disk estimates come from
``internvl.tools.resource_estimates``; ``docs/SETUP.md`` documents the formulas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import io
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from internvl.constants import (
    CHATML_SPECIAL_TOKENS,
    IGNORE_INDEX,
    IMG_CONTEXT_TOKEN,
    INTERNVL3_8B_CONFIG,
    INTERNVL_SPECIAL_TOKENS,
)
from internvl.tools.resource_estimates import (
    GIB,
    DiskEstimate,
    MemoryEstimate,
    estimate_disk_usage,
    estimate_gpu_memory,
)

if TYPE_CHECKING:
    from internvl.model.dims import ModelDims

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS_FILE = REPO_ROOT / "requirements_official.txt"
DOWNLOAD_COMMAND = "bash scripts/download_internvl3_models.sh"
PREPARE_COMMAND = "python scripts/prepare_internvl3_finetuning.py --input <annotations> --output-dir internvl3_data"

OK, WARN, FAIL = "ok", "warn", "fail"
STATUS_SYMBOLS = {OK: "✅", WARN: "⚠️ ", FAIL: "❌"}

# Needed only by evaluation and plots: a missing one is a warning, not a blocker for training.
EVALUATION_PACKAGES = {"rouge-score", "sacrebleu", "pycocoevalcap", "matplotlib"}
# Distributions whose import name differs from the distribution name.
IMPORT_NAMES = {"pillow": "PIL", "rouge-score": "rouge_score"}
# Tensors every InternVL3 checkpoint has under the official names; their absence means a wrong or partial folder.
ESSENTIAL_TENSORS = (
    "vision_model.embeddings.patch_embedding.weight",
    "mlp1.1.weight",
    "language_model.model.embed_tokens.weight",
    "language_model.lm_head.weight",
)
CONVERSATION_ROLES = ("human", "gpt", "system")
# Supervised tokens per sample assumed by the memory estimate when the data cannot be read.
ASSUMED_ANSWER_TOKENS = 512
MAX_LISTED = 5


# --------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class SetupSettings:
    """The run the checks are about: the launcher's environment plus the training arguments it builds."""

    model_path: Path
    meta_path: Path
    deepspeed_config: Path
    output_dir: Path
    gpus: int  # processes per node
    nnodes: int
    per_device_batch_size: int
    batch_size: int
    gradient_accumulation: int
    model_args: Any  # internvl.train.arguments.ModelArguments, as training parses it
    data_args: Any  # internvl.train.arguments.DataTrainingArguments
    save_total_limit: int | None = None
    evaluation_requested: bool = False
    overwrite_output_dir: bool = False
    # What the launcher refuses (e.g. a BATCH_SIZE that does not divide), reported as a failure.
    launch_error: str | None = None
    # Check every referenced video/image instead of a sample per dataset.
    full_media_check: bool = False
    media_sample_size: int = 64

    @property
    def lora_rank(self) -> int:
        return self.model_args.use_llm_lora

    @classmethod
    def from_launcher(
        cls,
        environ: Mapping[str, str] | None = None,
        training_args: Sequence[str] = (),
        visible_gpus: int | None = None,
    ) -> "SetupSettings":
        """The settings ``internvl.train.launch`` would run with: its environment variables (``GPUS``,
        ``BATCH_SIZE``, ``MODEL_PATH``, ...) and defaults, then ``training_args`` appended as the launcher does."""
        from transformers import HfArgumentParser

        from internvl.train.arguments import (
            DataTrainingArguments,
            ModelArguments,
            resolve_deepspeed_config,
            strip_unsupported_flags,
        )
        from internvl.train.launch import DEFAULTS, flag_values, resolve_plan

        environ = dict(os.environ if environ is None else environ)
        if visible_gpus is None:
            import torch

            visible_gpus = torch.cuda.device_count()
        launch_error = None
        try:
            plan = resolve_plan(environ, list(training_args), visible_gpus)
            args = plan.train_args
            gpus, nnodes = plan.nproc_per_node, plan.nnodes
            per_device, batch_size = plan.per_device_batch_size, plan.batch_size
        except ValueError as error:
            # The launcher would stop here; keep checking everything else with the values as given.
            launch_error = str(error)
            env = {k: v for k, v in environ.items() if v}

            def get(name: str) -> str:
                return env.get(name) or DEFAULTS[name]

            args = [
                "--model_name_or_path", get("MODEL_PATH"), "--meta_path", get("META_PATH"),
                "--output_dir", get("OUTPUT_DIR"), "--deepspeed", get("DEEPSPEED_CONFIG"),
                "--use_llm_lora", str(_int_or(get("LORA_RANK"), int(DEFAULTS["LORA_RANK"]))),
                *training_args,
            ]  # fmt: skip
            default_gpus = visible_gpus or int(DEFAULTS["CPU_PROCESSES"])
            gpus = _int_or(env.get("GPUS") or env.get("SLURM_GPUS_ON_NODE"), default_gpus)
            nnodes = _int_or(env.get("NNODES") or env.get("SLURM_NNODES"), 1)
            per_device = _int_or(get("PER_DEVICE_BATCH_SIZE"), int(DEFAULTS["PER_DEVICE_BATCH_SIZE"]))
            batch_size = _int_or(get("BATCH_SIZE"), int(DEFAULTS["BATCH_SIZE"]))

        parser = HfArgumentParser((ModelArguments, DataTrainingArguments))
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                model_args, data_args, rest = parser.parse_args_into_dataclasses(
                    args=strip_unsupported_flags(list(args)), return_remaining_strings=True
                )
        except SystemExit:
            raise ValueError(f"training arguments rejected: {stderr.getvalue().strip().splitlines()[-1]}") from None
        flags = flag_values(rest)
        deepspeed = flags.get("deepspeed", "")
        try:
            deepspeed = resolve_deepspeed_config(deepspeed) or deepspeed
        except FileNotFoundError:
            pass  # reported by the DeepSpeed config check, with the shipped alternatives
        per_step = per_device * gpus * nnodes
        return cls(
            model_path=Path(model_args.model_name_or_path),
            meta_path=Path(data_args.meta_path),
            deepspeed_config=Path(deepspeed),
            output_dir=Path(flags.get("output_dir", "")),
            gpus=gpus,
            nnodes=nnodes,
            per_device_batch_size=per_device,
            batch_size=batch_size,
            gradient_accumulation=max(1, batch_size // max(1, per_step)),
            model_args=model_args,
            data_args=data_args,
            save_total_limit=_int_or(flags.get("save_total_limit"), None),
            evaluation_requested=_is_true(flags.get("do_eval")) or flags.get("eval_strategy", "no") != "no",
            overwrite_output_dir=_is_true(flags.get("overwrite_output_dir")),
            launch_error=launch_error,
        )


def _int_or(value: Any, default: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _is_true(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


# --------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class CheckResult:
    name: str
    status: str
    message: str
    fix: str | None = None
    section: str = ""

    def format(self) -> str:
        line = f"{STATUS_SYMBOLS[self.status]} {self.name}: {self.message}"
        if self.fix:
            line += f"\n     fix: {self.fix}"
        return line


def _ok(name: str, message: str) -> CheckResult:
    return CheckResult(name, OK, message)


def _warn(name: str, message: str, fix: str | None = None) -> CheckResult:
    return CheckResult(name, WARN, message, fix)


def _fail(name: str, message: str, fix: str) -> CheckResult:
    return CheckResult(name, FAIL, message, fix)


@dataclass
class SetupReport:
    results: list[CheckResult] = field(default_factory=list)
    memory_estimate: MemoryEstimate | None = None
    disk_estimate: DiskEstimate | None = None

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == FAIL]

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.results) for status in (OK, WARN, FAIL)}

    def format_text(self) -> str:
        lines, section = [], None
        for result in self.results:
            if result.section != section:
                section = result.section
                lines.append(f"\n== {section} ==")
            lines.append(result.format())
        counts = self.counts()
        verdict = "ready to train" if not counts[FAIL] else "fix the ❌ items above before training"
        lines.append(f"\n{counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} failures: {verdict}.")
        return "\n".join(lines).lstrip("\n")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.failures,
            "counts": self.counts(),
            "checks": [dataclasses.asdict(r) for r in self.results],
            "memory_estimate": self.memory_estimate.to_dict() if self.memory_estimate else None,
            "disk_estimate": self.disk_estimate.to_dict() if self.disk_estimate else None,
        }


# --------------------------------------------------------------------------------------------------------------
# Small helpers


def _read_json(path: Path) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, "file:line:col: reason")`` for a file that is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except json.JSONDecodeError as error:
        return None, f"{path}:{error.lineno}:{error.colno}: {error.msg}"
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{path}: {error}"


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:MAX_LISTED])
    return shown + (f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def _size(num_bytes: float) -> str:
    if num_bytes >= GIB:
        return f"{num_bytes / GIB:.1f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _record_problem(record: dict) -> str | None:
    """What makes a record unusable for training, checked before the run (the dataset would skip it)."""
    conversations = record["conversations"]
    for turn in conversations:
        valid = isinstance(turn, dict) and turn.get("from") in CONVERSATION_ROLES and isinstance(turn.get("value"), str)
        if not valid:
            return f"each turn needs 'from' in {CONVERSATION_ROLES} and a string 'value', got {str(turn)[:80]}"
    if not any(turn["from"] == "gpt" and turn["value"].strip() for turn in conversations):
        return "no non-empty 'gpt' turn: nothing to train on"
    if not any(turn["from"] == "human" for turn in conversations):
        return "no 'human' turn"
    video, image = record.get("video"), record.get("image")
    if video is not None and not isinstance(video, str):
        return f"'video' must be a path string, got {video!r}"
    paths = image if isinstance(image, list) else [image]
    if image is not None and not all(isinstance(p, str) for p in paths):
        return f"'image' must be a path or a list of paths, got {image!r}"
    return None


def _media_paths(record: dict) -> list[str]:
    if record.get("image"):
        return record["image"] if isinstance(record["image"], list) else [record["image"]]
    return [record["video"]] if record.get("video") else []


def _media_missing(path: str) -> str | None:
    if path.endswith("/") or os.path.isdir(path):
        if not os.path.isdir(path):
            return "frame folder not found"
        with os.scandir(path) as entries:
            return None if any(entries) else "frame folder is empty"
    if not os.path.isfile(path):
        return "not found"
    return None if os.path.getsize(path) > 0 else "empty file"


# --------------------------------------------------------------------------------------------------------------
# The checks


class SetupChecker:
    """Runs the checks in order; later checks use what earlier ones loaded (config, tokenizer, DeepSpeed JSON)."""

    def __init__(self, settings: SetupSettings | None = None):
        self.settings = settings
        self.report = SetupReport()
        self.gpu_memory: list[int] = []  # total bytes per visible GPU
        self.deepspeed_config: dict | None = None
        self.model_config = None
        self.tokenizer = None
        self.answer_tokens: int | None = None  # the most supervised tokens of one record, from the data

    def run(self) -> SetupReport:
        self._section("Python, torch and GPUs", self.check_python_and_gpus())
        self._section("Packages", self.check_packages() + self.check_bitsandbytes())
        self._section("DeepSpeed", self.check_deepspeed_runtime() + self.check_deepspeed_config())
        self._section("Model", self.check_model(self.settings.model_path))
        self._section("Data", self.check_data())
        self._section("Memory and disk", self.check_memory() + self.check_output_dir())
        return self.report

    def _section(self, title: str, results: Iterable[CheckResult]) -> None:
        for result in results:
            result.section = title
            self.report.results.append(result)

    # -- Python, torch, GPUs ---------------------------------------------------------------------------------

    def check_python_and_gpus(self) -> list[CheckResult]:
        import torch

        results = []
        version = ".".join(map(str, sys.version_info[:3]))
        if sys.version_info < (3, 10):
            results.append(_fail("Python", f"{version} is too old", "use Python 3.10 or newer (3.11 is tested)"))
        else:
            results.append(_ok("Python", version))
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
        results.append(_ok("torch", f"{torch.__version__} ({build})"))

        requested = self.settings.gpus
        if not torch.cuda.is_available():
            if torch.version.cuda is None and shutil.which("nvidia-smi"):
                results.append(_fail(
                    "GPUs", "this machine has an NVIDIA driver but torch is a CPU-only build",
                    "install the CUDA build of torch, e.g. pip install torch --index-url "
                    "https://download.pytorch.org/whl/cu128",
                ))
            else:
                hidden = " (CUDA_VISIBLE_DEVICES is empty)" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else ""
                results.append(_warn(
                    "GPUs", f"no CUDA GPU visible{hidden}: training runs as {requested} CPU processes, which suits "
                    "the tiny demo model, not InternVL3-8B",
                    "run on a machine with NVIDIA GPUs for real training",
                ))
            return results

        count = torch.cuda.device_count()
        devices = [torch.cuda.get_device_properties(i) for i in range(count)]
        self.gpu_memory = [d.total_memory for d in devices]
        names = ", ".join(f"{d.name} ({_size(d.total_memory)})" for d in devices)
        if requested > count:
            results.append(_fail(
                "GPUs", f"GPUS={requested} but only {count} visible: {names}",
                f"set GPUS={count}, or make more GPUs visible (CUDA_VISIBLE_DEVICES)",
            ))
        else:
            results.append(_ok("GPUs", f"{count} visible, training on {requested}: {names}"))
        old = [f"{d.name} (sm_{d.major}{d.minor})" for d in devices[:requested] if (d.major, d.minor) < (8, 0)]
        if old:
            results.append(_fail(
                "bf16", f"training runs in bf16, which needs compute capability 8.0+; {', '.join(old)} lack it",
                "use Ampere or newer GPUs (A100, A10, L4, L40, RTX 30xx/40xx, H100/H200)",
            ))
        else:
            results.append(_ok("bf16", "supported"))
        if requested * self.settings.nnodes > 1 and not torch.distributed.is_nccl_available():
            results.append(_fail(
                "NCCL", "multi-GPU training needs NCCL, which this torch build lacks",
                "install the CUDA build of torch from https://download.pytorch.org/whl/",
            ))
        return results

    # -- Packages ------------------------------------------------------------------------------------------------

    def check_packages(self) -> list[CheckResult]:
        """Every package of requirements_official.txt: installed, importable, and inside the supported range."""
        from packaging.requirements import Requirement
        from packaging.version import Version

        if not REQUIREMENTS_FILE.is_file():
            return [_warn("requirements", f"{REQUIREMENTS_FILE} not found; package versions not checked")]
        results = []
        for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            requirement = Requirement(line)
            name = requirement.name
            optional = name in EVALUATION_PACKAGES
            install = f"pip install '{requirement}'"
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                if optional:
                    results.append(_warn(name, "not installed (needed for evaluation and plots only)", install))
                else:
                    results.append(_fail(name, "not installed", install))
                continue
            try:
                importlib.import_module(IMPORT_NAMES.get(name, name.replace("-", "_")))
            except Exception as error:  # a broken install raises anything from ImportError to OSError
                results.append(_fail(name, f"{version} is installed but does not import: {error}",
                                     f"{install} --force-reinstall"))
                continue
            if requirement.specifier.contains(version, prereleases=True):
                results.append(_ok(name, version))
                continue
            minimums = [s.version for s in requirement.specifier if s.operator in (">=", ">", "==", "~=")]
            too_old = any(Version(version) < Version(minimum) for minimum in minimums)
            message = f"{version} is outside the supported range {requirement.specifier}"
            if too_old and not optional:
                results.append(_fail(name, message, install))
            else:
                results.append(_warn(name, message + " (untested)", install))
        return results

    def check_bitsandbytes(self) -> list[CheckResult]:
        """Quantize a small weight to NF4; compare the 4-bit matmul and its input gradient with the dequantized one."""
        name = "bitsandbytes NF4"
        fix = "reinstall bitsandbytes for this platform (pip install -U bitsandbytes), then run python -m bitsandbytes"
        try:
            import bitsandbytes as bnb
            import torch
            from bitsandbytes.functional import dequantize_4bit

            device = "cuda" if torch.cuda.is_available() else "cpu"
            generator = torch.Generator().manual_seed(0)
            weight = torch.randn(64, 128, generator=generator)
            # The storage dtype the recipe uses (see internvl.model.loading.build_bnb_config).
            layer = bnb.nn.Linear4bit(
                128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", quant_storage=torch.bfloat16
            )
            layer.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16
            )
            layer = layer.to(device)  # quantizes
            x = torch.randn(4, 128, generator=generator).to(device, torch.bfloat16).requires_grad_()
            out = layer(x)
            out.float().sum().backward()

            dequantized = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            reference = x.detach().float() @ dequantized.t()
            grad_reference = torch.ones_like(reference) @ dequantized

            def relative_error(a, b):
                return ((a.float() - b).norm() / b.norm()).item()

            quantization_error = relative_error(dequantized.cpu(), weight)
            forward_error = relative_error(out.detach(), reference)
            backward_error = relative_error(x.grad, grad_reference)
        except Exception as error:
            return [_fail(name, f"4-bit smoke test raised {type(error).__name__}: {error}", fix)]
        # NF4 keeps ~10% relative error on Gaussian weights; bf16 matmuls agree with the reference to ~1e-2.
        if quantization_error > 0.15 or forward_error > 0.02 or backward_error > 0.02:
            return [_fail(
                name, f"wrong results on {device}: quantization error {quantization_error:.3f}, matmul error "
                f"{forward_error:.3f}, gradient error {backward_error:.3f}", fix,
            )]
        return [_ok(name, f"quantize + matmul + backward on {device} match the dequantized reference "
                          f"(error {forward_error:.1e})")]

    # -- DeepSpeed -------------------------------------------------------------------------------------------

    def check_deepspeed_runtime(self) -> list[CheckResult]:
        try:
            import deepspeed
            import torch
            from deepspeed.accelerator import get_accelerator
        except Exception as error:
            return [_fail("deepspeed", f"does not import: {error}", "pip install 'deepspeed>=0.19.3,<0.20'")]
        accelerator = get_accelerator().device_name()
        if torch.cuda.is_available() and accelerator != "cuda":
            return [_fail(
                "accelerator", f"DeepSpeed selected '{accelerator}' although CUDA GPUs are visible",
                "unset DS_ACCELERATOR (or set DS_ACCELERATOR=cuda)",
            )]
        if accelerator == "cpu":
            return [_warn("accelerator", f"DeepSpeed {deepspeed.__version__} runs on the CPU accelerator (gloo)")]
        return [_ok("accelerator", f"DeepSpeed {deepspeed.__version__} on {accelerator}")]

    def check_deepspeed_config(self) -> list[CheckResult]:
        path = self.settings.deepspeed_config
        name = "DeepSpeed config"
        if not path.is_file():
            from internvl.train.arguments import resolve_deepspeed_config

            try:
                resolve_deepspeed_config(str(path))
            except FileNotFoundError as error:  # names the configs shipped in configs/
                return [_fail(name, str(error), "set DEEPSPEED_CONFIG to a file, or to a name shipped in configs/")]
        config, error = _read_json(path)
        if error:
            return [_fail(name, f"not valid JSON: {error}", "fix the JSON syntax at that position")]
        if not isinstance(config, dict):
            return [_fail(name, f"{path} must hold a JSON object", "start from configs/zero_stage3_config.json")]
        self.deepspeed_config = config

        results = []
        zero = config.get("zero_optimization") or {}
        try:
            from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

            # DeepSpeed's own schema (unknown keys raise); "auto" values are filled in later by the HF Trainer.
            DeepSpeedZeroConfig(**{k: v for k, v in zero.items() if not _is_auto(v)})
        except Exception as error:
            detail = " ".join(str(error).strip().splitlines()[:3])
            results.append(_fail(name, f"invalid zero_optimization in {path}: {detail}",
                                 "fix or remove the reported key (see DeepSpeed's ZeRO configuration docs)"))
        stage = _int_or(zero.get("stage", 0), 0)
        offload = {part: (zero.get(part) or {}).get("device", "none")
                   for part in ("offload_param", "offload_optimizer")}
        for part, device in offload.items():
            nvme_path = (zero.get(part) or {}).get("nvme_path")
            if device == "nvme" and not (nvme_path and os.access(nvme_path, os.W_OK)):
                results.append(_fail(name, f"{part} uses nvme but nvme_path {nvme_path!r} is not a writable folder",
                                     f"set zero_optimization.{part}.nvme_path in {path} to a writable NVMe folder"))
        if (config.get("fp16") or {}).get("enabled") is True and (config.get("bf16") or {}).get("enabled") is True:
            results.append(_fail(name, "fp16 and bf16 are both enabled", 'set both to "auto" (the run uses bf16)'))
        if not results:
            results.append(_ok(name, f"{path}: ZeRO stage {stage}, offload parameters={offload['offload_param']}, "
                                     f"optimizer={offload['offload_optimizer']}"))
        results += self._check_batch_settings(config)
        results += self._check_deepspeed_ops(offload["offload_optimizer"] == "cpu")
        return results

    def _check_batch_settings(self, config: dict) -> list[CheckResult]:
        s = self.settings
        name = "batch size"
        if s.launch_error:
            return [_fail(name, f"the launcher refuses these settings: {s.launch_error}",
                          "set GPUS, PER_DEVICE_BATCH_SIZE and BATCH_SIZE so that BATCH_SIZE is a multiple of "
                          "PER_DEVICE_BATCH_SIZE × GPUS × NNODES")]
        world = s.gpus * s.nnodes
        expected = {
            "train_micro_batch_size_per_gpu": (s.per_device_batch_size, "PER_DEVICE_BATCH_SIZE"),
            "gradient_accumulation_steps": (
                s.gradient_accumulation, "BATCH_SIZE / (PER_DEVICE_BATCH_SIZE × GPUS × NNODES)"
            ),
            "train_batch_size": (s.batch_size, "BATCH_SIZE"),
        }
        results = []
        for key, (wanted, source) in expected.items():
            value = config.get(key, "auto")
            if _is_auto(value):
                continue
            if value != wanted:
                results.append(_fail(
                    name, f"{s.deepspeed_config} sets {key}={value!r}, but {source} = {wanted} (GPUS={s.gpus}, "
                    f"NNODES={s.nnodes}, PER_DEVICE_BATCH_SIZE={s.per_device_batch_size}, BATCH_SIZE={s.batch_size})",
                    f'set "{key}": "auto" in {s.deepspeed_config} (the Trainer fills it in), or change the '
                    "environment to match it",
                ))
        if not results:
            results.append(_ok(name, f"{s.batch_size} = {world} process(es) × {s.per_device_batch_size} per device × "
                                     f"{s.gradient_accumulation} accumulation steps"))
        return results

    def _check_deepspeed_ops(self, offload_optimizer: bool) -> list[CheckResult]:
        """DeepSpeedCPUAdam (optimizer offload) and DeepSpeed's CPU communication op are compiled on first use."""
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops

        on_cpu = get_accelerator().device_name() == "cpu"
        if not (on_cpu or (offload_optimizer and not installed_ops.get("cpu_adam"))):
            return []
        from torch.utils.cpp_extension import is_ninja_available

        compiler = os.environ.get("CXX", "c++")
        tools = (("a C++ compiler", shutil.which(compiler)), ("ninja", is_ninja_available()))
        missing = [what for what, present in tools if not present]
        if missing:
            return [_fail(
                "DeepSpeed ops", f"DeepSpeed compiles CPU Adam and its CPU communication op on first use, which needs "
                f"{' and '.join(missing)}",
                "install them (apt install g++; pip install ninja), or pre-build the op: DS_BUILD_CPU_ADAM=1 pip "
                "install --no-cache-dir --force-reinstall deepspeed",
            )]
        return [_ok("DeepSpeed ops", f"compiler ({compiler}) and ninja present for the first-use build "
                                     "(about a minute)")]

    # -- Model folder ----------------------------------------------------------------------------------------

    def check_model(self, path: Path) -> list[CheckResult]:
        """Config, every weight shard and the tokenizer of an official-layout InternVL checkpoint folder."""
        if not path.is_dir():
            return [_fail("model folder", f"{path} does not exist", f"{DOWNLOAD_COMMAND} (or set MODEL_PATH)")]
        return self._check_model_config(path) + self._check_weights(path) + self._check_tokenizer(path)

    def _check_model_config(self, path: Path) -> list[CheckResult]:
        name = "model config"
        config_file = path / "config.json"
        if not config_file.is_file():
            return [_fail(name, f"{config_file} is missing", f"re-run {DOWNLOAD_COMMAND}")]
        raw, error = _read_json(config_file)
        if error:
            return [_fail(name, f"not valid JSON: {error}", f"re-run {DOWNLOAD_COMMAND}")]
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        if model_type != "internvl_chat":
            return [_fail(name, f"{config_file}: model_type is {model_type!r}, expected 'internvl_chat'",
                          "point MODEL_PATH at an InternVL checkpoint in the official layout (e.g. "
                          "OpenGVLab/InternVL3-8B, not an '-hf' conversion)")]
        required = {
            "llm_config": ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size"),
            "vision_config": ("hidden_size", "image_size", "patch_size", "num_hidden_layers", "intermediate_size"),
        }  # fmt: skip
        missing = [f"{part}.{key}" for part, keys in required.items()
                   for key in keys if key not in (raw.get(part) or {})]
        if missing:
            return [_fail(name, f"{config_file} lacks {', '.join(missing)}",
                          "restore config.json from the checkpoint's repository")]
        try:
            from internvl.model.configuration import InternVLChatConfig

            config = InternVLChatConfig.from_pretrained(path)
        except Exception as error:
            return [_fail(name, f"{config_file} does not load: {error}",
                          "use an InternVL2.5/InternVL3 checkpoint with a Qwen2.5 or Llama language model")]
        self.model_config = config
        llm = config.llm_config
        results = [_ok(name, f"{llm.architectures[0]}, {llm.num_hidden_layers} layers, hidden {llm.hidden_size}, "
                             f"vocab {llm.vocab_size}, {config.num_image_token} tokens per {config.image_size}px tile")]
        # Training replaces the config's template and checks its downsample ratio with these arguments.
        data_args = self.settings.data_args if self.settings else None
        template = data_args.conv_style if data_args else config.template
        if template not in (None, "internvl2_5"):
            results.append(_warn(
                "chat template", f"the template is {template!r}; InternVL3 is trained with 'internvl2_5'",
                "use --conv_style internvl2_5 (other templates are known to collapse the loss)",
            ))
        if data_args and data_args.down_sample_ratio != config.downsample_ratio:
            results.append(_fail(
                name, f"--down_sample_ratio {data_args.down_sample_ratio} differs from the checkpoint's "
                f"downsample_ratio {config.downsample_ratio} (the projector's input width depends on it)",
                f"drop --down_sample_ratio or set it to {config.downsample_ratio}",
            ))
        return results

    def _check_weights(self, path: Path) -> list[CheckResult]:
        name = "weights"
        index_file = path / "model.safetensors.index.json"
        single_file = path / "model.safetensors"
        redownload = f"re-run {DOWNLOAD_COMMAND} (it resumes and fetches what is missing)"
        expected_bytes = None
        if index_file.is_file():
            index, error = _read_json(index_file)
            if error:
                return [_fail(name, f"index is not valid JSON: {error}", redownload)]
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                return [_fail(name, f"{index_file} has no weight_map", redownload)]
            expected_bytes = (index.get("metadata") or {}).get("total_size")
            shards = sorted(set(weight_map.values()))
        elif single_file.is_file():
            weight_map, shards = {}, [single_file.name]
        elif list(path.glob("pytorch_model*.bin")):
            return [_fail(name, f"{path} has only pytorch_model*.bin weights; this toolkit loads safetensors only",
                          "download the safetensors release of the checkpoint")]
        else:
            return [_fail(name, f"neither model.safetensors.index.json nor model.safetensors in {path}", redownload)]

        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            return [_fail(name, f"{len(missing)} of {len(shards)} shards named in {index_file.name} are missing: "
                                f"{_listing(missing)}", redownload)]
        from safetensors import safe_open

        shapes: dict[str, list[int]] = {}
        file_bytes, problems = 0, []
        for shard in shards:
            shard_path = path / shard
            size = shard_path.stat().st_size
            try:
                # Reads only the header, and checks that the file is as long as the header says.
                with safe_open(shard_path, framework="pt") as f:
                    keys = set(f.keys())
                    shapes.update({k: list(f.get_slice(k).get_shape()) for k in ESSENTIAL_TENSORS if k in keys})
            except Exception as error:
                hint = " (a Git LFS pointer: run git lfs pull)" if 0 < size < 1024 else ""
                problems.append(f"{shard} ({size} bytes{hint}): {error}")
                continue
            file_bytes += size
            absent = sorted(k for k, s in weight_map.items() if s == shard and k not in keys)
            if absent:
                problems.append(f"{shard} lacks {len(absent)} tensors the index assigns to it, e.g. {absent[0]}")
        if problems:
            return [_fail(name, f"damaged weight files: {_listing(problems)}",
                          f"delete the damaged files and {redownload}")]
        if isinstance(expected_bytes, int) and file_bytes < expected_bytes:
            return [_fail(name, f"the shards hold {file_bytes} bytes but the index declares {expected_bytes}",
                          redownload)]
        missing_tensors = [key for key in ESSENTIAL_TENSORS if key not in shapes]
        if missing_tensors:
            return [_fail(name, f"no {', '.join(missing_tensors)} in {path}: not an InternVL checkpoint in the "
                                "official layout", "point MODEL_PATH at an official-layout InternVL3 checkpoint")]
        if self.model_config is not None:
            llm = self.model_config.llm_config
            embedding = shapes["language_model.model.embed_tokens.weight"]
            if embedding != [llm.vocab_size, llm.hidden_size]:
                return [_fail(name, f"embed_tokens has shape {embedding} but config.json says [vocab_size, "
                                    f"hidden_size] = [{llm.vocab_size}, {llm.hidden_size}]",
                              "config.json and the weights come from different checkpoints; download both again")]
        return [_ok(name, f"{len(shards)} safetensors file(s), {_size(file_bytes)}, every header readable and every "
                          "indexed tensor present")]

    def _check_tokenizer(self, path: Path) -> list[CheckResult]:
        name = "tokenizer"
        restore = ("use the tokenizer files shipped with the InternVL3 checkpoint (tokenizer_config.json, vocab.json, "
                   "merges.txt / tokenizer.json): a plain Qwen2.5 tokenizer lacks the InternVL tokens")
        try:
            from internvl.model.loading import load_tokenizer

            tokenizer = load_tokenizer(path)
        except Exception as error:
            return [_fail(name, f"does not load from {path}: {error}", restore)]
        vocab = tokenizer.get_vocab()
        missing = [t for t in (*INTERNVL_SPECIAL_TOKENS, *CHATML_SPECIAL_TOKENS) if t not in vocab]
        split = [t for t in INTERNVL_SPECIAL_TOKENS
                 if t in vocab and tokenizer(t, add_special_tokens=False)["input_ids"] != [vocab[t]]]
        if missing or split:
            problems = [f"lacks {', '.join(missing)}"] if missing else []
            problems += [f"splits {', '.join(split)} into several tokens"] if split else []
            return [_fail(name, f"{path}: {'; '.join(problems)}", restore)]
        if tokenizer.pad_token_id is None:
            return [_fail(name, f"{path}: no pad token", restore)]
        self.tokenizer = tokenizer
        context_id = vocab[IMG_CONTEXT_TOKEN]
        if self.model_config is not None:
            vocab_size = self.model_config.llm_config.vocab_size
            stored_id = getattr(self.model_config, "img_context_token_id", None)
            if context_id >= vocab_size:
                return [_fail(name, f"{IMG_CONTEXT_TOKEN} has id {context_id} but llm_config.vocab_size is "
                                    f"{vocab_size}: the embedding has no row for it",
                              "the tokenizer belongs to another checkpoint; " + restore)]
            if stored_id is not None and stored_id != context_id:
                return [_fail(name, f"config.json stores img_context_token_id={stored_id} but the tokenizer gives "
                                    f"{IMG_CONTEXT_TOKEN} the id {context_id}",
                              "the tokenizer and config.json come from different checkpoints; " + restore)]
        return [_ok(name, f"{len(tokenizer)} tokens, all InternVL and ChatML tokens present, "
                          f"{IMG_CONTEXT_TOKEN} = {context_id}")]

    # -- Data ----------------------------------------------------------------------------------------------------

    def check_data(self) -> list[CheckResult]:
        from internvl.data.dataset import EVAL_SUFFIX, META_KEYS, load_meta

        s = self.settings
        meta_path = s.meta_path
        if not meta_path.is_file():
            return [_fail("meta.json", f"{meta_path} not found", f"{PREPARE_COMMAND} (or set META_PATH)")]
        raw, error = _read_json(meta_path)
        if error:
            return [_fail("meta.json", f"not valid JSON: {error}", "fix the JSON syntax at that position")]
        try:
            specs = load_meta(meta_path)
        except (OSError, ValueError) as error:
            return [_fail("meta.json", str(error), f"fix {meta_path}, or write it again with {PREPARE_COMMAND}")]
        results = []
        unknown = sorted({f"{name}.{key}" for name, entry in raw.items() for key in entry if key not in META_KEYS})
        if unknown:
            results.append(_warn("meta.json", f"unknown keys are ignored: {', '.join(unknown)}",
                                 f"the official keys are {', '.join(META_KEYS)}"))
        evaluation = [spec.name for spec in specs if spec.is_eval]
        results.append(_ok("meta.json", f"{len(specs) - len(evaluation)} training and {len(evaluation)} evaluation "
                                        f"dataset(s): {', '.join(spec.name for spec in specs)}"))
        if s.evaluation_requested and not evaluation:
            results.append(_fail("meta.json", f"evaluation is requested (--do_eval / --eval_strategy) but {meta_path} "
                                              f"has no dataset whose name ends in {EVAL_SUFFIX!r}",
                                 f"add a '*{EVAL_SUFFIX}' dataset, or drop --do_eval and pass --eval_strategy no"))
        answer_texts: list[list[str]] = []
        for spec in specs:
            results += self._check_annotation(spec, answer_texts)
        if self.tokenizer is not None and answer_texts:
            self.answer_tokens = self._most_answer_tokens(answer_texts)
        if any(r.status == FAIL for r in results):
            results.append(_warn("batch", "not built: fix the data problems above first"))
        else:
            results += self._check_batch()
        return results

    def _check_annotation(self, spec, answer_texts: list[list[str]]) -> list[CheckResult]:
        from internvl.data.dataset import load_jsonl

        name = f"data {spec.name}"
        try:
            records = load_jsonl(spec.annotation)
        except (OSError, ValueError) as error:
            return [_fail(name, str(error), f"fix or remove that line of {spec.annotation}, or rerun the prepare "
                                            "script to write the file again")]
        if not records:
            return [_warn(name, f"{spec.annotation} holds no records; the dataset is left out")]
        problems = []
        for record in records:
            problem = _record_problem(record)
            if problem:
                problems.append(f"{spec.annotation.parent / record['_source']}: {problem}")
            else:
                answer_texts.append([turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"])
        if problems:
            return [_fail(name, f"{len(problems)} of {len(records)} records are unusable: {_listing(problems)}",
                          "fix those lines (the training would skip them)")]

        media = [(record["_source"], os.path.join(spec.root, p)) for record in records for p in _media_paths(record)]
        full = self.settings.full_media_check or len(media) <= self.settings.media_sample_size
        checked = media if full else random.Random(0).sample(media, self.settings.media_sample_size)
        missing = [f"{spec.annotation.parent / source}: {path} ({why})"
                   for source, path in checked if (why := _media_missing(path))]
        scope = f"all {len(media)}" if full else f"a sample of {len(checked)} of {len(media)}"
        if missing:
            return [_fail(name, f"{len(missing)} of {scope} referenced videos/images are unusable: {_listing(missing)}",
                          f"fix the paths (relative to root {spec.root}) or the files; run with --full to list "
                          "every missing file")]
        return [_ok(name, f"{len(records)} record(s) parse; {scope} referenced videos/images present")]

    def _most_answer_tokens(self, answer_texts: list[list[str]]) -> int:
        """The most supervised tokens in one record: its answers plus one <|im_end|> per answer."""
        flat = [text for answers in answer_texts for text in answers]
        counts = iter(len(ids) for ids in self.tokenizer(flat, add_special_tokens=False)["input_ids"])
        return max(sum(next(counts) + 1 for _ in answers) for answers in answer_texts)

    def _check_batch(self) -> list[CheckResult]:
        """Build the longest micro-batch through the project's dataset and collator, as training will."""
        name = "batch"
        if self.tokenizer is None or self.model_config is None:
            return [_warn(name, "not built: the model folder did not pass its checks (see Model above)")]
        import numpy as np

        from internvl.data.collate import InternVLDataCollator
        from internvl.data.dataset import build_datasets

        s, data_args = self.settings, self.settings.data_args
        patch = self.model_config.vision_config.patch_size
        num_image_token = int((data_args.force_image_size // patch) ** 2 * self.model_config.downsample_ratio**2)
        try:
            train, _ = build_datasets(
                s.meta_path, self.tokenizer, num_image_token=num_image_token, **data_args.dataset_options()
            )
            # The longest samples by the dataset's own length estimates: the batch most likely to hit the limit.
            candidates = [(length, part, index) for part in train.datasets for index, length in enumerate(part.lengths)]
            candidates.sort(key=lambda item: item[0], reverse=True)
            samples = []
            for _, part, index in candidates[: s.per_device_batch_size]:
                try:
                    samples.append(part.get_sample(index, np.random.default_rng(0)))
                except Exception as error:
                    return [_fail(name, f"sample {part.describe(index)} cannot be built: {type(error).__name__}: "
                                        f"{error}", "fix or remove that record (training would skip it)")]
            batch = InternVLDataCollator(pad_token_id=self.tokenizer.pad_token_id)(samples)
        except Exception as error:
            return [_fail(name, f"the dataset cannot be built: {type(error).__name__}: {error}",
                          "fix the data or the training arguments as the message says")]

        length = batch["input_ids"].shape[1]
        context_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        context_tokens = int((batch["input_ids"] == context_id).sum())
        real_tiles = int((batch["image_flags"] == 1).sum())
        supervised = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
        if length > data_args.max_seq_length:
            return [_fail(name, f"a sample has {length} tokens, above max_seq_length {data_args.max_seq_length}",
                          "raise --max_seq_length or lower --max_num_frame")]
        if context_tokens != real_tiles * num_image_token:
            return [_fail(name, f"{context_tokens} {IMG_CONTEXT_TOKEN} tokens for {real_tiles} tiles × "
                                f"{num_image_token}: the model rejects such a batch",
                          "rebuild the data with the prepare script; check that the records' <image>/<video> "
                          "placeholders match their media")]
        if min(supervised) == 0:
            return [_fail(name, "a sample has no trained (answer) token left after fitting max_seq_length",
                          "raise --max_seq_length, lower --max_num_frame, or shorten the prompts")]
        frames = batch["pixel_values"].shape[0]
        return [_ok(name, f"{len(samples)} longest sample(s) built and collated: {length} tokens "
                          f"(max_seq_length {data_args.max_seq_length}), {frames} tiles/frames, "
                          f"{sum(supervised)} trained tokens")]

    # -- Memory, output folder, disk ---------------------------------------------------------------------------

    def _dims_for_estimates(self) -> tuple[ModelDims, str]:
        """The checked model's sizes; InternVL3-8B's (the shipped config) when the model folder has no usable config."""
        from internvl.model.dims import ModelDims

        if self.model_config is not None:
            return ModelDims.from_config(self.model_config), ""
        from internvl.model.configuration import InternVLChatConfig

        config = InternVLChatConfig.from_pretrained(INTERNVL3_8B_CONFIG)
        return ModelDims.from_config(config), f" [for InternVL3-8B, {INTERNVL3_8B_CONFIG.name}: no model config read]"

    def check_memory(self) -> list[CheckResult]:
        s = self.settings
        dims, assumption = self._dims_for_estimates()
        zero = (self.deepspeed_config or {}).get("zero_optimization") or {}
        answer_tokens = self.answer_tokens or ASSUMED_ANSWER_TOKENS
        estimate = estimate_gpu_memory(
            dims,
            lora_rank=s.lora_rank,
            micro_batch_size=s.per_device_batch_size,
            max_seq_length=s.data_args.max_seq_length,
            max_num_frame=s.data_args.max_num_frame,
            answer_tokens=answer_tokens,
            num_gpus=s.gpus * s.nnodes,
            zero_stage=_int_or(zero.get("stage", 0), 0),
            offload_param=(zero.get("offload_param") or {}).get("device", "none") != "none",
            offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") != "none",
            double_quant=s.model_args.bnb_4bit_use_double_quant,
        )
        self.report.memory_estimate = estimate
        answers = f"{answer_tokens} answer tokens" + ("" if self.answer_tokens else " assumed (no data read)")
        needs = (f"{estimate.summary()} for micro-batch {s.per_device_batch_size} × {s.data_args.max_seq_length} "
                 f"tokens, ≤{estimate.frames_per_sample} frames, {answers}, LoRA r={s.lora_rank}{assumption}")
        if not self.gpu_memory:
            return [_warn("GPU memory", f"no GPU to compare with; these settings need {needs}")]
        available = min(self.gpu_memory[: max(1, s.gpus)])
        lower = ("lower PER_DEVICE_BATCH_SIZE (keep BATCH_SIZE: accumulation grows), --max_seq_length or "
                 "--max_num_frame, or use a config with CPU offload (DEEPSPEED_CONFIG=zero_stage3_config.json)")
        if estimate.peak > available:
            return [_fail("GPU memory", f"needs {needs}; the smallest GPU has {_size(available)}", lower)]
        if estimate.peak > 0.9 * available:
            return [_warn("GPU memory", f"needs {needs}; the smallest GPU has {_size(available)}, little margin",
                          lower)]
        return [_ok("GPU memory", f"needs {needs}; the smallest GPU has {_size(available)}")]

    def check_output_dir(self) -> list[CheckResult]:
        from internvl.train.checkpoint import last_complete_checkpoint

        s = self.settings
        target = s.output_dir
        if target.exists() and not target.is_dir():
            return [_fail("output folder", f"{target} exists and is not a folder", "set OUTPUT_DIR to a folder path")]
        probe_dir = target if target.is_dir() else _existing_ancestor(target)
        try:
            with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".write-test-"):
                pass
        except OSError as error:
            return [_fail("output folder", f"cannot write in {probe_dir}: {error}",
                          "set OUTPUT_DIR to a writable location")]
        checkpoint, _ = last_complete_checkpoint(target)
        if checkpoint is None:
            results = [_ok("output folder", f"{target} is writable")]
        elif s.overwrite_output_dir:
            results = [_warn("output folder", f"{target} holds checkpoints up to {checkpoint.name}; "
                                              "--overwrite_output_dir deletes them when training starts")]
        else:
            results = [_ok("output folder", f"{target} is writable; training resumes from {checkpoint.name} "
                                            "(pass --overwrite_output_dir True to start over)")]

        free = shutil.disk_usage(probe_dir).free
        dims, assumption = self._dims_for_estimates()
        estimate = estimate_disk_usage(dims, lora_rank=s.lora_rank, save_total_limit=s.save_total_limit or 1)
        self.report.disk_estimate = estimate
        need = (f"{_size(estimate.total)} ({estimate.checkpoints_kept} checkpoints × {_size(estimate.checkpoint)} + "
                f"adapter {_size(estimate.final_adapter)} + merged model {_size(estimate.merged_model)}){assumption}")
        if free < estimate.total:
            results.append(_fail("disk space", f"{_size(free)} free at {probe_dir}; the run writes up to {need}",
                                 "free disk space, or set OUTPUT_DIR on a larger disk"))
        elif s.save_total_limit is None:
            results.append(_warn("disk space", f"{_size(free)} free; every checkpoint is kept (no --save_total_limit), "
                                               f"each {_size(estimate.checkpoint)}", "pass --save_total_limit N"))
        else:
            results.append(_ok("disk space", f"{_size(free)} free; the run writes up to {need}"))
        return results


def run_setup_checks(settings: SetupSettings) -> SetupReport:
    return SetupChecker(settings).run()


def check_model_dir(path: str | os.PathLike) -> list[CheckResult]:
    """The model-folder checks alone (config, weight shards, tokenizer), e.g. after a download."""
    return SetupChecker().check_model(Path(path))
