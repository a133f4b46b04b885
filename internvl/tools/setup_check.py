"""Pre-flight checks for a fine-tuning run: find what would otherwise fail an hour into a GPU job.

``SetupChecker(settings).run()`` goes through the machine (Python, torch, GPUs, packages, a real bitsandbytes NF4
matmul, DeepSpeed), the DeepSpeed config against the batch settings, the model folder (config, every weight
shard, tokenizer and its InternVL tokens), the data (``meta.json``, every JSONL line, the referenced videos and
one real batch built by the project's own dataset and collator), the memory a GPU needs for the chosen settings,
and the output folder and its free disk space. Each finding is a ``CheckResult``: ok, warning, or failure with
the fix. ``scripts/test_internvl3_setup.py`` prints them; ``scripts/download_internvl3_models.sh`` reuses the
model-folder checks.

The memory and disk estimates are computed from the model config; ``docs/SETUP.md`` documents the formulas.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from internvl.constants import CHATML_SPECIAL_TOKENS, IGNORE_INDEX, IMG_CONTEXT_TOKEN, INTERNVL_SPECIAL_TOKENS

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS_FILE = REPO_ROOT / "requirements_official.txt"

OK, WARN, FAIL = "ok", "warn", "fail"
STATUS_SYMBOLS = {OK: "✅", WARN: "⚠️ ", FAIL: "❌"}

GIB = 1024**3
# Needed only by evaluation and plots: a missing one is a warning, not a blocker for training.
EVALUATION_PACKAGES = {"rouge-score", "sacrebleu", "pycocoevalcap", "matplotlib"}
# Distributions whose import name differs from the distribution name.
IMPORT_NAMES = {"pillow": "PIL", "rouge-score": "rouge_score"}
# The LoRA targets of ``wrap_llm_lora`` for Qwen2/Llama LLMs: every attention and MLP projection.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Tensors every InternVL3 checkpoint has under the official names; their absence means a wrong or partial folder.
ESSENTIAL_TENSORS = (
    "vision_model.embeddings.patch_embedding.weight",
    "mlp1.1.weight",
    "language_model.model.embed_tokens.weight",
    "language_model.lm_head.weight",
)
MAX_LISTED_PROBLEMS = 5


# --------------------------------------------------------------------------------------------------------------
# Settings


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={raw!r} must not be negative")
    return value


@dataclass
class SetupSettings:
    """What the launchers pass to the training run; ``from_env`` reads the same environment variables."""

    model_path: Path = Path("models/InternVL3-8B")
    meta_path: Path = Path("internvl3_data/meta.json")
    deepspeed_config: Path = Path("configs/zero_stage3_config.json")
    output_dir: Path = Path("work_dirs/internvl3_8b_4bit_lora")
    gpus: int = 2
    per_device_batch_size: int = 1
    batch_size: int = 16
    lora_rank: int = 32
    max_seq_length: int = 8192
    max_num_frame: int = 32
    save_total_limit: int = 1
    # Check every referenced video/image instead of a sample per dataset.
    full_media_check: bool = False
    media_sample_size: int = 64

    ENV_NAMES = {
        "model_path": "MODEL_PATH",
        "meta_path": "META_PATH",
        "deepspeed_config": "DEEPSPEED_CONFIG",
        "output_dir": "OUTPUT_DIR",
        "gpus": "GPUS",
        "per_device_batch_size": "PER_DEVICE_BATCH_SIZE",
        "batch_size": "BATCH_SIZE",
        "lora_rank": "LORA_RANK",
        "max_seq_length": "MAX_SEQ_LENGTH",
        "max_num_frame": "MAX_NUM_FRAME",
        "save_total_limit": "SAVE_TOTAL_LIMIT",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "SetupSettings":
        """Defaults overridden by the launchers' environment variables (``GPUS``, ``MODEL_PATH``, ...)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field_ in dataclasses.fields(cls):
            env_name = cls.ENV_NAMES.get(field_.name)
            if env_name is None:
                continue
            if field_.type in (int, "int"):
                values[field_.name] = _env_int(environ, env_name, field_.default)
            elif environ.get(env_name):
                values[field_.name] = Path(environ[env_name])
        return cls(**values)

    @property
    def gradient_accumulation(self) -> int:
        return max(1, self.batch_size // max(1, self.gpus * self.per_device_batch_size))


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
    memory_estimate: "MemoryEstimate | None" = None
    disk_estimate: "DiskEstimate | None" = None

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
# Model size, GPU memory and disk estimates (formulas in docs/SETUP.md)


@dataclass(frozen=True)
class ModelDims:
    """The sizes the estimates need, read from an ``InternVLChatConfig``."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    q_width: int  # num_attention_heads * head_dim
    kv_width: int  # num_key_value_heads * head_dim
    vocab_size: int
    qkv_bias: bool
    vision_params: int  # vision tower + mlp1 projector, kept in bf16
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_tokens_per_tile: int  # patches + CLS
    num_image_token: int  # <IMG_CONTEXT> tokens per tile after pixel shuffle

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        llm, vision = config.llm_config, config.vision_config
        head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
        num_kv_heads = getattr(llm, "num_key_value_heads", None) or llm.num_attention_heads
        qkv_bias = bool(getattr(llm, "attention_bias", llm.model_type == "qwen2"))

        hv, iv, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
        patches = (vision.image_size // patch) ** 2
        norm = 2 * hv if vision.norm_type == "layer_norm" else hv
        vision_layer = (
            3 * hv * hv + (3 * hv if vision.qkv_bias else 0)  # attn.qkv
            + hv * hv + hv  # attn.proj
            + 2 * hv * iv + iv + hv  # mlp.fc1, mlp.fc2
            + 2 * norm + 2 * hv  # norm1, norm2, ls1, ls2
            + (2 * hv if vision.qk_normalization else 0)
        )
        vision_embeddings = vision.num_channels * patch * patch * hv + hv + hv + (patches + 1) * hv
        projector_in = int(hv / config.downsample_ratio**2)
        projector = 2 * projector_in + projector_in * llm.hidden_size + llm.hidden_size * (llm.hidden_size + 2)
        return cls(
            hidden_size=llm.hidden_size,
            num_layers=llm.num_hidden_layers,
            intermediate_size=llm.intermediate_size,
            q_width=llm.num_attention_heads * head_dim,
            kv_width=num_kv_heads * head_dim,
            vocab_size=llm.vocab_size,
            qkv_bias=qkv_bias,
            vision_params=vision.num_hidden_layers * vision_layer + vision_embeddings + projector,
            vision_hidden_size=hv,
            vision_intermediate_size=iv,
            vision_tokens_per_tile=patches + 1,
            num_image_token=config.num_image_token,
        )

    @property
    def quantized_params_per_layer(self) -> int:
        """Weights of the seven LLM projections of one decoder layer: the ones stored in 4-bit."""
        h, i = self.hidden_size, self.intermediate_size
        return h * self.q_width + 2 * h * self.kv_width + self.q_width * h + 3 * h * i

    @property
    def quantized_params(self) -> int:
        return self.num_layers * self.quantized_params_per_layer

    @property
    def llm_bf16_params(self) -> int:
        """LLM parameters left in bf16: embeddings, lm_head, norms, q/k/v biases."""
        h = self.hidden_size
        biases = (self.q_width + 2 * self.kv_width) if self.qkv_bias else 0
        return 2 * self.vocab_size * h + h + self.num_layers * (2 * h + biases)

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.llm_bf16_params + self.vision_params

    def lora_params(self, rank: int) -> int:
        """LoRA A and B of the seven projections in every layer: rank * (in + out) each."""
        h, i = self.hidden_size, self.intermediate_size
        per_layer = rank * (
            (h + self.q_width) + 2 * (h + self.kv_width) + (self.q_width + h) + 2 * (h + i) + (i + h)
        )
        return self.num_layers * per_layer


def nf4_bytes_per_param(double_quant: bool, blocksize: int = 64) -> float:
    """4 bits per weight plus the absmax of each block: fp32, or uint8 (+ fp32 per 256 blocks) when double-quantized."""
    constants = (1 + 4 / 256) / blocksize if double_quant else 4 / blocksize
    return 0.5 + constants


@dataclass
class MemoryEstimate:
    """Peak GPU memory of one rank, in bytes, by component (see docs/SETUP.md)."""

    load_peak: int  # the whole 4-bit model on each GPU while from_pretrained runs (before ZeRO partitions it)
    resident_weights: int  # weights held during training (partitioned, offloaded or whole)
    lora_states: int  # LoRA weights, gradients and optimizer states on the GPU
    checkpointed_activations: int  # one hidden state per layer per token (gradient checkpointing)
    layer_activations: int  # one decoder layer recomputed during backward
    logits: int  # LM-head output, its fp32 log-softmax and their gradients
    vision_activations: int  # the frozen ViT forward on every frame of the micro-batch (no grad)
    dequantized_weight: int  # the largest projection dequantized to bf16 for its matmul
    cuda_overhead: int  # CUDA context and allocator fragmentation
    tokens_per_micro_batch: int
    frames_per_sample: int

    @property
    def train_peak(self) -> int:
        return (
            self.resident_weights + self.lora_states + self.checkpointed_activations + self.layer_activations
            + self.logits + self.vision_activations + self.dequantized_weight + self.cuda_overhead
        )

    @property
    def peak(self) -> int:
        return max(self.load_peak + self.cuda_overhead, self.train_peak)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.update(train_peak=self.train_peak, peak=self.peak)
        return values

    def summary(self) -> str:
        parts = [
            ("weights", self.resident_weights),
            ("LoRA+optimizer", self.lora_states),
            ("activations", self.checkpointed_activations + self.layer_activations + self.vision_activations),
            ("logits", self.logits),
            ("other", self.dequantized_weight + self.cuda_overhead),
        ]
        detail = ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts)
        return (
            f"≈{self.peak / GIB:.1f} GiB per GPU (training {self.train_peak / GIB:.1f}: {detail}; "
            f"loading {(self.load_peak + self.cuda_overhead) / GIB:.1f})"
        )


def estimate_gpu_memory(
    dims: ModelDims,
    *,
    lora_rank: int,
    micro_batch_size: int,
    max_seq_length: int,
    max_num_frame: int,
    num_gpus: int,
    zero_stage: int,
    offload_param: bool,
    offload_optimizer: bool,
    double_quant: bool = True,
    cuda_overhead: int = GIB,
) -> MemoryEstimate:
    """Peak GPU memory per rank for QLoRA training of ``dims`` (bf16, gradient checkpointing); see docs/SETUP.md."""
    h, i, kv, v = dims.hidden_size, dims.intermediate_size, dims.kv_width, dims.vocab_size
    n = max(1, num_gpus)
    quantized = dims.quantized_params * nf4_bytes_per_param(double_quant)
    bf16_weights = 2 * (dims.llm_bf16_params + dims.vision_params)
    whole_model = int(quantized + bf16_weights)

    if zero_stage < 3:
        resident = whole_model
    else:
        # ZeRO-3 gathers a module's weights while it runs: the largest is the bf16 LM head (or the embeddings).
        working_set = int(2 * v * h + dims.quantized_params_per_layer * nf4_bytes_per_param(double_quant))
        resident = working_set + (0 if offload_param else whole_model // n)

    # LoRA per parameter: bf16 weight 2 + bf16 grad 2 + fp32 master weight and Adam moments 12 bytes.
    lora = dims.lora_params(lora_rank)
    weights_bytes = 2 * lora / (n if zero_stage >= 3 else 1)
    grads_bytes = 2 * lora / (n if zero_stage >= 2 else 1)
    optimizer_bytes = 0 if offload_optimizer else 12 * lora / (n if zero_stage >= 1 else 1)
    lora_states = int(weights_bytes + grads_bytes + optimizer_bytes)

    frames = max(1, min(max_num_frame, max_seq_length // dims.num_image_token))
    tokens = micro_batch_size * max_seq_length
    # bf16 tensors autograd keeps for one Qwen2 layer (norm outputs, q/k/v/o and their LoRA inputs, SwiGLU).
    layer_elements_per_token = 20 * h + 4 * kv + 6 * i
    # Frozen ViT under no_grad: only one layer's tensors live at a time, for every tile of the micro-batch.
    vision_tiles = micro_batch_size * frames
    vision_elements = dims.vision_tokens_per_tile * (6 * dims.vision_hidden_size + dims.vision_intermediate_size)
    return MemoryEstimate(
        load_peak=whole_model,
        resident_weights=resident,
        lora_states=lora_states,
        checkpointed_activations=2 * h * dims.num_layers * tokens,
        layer_activations=2 * layer_elements_per_token * tokens,
        # bf16 logits 2 + fp32 log-softmax 4 + fp32 gradient 4 + bf16 gradient 2 bytes per vocabulary entry.
        logits=12 * v * tokens,
        vision_activations=2 * vision_elements * vision_tiles,
        dequantized_weight=2 * h * i,
        cuda_overhead=cuda_overhead,
        tokens_per_micro_batch=tokens,
        frames_per_sample=frames,
    )


@dataclass
class DiskEstimate:
    """Disk a run writes, in bytes."""

    checkpoint: int  # one checkpoint-N folder: adapter + fp32 optimizer states
    checkpoints_kept: int  # how many exist at once (save_total_limit + the one being written)
    final_adapter: int
    merged_model: int

    @property
    def total(self) -> int:
        return self.checkpoint * self.checkpoints_kept + self.final_adapter + self.merged_model

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["total"] = self.total
        return values


def estimate_disk_usage(dims: ModelDims, *, lora_rank: int, save_total_limit: int) -> DiskEstimate:
    lora = dims.lora_params(lora_rank)
    adapter = 2 * lora  # saved in bf16
    return DiskEstimate(
        # adapter + fp32 master weights and both Adam moments (12 bytes per trainable parameter)
        checkpoint=adapter + 12 * lora,
        # The Trainer deletes the oldest checkpoint only after the new one is written.
        checkpoints_kept=max(1, save_total_limit) + 1,
        final_adapter=adapter,
        merged_model=2 * dims.total_params,
    )


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


def _listing(items: list[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(items[:MAX_LISTED_PROBLEMS])
    return shown + (f" (and {total - MAX_LISTED_PROBLEMS} more)" if total > MAX_LISTED_PROBLEMS else "")


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


# --------------------------------------------------------------------------------------------------------------
# The checks


class SetupChecker:
    """Runs the checks in order; later checks use what earlier ones loaded (config, tokenizer, DeepSpeed JSON)."""

    def __init__(self, settings: SetupSettings):
        self.settings = settings
        self.report = SetupReport()
        self.gpu_memory: list[int] = []  # total bytes per visible GPU
        self.deepspeed_config: dict | None = None
        self.model_config = None
        self.tokenizer = None

    def run(self) -> SetupReport:
        self._section("Python, torch and GPUs", self.check_python_and_gpus())
        self._section("Packages", self.check_packages() + self.check_bitsandbytes())
        self._section("DeepSpeed", self.check_deepspeed_runtime() + self.check_deepspeed_config())
        self._section("Model", self.check_model())
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
                    "GPUs", f"no CUDA GPU visible{hidden}: a CPU-only machine runs the tiny demo model, "
                    f"not InternVL3-8B (GPUS={requested} asked for)",
                    "run on a machine with NVIDIA GPUs for real training",
                ))
            return results

        count = torch.cuda.device_count()
        devices = [torch.cuda.get_device_properties(i) for i in range(count)]
        self.gpu_memory = [d.total_memory for d in devices]
        names = ", ".join(f"{d.name} ({_gib(d.total_memory)})" for d in devices)
        if requested > count:
            results.append(_fail(
                "GPUs", f"GPUS={requested} but only {count} visible: {names}",
                f"set GPUS={count}, or make more GPUs visible (CUDA_VISIBLE_DEVICES)",
            ))
        else:
            results.append(_ok("GPUs", f"{count} visible, using {requested}: {names}"))

        old = [f"{d.name} (sm_{d.major}{d.minor})" for d in devices[:requested] if (d.major, d.minor) < (8, 0)]
        if old:
            results.append(_fail(
                "bf16", f"training runs in bf16, which needs compute capability 8.0+; not supported by {', '.join(old)}",
                "use Ampere or newer GPUs (A100, A10, L4, L40, RTX 30xx/40xx, H100/H200)",
            ))
        else:
            results.append(_ok("bf16", "supported"))
        if requested > 1 and not torch.distributed.is_nccl_available():
            results.append(_fail(
                "NCCL", "multi-GPU training needs NCCL, which this torch build lacks",
                "install the CUDA build of torch from https://download.pytorch.org/whl/",
            ))
        return results

    # -- Packages ------------------------------------------------------------------------------------------------

    def check_packages(self) -> list[CheckResult]:
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
                results.append(_fail(name, f"{version} installed but does not import: {error}", f"{install} --force-reinstall"))
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
        """Quantize a small weight to NF4 and compare the 4-bit matmul and its input gradient with the dequantized one."""
        name = "bitsandbytes NF4"
        fix = "reinstall bitsandbytes for this platform (pip install -U bitsandbytes) and run python -m bitsandbytes"
        try:
            import bitsandbytes as bnb
            import torch
            from bitsandbytes.functional import dequantize_4bit

            device = "cuda" if torch.cuda.is_available() else "cpu"
            generator = torch.Generator().manual_seed(0)
            weight = torch.randn(64, 128, generator=generator)
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
            result = _warn("accelerator", f"DeepSpeed {deepspeed.__version__} runs on the CPU accelerator (gloo)")
        else:
            result = _ok("accelerator", f"DeepSpeed {deepspeed.__version__} on {accelerator}")
        return [result]

    def _deepspeed_ops_check(self, offload_optimizer: bool) -> list[CheckResult]:
        """DeepSpeedCPUAdam (optimizer offload) and the CPU communication op are compiled on first use."""
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops

        needs_jit = (offload_optimizer and not installed_ops.get("cpu_adam")) or get_accelerator().device_name() == "cpu"
        if not needs_jit:
            return []
        from torch.utils.cpp_extension import is_ninja_available

        compiler = os.environ.get("CXX", "c++")
        missing = [what for what, present in (("a C++ compiler", shutil.which(compiler)),
                                              ("ninja", is_ninja_available())) if not present]
        if missing:
            return [_fail(
                "DeepSpeed ops", f"DeepSpeedCPUAdam is compiled on first use, which needs {' and '.join(missing)}",
                "install them (apt install g++; pip install ninja), or pre-build: DS_BUILD_CPU_ADAM=1 pip install "
                "--no-cache-dir --force-reinstall deepspeed",
            )]
        return [_ok("DeepSpeed ops", f"compiler ({compiler}) and ninja present for the first-use build (~1 min)")]

    def check_deepspeed_config(self) -> list[CheckResult]:
        s = self.settings
        path = s.deepspeed_config
        name = "DeepSpeed config"
        if not path.is_file():
            shipped = ", ".join(sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs").glob("*.json")))
            return [_fail(name, f"{path} not found", f"set DEEPSPEED_CONFIG to one of: {shipped}")]
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

            # "auto" values are filled in by the HF Trainer; validate everything else (unknown keys raise).
            DeepSpeedZeroConfig(**{k: v for k, v in zero.items() if not _is_auto(v)})
        except Exception as error:
            first_line = str(error).strip().splitlines()
            detail = " ".join(first_line[:3])
            results.append(_fail(name, f"invalid zero_optimization in {path}: {detail}",
                                 "fix or remove the reported key (see the DeepSpeed ZeRO docs)"))
        stage = int(zero.get("stage", 0))
        offload_param = (zero.get("offload_param") or {}).get("device", "none")
        offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none")
        for what, device, section in (("parameters", offload_param, "offload_param"),
                                      ("optimizer", offload_optimizer, "offload_optimizer")):
            if device == "nvme":
                nvme_path = (zero.get(section) or {}).get("nvme_path")
                if not nvme_path or not os.access(nvme_path, os.W_OK):
                    results.append(_fail(name, f"{section} uses nvme but nvme_path {nvme_path!r} is not writable",
                                         f"set zero_optimization.{section}.nvme_path to a writable NVMe folder"))
        if stage == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
            results.append(_fail(
                name, "ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the Trainer cannot gather the "
                "LoRA weights when saving, so the adapter would not be written",
                f'set "stage3_gather_16bit_weights_on_model_save": true in zero_optimization of {path}',
            ))
        if config.get("fp16", {}).get("enabled") is True and config.get("bf16", {}).get("enabled") is True:
            results.append(_fail(name, "fp16 and bf16 are both enabled", 'set both to "auto" (the run uses bf16)'))

        results.extend(self._check_batch_settings(config))
        if not any(r.status == FAIL for r in results):
            results.append(_ok(name, f"{path}: ZeRO stage {stage}, offload parameters={offload_param}, "
                                     f"optimizer={offload_optimizer}"))
        results.extend(self._deepspeed_ops_check(offload_optimizer == "cpu"))
        return results

    def _check_batch_settings(self, config: dict) -> list[CheckResult]:
        s = self.settings
        name = "batch size"
        for env, value in (("GPUS", s.gpus), ("PER_DEVICE_BATCH_SIZE", s.per_device_batch_size),
                           ("BATCH_SIZE", s.batch_size)):
            if value < 1:
                return [_fail(name, f"{env}={value} must be at least 1", f"set {env} to a positive integer")]
        per_step = s.gpus * s.per_device_batch_size
        if s.batch_size % per_step:
            lower = max(per_step, s.batch_size // per_step * per_step)
            return [_fail(
                name, f"BATCH_SIZE={s.batch_size} is not divisible by GPUS × PER_DEVICE_BATCH_SIZE = "
                f"{s.gpus} × {s.per_device_batch_size} = {per_step}",
                f"set BATCH_SIZE to a multiple of {per_step} (e.g. {lower} or {lower + per_step})",
            )]
        accumulation = s.batch_size // per_step
        expected = {
            "train_micro_batch_size_per_gpu": (s.per_device_batch_size, "PER_DEVICE_BATCH_SIZE"),
            "gradient_accumulation_steps": (accumulation, "BATCH_SIZE / (GPUS × PER_DEVICE_BATCH_SIZE)"),
            "train_batch_size": (s.batch_size, "BATCH_SIZE"),
        }
        results = []
        for key, (wanted, source) in expected.items():
            value = config.get(key, "auto")
            if _is_auto(value):
                continue
            if not isinstance(value, int) or value != wanted:
                results.append(_fail(
                    name, f"{s.deepspeed_config} sets {key}={value!r} but {source} gives {wanted} "
                    f"(GPUS={s.gpus}, PER_DEVICE_BATCH_SIZE={s.per_device_batch_size}, BATCH_SIZE={s.batch_size})",
                    f'set "{key}": "auto" in {s.deepspeed_config} (the Trainer fills it in), or change the '
                    "environment to match it",
                ))
        if not results:
            results.append(_ok(name, f"{s.batch_size} = {s.gpus} GPUs × {s.per_device_batch_size} per device × "
                                     f"{accumulation} accumulation steps"))
        return results

    # -- Model folder ----------------------------------------------------------------------------------------

    def check_model(self) -> list[CheckResult]:
        path = self.settings.model_path
        download = "bash scripts/download_internvl3_models.sh (or set MODEL_PATH to the model folder)"
        if not path.is_dir():
            return [_fail("model folder", f"{path} does not exist", download)]
        results = self._check_model_config(path)
        results += self._check_weights(path)
        results += self._check_tokenizer(path)
        return results

    def _check_model_config(self, path: Path) -> list[CheckResult]:
        name = "model config"
        config_file = path / "config.json"
        if not config_file.is_file():
            return [_fail(name, f"{config_file} is missing", "re-run bash scripts/download_internvl3_models.sh")]
        raw, error = _read_json(config_file)
        if error:
            return [_fail(name, f"not valid JSON: {error}", "re-download config.json")]
        if not isinstance(raw, dict) or raw.get("model_type") != "internvl_chat":
            model_type = raw.get("model_type") if isinstance(raw, dict) else None
            return [_fail(name, f"{config_file}: model_type is {model_type!r}, expected 'internvl_chat'",
                          "point MODEL_PATH at an InternVL checkpoint in the official layout "
                          "(e.g. OpenGVLab/InternVL3-8B, not a '-hf' conversion)")]
        required = {
            "llm_config": ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size"),
            "vision_config": ("hidden_size", "image_size", "patch_size", "num_hidden_layers", "intermediate_size"),
        }
        missing = [f"{part}.{key}" for part, keys in required.items()
                   for key in keys if key not in (raw.get(part) or {})]
        if missing:
            return [_fail(name, f"{config_file} lacks {', '.join(missing)}",
                          "re-download config.json from the checkpoint's repository")]
        try:
            from internvl.model.configuration import InternVLChatConfig

            config = InternVLChatConfig.from_pretrained(path)
        except Exception as error:
            return [_fail(name, f"{config_file} does not load: {error}", "use an InternVL3 (Qwen2.5-based) checkpoint")]
        self.model_config = config
        llm = config.llm_config
        results = [_ok(name, f"{llm.architectures[0]}, {llm.num_hidden_layers} layers, hidden {llm.hidden_size}, "
                             f"vocab {llm.vocab_size}; {config.num_image_token} tokens per {config.image_size}px tile")]
        if config.template not in (None, "internvl2_5"):
            results.append(_warn(
                "chat template", f"config template is {config.template!r}; InternVL3 is trained with 'internvl2_5'",
                "keep --conv_style internvl2_5 (other templates are known to collapse the loss)",
            ))
        return results

    def _check_weights(self, path: Path) -> list[CheckResult]:
        name = "weights"
        index_file = path / "model.safetensors.index.json"
        single_file = path / "model.safetensors"
        download = "re-run bash scripts/download_internvl3_models.sh (it resumes and fetches what is missing)"
        if index_file.is_file():
            index, error = _read_json(index_file)
            if error:
                return [_fail(name, f"index is not valid JSON: {error}", download)]
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                return [_fail(name, f"{index_file} has no weight_map", download)]
            expected_bytes = (index.get("metadata") or {}).get("total_size")
        elif single_file.is_file():
            weight_map, expected_bytes = None, None
        else:
            if list(path.glob("pytorch_model*.bin")):
                return [_fail(name, f"{path} has only pytorch_model*.bin weights; this toolkit loads safetensors",
                              "download the safetensors release of the checkpoint")]
            return [_fail(name, f"neither model.safetensors.index.json nor model.safetensors in {path}", download)]

        from safetensors import safe_open

        shards = sorted(set(weight_map.values())) if weight_map else [single_file.name]
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            return [_fail(name, f"{len(missing)} of {len(shards)} shards named in {index_file.name} are missing: "
                                f"{_listing(missing)}", download)]
        shapes: dict[str, list[int]] = {}
        tensor_bytes, problems = 0, []
        for shard in shards:
            shard_path = path / shard
            try:
                with safe_open(shard_path, framework="pt") as f:
                    keys = set(f.keys())
                    for key in ESSENTIAL_TENSORS:
                        if key in keys:
                            shapes[key] = list(f.get_slice(key).get_shape())
            except Exception as error:
                size = shard_path.stat().st_size
                hint = " (a Git LFS pointer: run git lfs pull)" if 0 < size < 1024 else ""
                problems.append(f"{shard}: unreadable, {size} bytes{hint}: {error}")
                continue
            tensor_bytes += shard_path.stat().st_size
            if weight_map:
                absent = sorted(k for k, s in weight_map.items() if s == shard and k not in keys)
                if absent:
                    problems.append(f"{shard} lacks {len(absent)} tensors the index assigns to it, e.g. {absent[0]}")
        if problems:
            return [_fail(name, f"damaged shards: {_listing(problems)}",
                          "delete the damaged files and " + download)]
        if isinstance(expected_bytes, int) and tensor_bytes < expected_bytes:
            return [_fail(name, f"shards hold {tensor_bytes} bytes but the index declares {expected_bytes}", download)]
        missing_tensors = [key for key in ESSENTIAL_TENSORS if key not in shapes]
        if missing_tensors:
            return [_fail(name, f"no {', '.join(missing_tensors)} in the weights: not an InternVL checkpoint in the "
                                "official layout", "point MODEL_PATH at an official-layout InternVL3 checkpoint")]
        results = [_ok(name, f"{len(shards)} safetensors file(s), {_gib(tensor_bytes)}, all readable")]
        if self.model_config is not None:
            llm = self.model_config.llm_config
            embedding = shapes["language_model.model.embed_tokens.weight"]
            if embedding != [llm.vocab_size, llm.hidden_size]:
                results.append(_fail(
                    "weights", f"embed_tokens has shape {embedding} but the config says "
                    f"[vocab_size, hidden_size] = [{llm.vocab_size}, {llm.hidden_size}]",
                    "config.json and the weights come from different checkpoints; re-download both",
                ))
        return results

    def _check_tokenizer(self, path: Path) -> list[CheckResult]:
        name = "tokenizer"
        try:
            from internvl.model.loading import load_tokenizer

            tokenizer = load_tokenizer(path)
        except Exception as error:
            return [_fail(name, f"does not load from {path}: {type(error).__name__}: {error}",
                          "restore the tokenizer files (tokenizer_config.json, vocab.json, merges.txt, "
                          "added_tokens.json) from the checkpoint's repository")]
        vocab = tokenizer.get_vocab()
        missing = [t for t in (*INTERNVL_SPECIAL_TOKENS, *CHATML_SPECIAL_TOKENS) if t not in vocab]
        split = [t for t in INTERNVL_SPECIAL_TOKENS if t in vocab
                 and tokenizer(t, add_special_tokens=False)["input_ids"] != [vocab[t]]]
        if missing or split:
            problems = ([f"lacks {', '.join(missing)}"] if missing else []) + (
                [f"splits {', '.join(split)} into several tokens"] if split else [])
            return [_fail(
                name, f"{path}: {'; '.join(problems)}",
                "use the tokenizer shipped with the InternVL3 checkpoint: a plain Qwen2.5 tokenizer lacks the "
                "InternVL tokens, and adding them by hand gives ids the checkpoint's embeddings were not trained for",
            )]
        self.tokenizer = tokenizer
        context_id = vocab[IMG_CONTEXT_TOKEN]
        results = []
        if self.model_config is not None:
            vocab_size = self.model_config.llm_config.vocab_size
            stored_id = getattr(self.model_config, "img_context_token_id", None)
            if context_id >= vocab_size:
                results.append(_fail(
                    name, f"{IMG_CONTEXT_TOKEN} has id {context_id} but llm_config.vocab_size is {vocab_size}: "
                    "the embedding has no row for it", "the tokenizer belongs to another checkpoint; re-download",
                ))
            if stored_id is not None and stored_id != context_id:
                results.append(_fail(
                    name, f"config.json stores img_context_token_id={stored_id} but the tokenizer gives "
                    f"{IMG_CONTEXT_TOKEN} id {context_id}", "the tokenizer and config come from different checkpoints",
                ))
        if not results:
            results.append(_ok(name, f"{type(tokenizer).__name__}, {len(tokenizer)} tokens, "
                                     f"{IMG_CONTEXT_TOKEN} = {context_id}, all InternVL tokens present"))
        return results

    # -- Data ----------------------------------------------------------------------------------------------------

    def check_data(self) -> list[CheckResult]:
        return []

    # -- Memory, output folder, disk ---------------------------------------------------------------------------

    def _model_dims(self) -> ModelDims | None:
        if self.model_config is None:
            return None
        return ModelDims.from_config(self.model_config)

    def check_memory(self) -> list[CheckResult]:
        s = self.settings
        dims = self._model_dims()
        if dims is None:
            return [_warn("GPU memory", "not estimated: the model config did not load (see Model above)")]
        zero = (self.deepspeed_config or {}).get("zero_optimization") or {}
        estimate = estimate_gpu_memory(
            dims,
            lora_rank=s.lora_rank,
            micro_batch_size=s.per_device_batch_size,
            max_seq_length=s.max_seq_length,
            max_num_frame=s.max_num_frame,
            num_gpus=s.gpus,
            zero_stage=int(zero.get("stage", 0)),
            offload_param=(zero.get("offload_param") or {}).get("device", "none") != "none",
            offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") != "none",
        )
        self.report.memory_estimate = estimate
        needs = (f"{estimate.summary()} for micro-batch {s.per_device_batch_size} × {s.max_seq_length} tokens "
                 f"(≤{estimate.frames_per_sample} frames), LoRA r={s.lora_rank}")
        if not self.gpu_memory:
            return [_warn("GPU memory", f"no GPU to compare with; the chosen settings need {needs}")]
        available = min(self.gpu_memory[: max(1, s.gpus)])
        lower = ("lower PER_DEVICE_BATCH_SIZE (keep BATCH_SIZE: accumulation grows), MAX_SEQ_LENGTH or "
                 "MAX_NUM_FRAME, or use a DeepSpeed config with CPU offload (configs/zero_stage3_config.json)")
        if estimate.peak > available:
            return [_fail("GPU memory", f"needs {needs}; the smallest GPU has {_gib(available)}", lower)]
        if estimate.peak > 0.9 * available:
            return [_warn("GPU memory", f"needs {needs}; the smallest GPU has {_gib(available)} (tight)", lower)]
        return [_ok("GPU memory", f"needs {needs}; the smallest GPU has {_gib(available)}")]

    def check_output_dir(self) -> list[CheckResult]:
        s = self.settings
        results = []
        target = s.output_dir
        probe_dir = target if target.is_dir() else _existing_ancestor(target)
        if target.exists() and not target.is_dir():
            return [_fail("output folder", f"{target} exists and is not a folder", "set OUTPUT_DIR to a folder path")]
        try:
            with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".write-test-"):
                pass
        except OSError as error:
            return [_fail("output folder", f"cannot write in {probe_dir}: {error}",
                          "set OUTPUT_DIR to a writable location")]
        checkpoints = sorted(p.name for p in target.glob("checkpoint-*")) if target.is_dir() else []
        if checkpoints:
            results.append(_warn(
                "output folder", f"{target} holds {', '.join(checkpoints[-3:])}: the run resumes from the last one",
                "use a new OUTPUT_DIR (or pass --overwrite_output_dir True) to start from scratch",
            ))
        else:
            results.append(_ok("output folder", f"{target} is writable"))

        dims = self._model_dims()
        free = shutil.disk_usage(probe_dir).free
        if dims is None:
            results.append(_warn("disk space", f"{_gib(free)} free at {probe_dir}; need not estimated (no model "
                                               "config)"))
            return results
        estimate = estimate_disk_usage(dims, lora_rank=s.lora_rank, save_total_limit=s.save_total_limit)
        self.report.disk_estimate = estimate
        need = (f"{_gib(estimate.total)} ({estimate.checkpoints_kept} checkpoints × {_gib(estimate.checkpoint)} "
                f"+ adapter {_gib(estimate.final_adapter)} + merged model {_gib(estimate.merged_model)})")
        if free < estimate.total:
            results.append(_fail("disk space", f"{_gib(free)} free at {probe_dir}, the run writes up to {need}",
                                 "free disk space or set OUTPUT_DIR on a larger disk"))
        else:
            results.append(_ok("disk space", f"{_gib(free)} free, the run writes up to {need}"))
        return results


def run_setup_checks(settings: SetupSettings) -> SetupReport:
    return SetupChecker(settings).run()
