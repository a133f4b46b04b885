"""Command-line arguments of the fine-tuning recipe.

The official InternVL flag names are kept, so the official shell scripts run unchanged. Four flags that
transformers 5 removed from ``TrainingArguments`` are accepted under their old spelling and mapped onto the new
fields: ``--evaluation_strategy`` (``eval_strategy``), ``--warmup_ratio`` (a fractional ``warmup_steps``),
``--group_by_length`` (``train_sampling_strategy="group_by_length"``) and ``--overwrite_output_dir`` (start from
scratch instead of resuming). ``--loss_reduction_all_gather`` is the official name of transformers'
``--average_tokens_across_devices``. Official flags this recipe does not implement are rejected with the reason,
unless they ask for the official default, in which case they change nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from internvl.constants import CONFIGS_DIR
from internvl.data.collate import LOSS_REDUCTIONS
from internvl.tools.infer import DEFAULT_MAX_NEW_TOKENS, DEFAULT_NUM_FRAMES
from internvl.tools.metrics import METRIC_NAMES

# The official recipe's loader workers; more rarely help, since a sample's frames decode in one worker.
MAX_DEFAULT_LOADER_WORKERS = 4


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "InternVL checkpoint folder (official layout)."})
    freeze_llm: bool = field(default=False, metadata={"help": "Freeze the language model."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the vision tower."})
    freeze_mlp: bool = field(default=False, metadata={"help": "Freeze the vision-to-language projector (mlp1)."})
    unfreeze_vit_layers: int = field(
        default=0, metadata={"help": "Train the vision layers from this index on (negative: the last -K layers)."}
    )
    vision_select_layer: int = field(default=-1, metadata={"help": "Vision layer whose features feed the LLM."})
    use_backbone_lora: int = field(default=0, metadata={"help": "LoRA rank R on the vision tower (alpha 2R)."})
    use_llm_lora: int = field(default=0, metadata={"help": "LoRA rank R on the LLM (alpha 2R, dropout 0.05)."})
    grad_checkpoint: bool = field(default=True, metadata={"help": "Gradient checkpointing in the LLM."})
    use_liger: bool = field(
        default=False,
        metadata={"help": "Liger-Kernel's fused RMSNorm, SwiGLU and RoPE in the LLM (CUDA; requirements_gpu.txt)."},
    )
    compile_llm_layers: bool = field(
        default=False,
        metadata={"help": "torch.compile each LLM decoder layer (regional compilation; the first steps compile)."},
    )
    grad_checkpoint_skip_layers: str = field(
        default="0",
        metadata={
            "help": "With --grad_checkpoint: how many of the last LLM decoder layers keep their activations instead of "
            "being recomputed in backward (faster, more GPU memory). A number, or 'auto': as many as fit the GPU "
            "memory (--grad_checkpoint_memory_gb) by the setup check's estimate for --max_seq_length tokens per "
            "sample. 0 checkpoints every layer."
        },
    )
    grad_checkpoint_memory_gb: float | None = field(
        default=None,
        metadata={"help": "GPU memory per process (GiB) that --grad_checkpoint_skip_layers auto plans for; default: "
                          "what the GPU holds."},
    )

    def __post_init__(self):
        self.skip_layers_setting()  # a bad value fails here, before anything loads

    def skip_layers_setting(self) -> int | str:
        """``--grad_checkpoint_skip_layers`` as a number of layers, or ``"auto"``."""
        value = str(self.grad_checkpoint_skip_layers).strip().lower()
        if value == "auto":
            return value
        if not value.isdigit():
            raise ValueError(
                f"--grad_checkpoint_skip_layers {self.grad_checkpoint_skip_layers!r}: give a number of decoder "
                "layers (0 checkpoints all of them) or 'auto'."
            )
        return int(value)
    drop_path_rate: float = field(default=0.0, metadata={"help": "Stochastic depth of the vision tower."})
    ps_version: str = field(default="v2", metadata={"help": "Pixel-shuffle version.", "choices": ["v1", "v2"]})
    use_fast_tokenizer: bool = field(default=False, metadata={"help": "Use the fast tokenizer."})
    load_in_4bit: bool = field(default=True, metadata={"help": "Load the LLM in 4-bit with bitsandbytes (QLoRA)."})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param)."}
    )


@dataclass
class DataTrainingArguments:
    meta_path: str = field(metadata={"help": "meta.json listing the datasets (names ending in _val: eval set)."})
    max_seq_length: int = field(default=8192, metadata={"help": "Maximum tokens per sample."})
    force_image_size: int = field(default=448, metadata={"help": "Tile size in pixels."})
    down_sample_ratio: float = field(default=0.5, metadata={"help": "Pixel-shuffle ratio; must match the model."})
    pad2square: bool = field(default=False, metadata={"help": "Pad images to a square before resizing."})
    conv_style: str = field(default="internvl2_5", metadata={"help": "Chat template (internvl2_5 for InternVL3)."})
    dynamic_image_size: bool = field(default=False, metadata={"help": "Split images into tiles."})
    use_thumbnail: bool = field(default=False, metadata={"help": "Add a thumbnail tile to tiled images."})
    min_dynamic_patch: int = field(default=1, metadata={"help": "Minimum tiles per image."})
    max_dynamic_patch: int = field(default=12, metadata={"help": "Maximum tiles per image."})
    min_num_frame: int = field(default=8, metadata={"help": "Minimum frames sampled per video."})
    max_num_frame: int = field(default=32, metadata={"help": "Maximum frames sampled per video."})
    normalize_type: str = field(
        default="imagenet", metadata={"help": "Pixel normalisation.", "choices": ["imagenet", "clip", "siglip"]}
    )
    use_packed_ds: bool = field(
        default=False,
        metadata={
            "help": "Pack the samples of each batch into shared rows of at most --max_packed_tokens tokens, "
            "attention kept within each sample (less padding; the loss is unchanged)."
        },
    )
    max_packed_tokens: int | None = field(
        default=None, metadata={"help": "Most tokens in a packed row: at least --max_seq_length, which it defaults to."}
    )
    loss_reduction: str = field(
        default="token",
        metadata={
            "help": "How trained tokens weigh in the loss: 'token' equally, 'sample' 1/n for a sample of n trained "
            "tokens (every sample counts the same), 'square' 1/sqrt(n). Normalized over each optimizer step.",
            "choices": list(LOSS_REDUCTIONS),
        },
    )

    def __post_init__(self):
        if self.max_packed_tokens is not None and not self.use_packed_ds:
            raise ValueError("--max_packed_tokens sets the size of packed rows: pass it with --use_packed_ds True.")
        if self.use_packed_ds and self.max_packed_tokens is not None and self.max_packed_tokens < self.max_seq_length:
            raise ValueError(
                f"--max_packed_tokens {self.max_packed_tokens} is below --max_seq_length {self.max_seq_length}: a "
                "sample could not fit a packed row; raise --max_packed_tokens or lower --max_seq_length."
            )

    def dataset_options(self) -> dict[str, Any]:
        """The keyword arguments of ``internvl.data.dataset.build_datasets`` these flags set."""
        return dict(
            template_name=self.conv_style,
            image_size=self.force_image_size,
            dynamic_image_size=self.dynamic_image_size,
            use_thumbnail=self.use_thumbnail,
            min_dynamic_patch=self.min_dynamic_patch,
            max_dynamic_patch=self.max_dynamic_patch,
            min_num_frame=self.min_num_frame,
            max_num_frame=self.max_num_frame,
            pad2square=self.pad2square,
            normalize_type=self.normalize_type,
            max_seq_length=self.max_seq_length,
        )

    def collator_options(self) -> dict[str, Any]:
        """The keyword arguments of ``internvl.data.collate.InternVLDataCollator`` these flags set."""
        packed_row_tokens = (self.max_packed_tokens or self.max_seq_length) if self.use_packed_ds else None
        return dict(loss_reduction=self.loss_reduction, max_packed_tokens=packed_row_tokens)


@dataclass
class InternVLTrainingArguments(TrainingArguments):
    """HF ``TrainingArguments`` plus the older spellings the official scripts use."""

    evaluation_strategy: str | None = field(default=None, metadata={"help": "Older spelling of --eval_strategy."})
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of the training steps used for warm-up (becomes --warmup_steps)."}
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch samples of similar length (the dataset's precomputed lengths; nothing is decoded)."},
    )
    loss_reduction_all_gather: bool | None = field(
        default=None,
        metadata={
            "help": "Official spelling of --average_tokens_across_devices: normalize the loss by the trained tokens "
            "of all processes (True here by default) or of each process alone (False)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train from scratch, removing earlier checkpoint-* folders. Without it a run resumes from the "
            "last complete checkpoint in output_dir."
        },
    )
    # Defaults that differ from HF: dataset samples carry only model inputs, evaluation reports the loss
    # (collecting logits over a 150k vocabulary would exhaust memory), and tokens/s needs the token count.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Drop sample keys unknown to forward()."})
    prediction_loss_only: bool = field(default=True, metadata={"help": "Evaluation computes the loss only."})
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "Data loader worker processes per training process. Default: what the CPUs allow, "
                          f"the CPUs this process may use divided by the processes on this node, 1 to "
                          f"{MAX_DEFAULT_LOADER_WORKERS}."},
    )
    dataloader_prefetch_factor: int | None = field(
        default=None,
        metadata={"help": "Batches each loader worker prepares ahead. Default: enough for the workers to hold one "
                          "optimizer step's micro-batches (gradient accumulation / workers, at least 2)."},
    )
    include_num_input_tokens_seen: str = field(
        default="non_padding",
        metadata={"help": "Count the input tokens seen (for tokens/s).", "choices": ["non_padding", "all", "no"]},
    )
    log_level_replica: str = field(
        default="error",
        metadata={"help": "transformers' log level on processes other than the main one (their warnings repeat "
                          "the main process's).",
                  "choices": ["detail", "debug", "info", "warning", "error", "critical", "passive"]},
    )
    eval_generate: bool = field(
        default=False,
        metadata={"help": "At each evaluation, also summarize the validation videos and score the summaries with "
                          "the evaluator's ROUGE-1/2/L, BLEU-4 and CIDEr (logged as eval_rougeL, ...; usable as "
                          "--metric_for_best_model rougeL). Generation is slow: keep the validation set small."},
    )
    eval_generate_max_new_tokens: int = field(
        default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "With --eval_generate: most tokens per summary (greedy)."}
    )
    eval_generate_num_frames: int | None = field(
        default=None,
        metadata={"help": "With --eval_generate: frames per video, at segment middles. Default: "
                          f"{DEFAULT_NUM_FRAMES} (the evaluator's), kept within --min_num_frame/--max_num_frame."},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop when --metric_for_best_model has not improved for this many evaluations (needs "
                          "--load_best_model_at_end True)."},
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "With --early_stopping_patience: the least change that counts as better."}
    )

    def __post_init__(self):
        self._apply_older_spellings()
        self._check_generation_settings()
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = default_loader_workers(os.environ)
        if self.dataloader_prefetch_factor is None and self.dataloader_num_workers > 0:
            # The Trainer takes all micro-batches of an optimizer step when the step starts: have them ready.
            self.dataloader_prefetch_factor = max(
                2, math.ceil(self.gradient_accumulation_steps / self.dataloader_num_workers)
            )
        self.deepspeed = resolve_deepspeed_config(self.deepspeed)
        if not self.use_cpu and not torch.cuda.is_available():
            print("No CUDA device found: training on CPU (--use_cpu True).", file=sys.stderr)
            self.use_cpu = True
        super().__post_init__()

    def _check_generation_settings(self) -> None:
        metric = (self.metric_for_best_model or "").removeprefix("eval_")
        if metric in METRIC_NAMES and not self.eval_generate:
            raise ValueError(
                f"--metric_for_best_model {self.metric_for_best_model} is a generation metric: add --eval_generate "
                "True so that each evaluation computes it."
            )
        if self.eval_generate and self.eval_strategy in ("no", IntervalStrategy.NO) and not self.do_eval:
            raise ValueError("--eval_generate True scores generated summaries at each evaluation, and there is none: "
                             "set --eval_strategy steps (or epoch), or --do_eval True.")
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise ValueError(f"--early_stopping_patience must be at least 1, got {self.early_stopping_patience}.")
            if not self.load_best_model_at_end:
                raise ValueError(
                    "--early_stopping_patience needs --load_best_model_at_end True (and --metric_for_best_model, "
                    "e.g. rougeL with --eval_generate True, or the default eval loss), so that the best checkpoint "
                    "is kept and loaded."
                )

    def _apply_older_spellings(self) -> None:
        if self.evaluation_strategy is not None:
            current = IntervalStrategy(self.eval_strategy).value
            if current not in ("no", IntervalStrategy(self.evaluation_strategy).value):
                raise ValueError(
                    f"--evaluation_strategy {self.evaluation_strategy} contradicts --eval_strategy "
                    f"{self.eval_strategy}; pass only one of them."
                )
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
            if self.warmup_steps:
                raise ValueError("Pass either --warmup_ratio or --warmup_steps, not both.")
            self.warmup_steps = self.warmup_ratio
        if self.loss_reduction_all_gather is not None:
            self.average_tokens_across_devices = self.loss_reduction_all_gather
        if self.group_by_length:
            if self.train_sampling_strategy not in ("random", "group_by_length"):
                raise ValueError(
                    f"--group_by_length True contradicts --train_sampling_strategy {self.train_sampling_strategy}."
                )
            self.train_sampling_strategy = "group_by_length"


def default_loader_workers(environ: Mapping[str, str]) -> int:
    """Loader workers per training process: the CPUs this process may use shared among the processes of this node
    (torchrun's ``LOCAL_WORLD_SIZE``), at least 1 and at most ``MAX_DEFAULT_LOADER_WORKERS``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(1, int(environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, min(MAX_DEFAULT_LOADER_WORKERS, cpus // processes))


def resolve_deepspeed_config(config: str | dict | None) -> str | dict | None:
    """A DeepSpeed config given as a path, or as a bare file name shipped in ``configs/``."""
    if config is None or isinstance(config, dict) or Path(config).is_file():
        return config
    shipped = CONFIGS_DIR / Path(config).name
    if Path(config).name == config and shipped.is_file():
        return str(shipped)
    available = ", ".join(sorted(p.name for p in CONFIGS_DIR.glob("*.json")))
    raise FileNotFoundError(f"DeepSpeed config {config!r} not found; give a path or one of: {available}.")


# Official flags this recipe does not implement, with the value under which they do nothing and the reason they
# are not supported. That value is the official default, except for strict_mode, whose official default (True) pads
# packs to a fixed size. Scripts written for the official code keep running as long as they leave these at that
# value.
UNSUPPORTED_OFFICIAL_FLAGS: dict[str, tuple[Any, str]] = {
    "vision_path": (None, "building a model from a separate vision tower is not supported; pass a full InternVL "
                          "checkpoint as --model_name_or_path"),
    "llm_path": (None, "building a model from a separate LLM is not supported; pass a full InternVL checkpoint "
                       "as --model_name_or_path"),
    "mlp_path": (None, "loading a separate projector is not supported; pass a full InternVL checkpoint"),
    "unfreeze_lm_head": (False, "the official flag never trained lm_head (it set an attribute, not requires_grad); "
                                "train the LLM through --use_llm_lora"),
    "use_data_resampling": (False, "square-root dataset resampling is not implemented; set repeat_time per dataset "
                                   "in meta.json"),
    "num_images_expected": (40, "a packed batch holds the same --per_device_train_batch_size samples, and tiles, as "
                                "an unpacked one"),
    "max_buffer_size": (20, "packing works on each batch of --per_device_train_batch_size samples, not on a buffer "
                            "of the sample stream"),
    "log_freq": (1000, "packing logs no per-pack statistics"),
    "strict_mode": (False, "packed rows are never padded to a fixed number of tokens or tiles"),
    "replacement": (False, "an epoch ends with the data; exhausted datasets are not restarted"),
    "allow_overflow": (False, "a packed row holds whole samples and never exceeds --max_packed_tokens"),
}


def _is_default(value: str, default: Any) -> bool:
    text = value.strip().lower()
    if default is None:
        return text in ("", "none")
    if isinstance(default, bool):
        return text in (("true", "1", "yes") if default else ("false", "0", "no"))
    if isinstance(default, int):
        return text.lstrip("-").isdigit() and int(text) == default
    return text == str(default).lower()


def _raise_for_unsupported(flags: list[tuple[str, str]]) -> None:
    problems = [
        f"--{name} {value}: {UNSUPPORTED_OFFICIAL_FLAGS[name][1]}."
        for name, value in flags
        if not _is_default(value, UNSUPPORTED_OFFICIAL_FLAGS[name][0])
    ]
    if problems:
        raise ValueError("Unsupported arguments:\n  " + "\n  ".join(problems))


def strip_unsupported_flags(argv: list[str]) -> list[str]:
    """Remove unsupported official flags left at their defaults; raise for any set to something else."""
    kept, unsupported, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name not in UNSUPPORTED_OFFICIAL_FLAGS:
            kept.append(token)
            i += 1
        elif "=" in token:
            unsupported.append((name, token.split("=", 1)[1]))
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            unsupported.append((name, argv[i + 1]))
            i += 2
        else:  # a bare boolean flag means True
            unsupported.append((name, "True"))
            i += 1
    _raise_for_unsupported(unsupported)
    return kept


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, InternVLTrainingArguments]:
    """Parse the command line, or a single ``.json`` file holding the same keys."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, InternVLTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as f:
            values = json.load(f)
        _raise_for_unsupported([(k, str(v)) for k, v in values.items() if k in UNSUPPORTED_OFFICIAL_FLAGS])
        supported = {k: v for k, v in values.items() if k not in UNSUPPORTED_OFFICIAL_FLAGS}
        return tuple(parser.parse_dict(supported))
    return tuple(parser.parse_args_into_dataclasses(args=strip_unsupported_flags(argv)))
