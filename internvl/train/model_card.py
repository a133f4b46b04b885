"""``README.md`` of a training output: what was trained, on what, how, and how well.

peft writes a template card full of "[More Information Needed]" next to every adapter; the adapter writer leaves it
out (``internvl.train.checkpoint``) and the run writes this one at its end instead, from its own record: the base
model, the data, the recipe's settings, the launch command and the metrics of the last evaluation (with
``--eval_generate``, ROUGE / BLEU / CIDEr) and of the best checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from internvl.data.files import atomic_write_text
from internvl.tools.metrics import METRIC_NAMES, METRIC_TITLES

MODEL_CARD_NAME = "README.md"


@dataclass
class RunSummary:
    """What the card tells, gathered by the training recipe at the end of a run."""

    model_args: object  # internvl.train.arguments.ModelArguments
    data_args: object  # DataTrainingArguments
    training_args: object  # InternVLTrainingArguments
    num_train_samples: int
    num_eval_samples: int | None
    global_step: int
    weights_step: int  # the step whose weights were saved (the best checkpoint's with --load_best_model_at_end)
    train_metrics: dict
    eval_metrics: dict | None
    best_model_checkpoint: str | None
    best_metric: float | None
    launch_command: str | None


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _lora_line(name: str, rank: int) -> str:
    return f"rank {rank}, alpha {2 * rank}, dropout 0.05 on the {name}" if rank else ""


def _scores_table(metrics: dict) -> list[str]:
    rows = [("eval loss", f"{metrics['eval_loss']:.4f}")] if "eval_loss" in metrics else []
    rows += [(METRIC_TITLES[m], f"{metrics['eval_' + m]:.2f}") for m in METRIC_NAMES if f"eval_{m}" in metrics]
    return ["| metric | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)] if rows else []


def model_card_text(run: RunSummary, output_dir: Path) -> str:
    model, data, train = run.model_args, run.data_args, run.training_args
    base = model.model_name_or_path
    lora = [line for line in (_lora_line("language model", model.use_llm_lora),
                              _lora_line("vision tower", model.use_backbone_lora)) if line]  # fmt: skip
    frozen = [part for part, flag in (("vision tower", model.freeze_backbone), ("projector (mlp1)", model.freeze_mlp),
                                      ("language model", model.freeze_llm)) if flag]  # fmt: skip
    quantization = (f"4-bit {model.bnb_4bit_quant_type.upper()} (bitsandbytes, double quantization "
                    f"{'on' if model.bnb_4bit_use_double_quant else 'off'})") if model.load_in_4bit else "not quantized"
    precision = "bf16" if train.bf16 else "fp16" if train.fp16 else "fp32"
    schedule = train.lr_scheduler_type
    requested = f"--max_steps {train.max_steps}" if train.max_steps > 0 else f"{train.num_train_epochs:g} epochs"
    batch = train.per_device_train_batch_size * train.gradient_accumulation_steps * train.world_size
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "pipeline_tag: video-text-to-text",
        "tags: [internvl, lora, qlora, video-summarization]",
        "---",
        "",
        f"# {output_dir.resolve().name}",
        "",
        f"A LoRA fine-tune of `{base}` for video summarization: the adapter weights only, to apply to that "
        "checkpoint (see *Use*).",
        "",
        "## Model",
        "",
        f"- base model: `{base}`",
        f"- LoRA: {'; '.join(lora) if lora else 'none'}",
        f"- frozen: {', '.join(frozen) if frozen else 'nothing'}",
        f"- base weights during training: {quantization}; compute in {precision}",
        "",
        "## Data",
        "",
        f"- `{data.meta_path}`: {_count(run.num_train_samples, 'training sample')}"
        + (f", {_count(run.num_eval_samples, 'validation sample')}" if run.num_eval_samples is not None else ""),
        f"- {data.min_num_frame}-{data.max_num_frame} frames per video, {data.force_image_size} px, at most "
        f"{data.max_seq_length} tokens per sample, chat template `{data.conv_style}`",
        "",
        "## Recipe",
        "",
        "| setting | value |",
        "|---|---|",
        f"| optimizer steps | {run.global_step} ({requested}) |",
        f"| batch per step | {batch} = {train.per_device_train_batch_size} per device x "
        f"{train.gradient_accumulation_steps} accumulation x {train.world_size} processes |",
        f"| learning rate | {train.learning_rate:g}, {getattr(schedule, 'value', schedule)} schedule, warm-up "
        f"{train.warmup_steps:g} |",
        f"| weight decay | {train.weight_decay:g} |",
        f"| DeepSpeed | {Path(train.deepspeed).name if isinstance(train.deepspeed, str) else 'off'} |",
        f"| seed | {train.seed} |",
    ]
    if run.launch_command:
        lines += ["", "Launch command:", "", "```", run.launch_command, "```"]
    results = []
    if "train_loss" in run.train_metrics:
        results.append(f"- training loss (mean over the run): {run.train_metrics['train_loss']:.4f}")
    if run.eval_metrics:
        results += [f"- evaluation of these weights (step {run.weights_step}):", "", *_scores_table(run.eval_metrics)]
    if run.best_model_checkpoint:
        metric = train.metric_for_best_model or "eval_loss"
        chosen = "; these are its weights" if train.load_best_model_at_end else ""
        results += ["", f"- best checkpoint by {metric}: `{Path(run.best_model_checkpoint).name}` "
                        f"({run.best_metric:.4f}){chosen}"]  # fmt: skip
    lines += ["", "## Results", "", *(results or ["- nothing was logged or evaluated"])]
    lines += [
        "",
        "Curves: `loss_curves.png`; every logged value: `training_log.txt`, `trainer_state.json` and TensorBoard "
        "(`runs/`). The resolved arguments are in `run_args.json`.",
        "",
        "## Use",
        "",
        "```bash",
        f"python scripts/infer_internvl3.py --model {output_dir} --video clip.mp4 --load-in-4bit",
        f"python scripts/evaluate_internvl3.py --model {output_dir} --meta-path {data.meta_path} "
        f"--output-dir {output_dir}/eval",
        f"python scripts/merge_lora.py {output_dir} {output_dir}-merged",
        "```",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(run: RunSummary, output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    path = output_dir / MODEL_CARD_NAME
    atomic_write_text(path, model_card_text(run, output_dir))
    return path
