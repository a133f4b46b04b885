"""Fine-tune an InternVL chat model (InternVL3-8B by default) with 4-bit QLoRA under DeepSpeed.

    torchrun --nproc_per_node=2 internvl/train/internvl_chat_finetune.py --model_name_or_path models/InternVL3-8B \
        --meta_path internvl3_data/meta.json --output_dir work_dirs/run --use_llm_lora 32 \
        --freeze_llm True --freeze_mlp True --freeze_backbone True --deepspeed zero_stage3_config.json ...

also runs as ``python -m internvl.train.internvl_chat_finetune``. The flags are the official ones (see
``internvl.train.arguments``); the steps are: arguments (which set the device and register the DeepSpeed config,
so transformers loads the 4-bit model the ZeRO-3 way) -> the checks that need no model (``run_guard.preflight``:
paths, output folder, resume compatibility) -> the output folder's lock -> output folder (resume or start over) ->
tokenizer and model -> freezing and LoRA -> gradient checkpointing (of all LLM decoder layers, or of as many as the
memory budget needs) -> datasets -> Trainer -> train, save, evaluate.
Started as a command, a bad input or environment fault ends the run with one line (``error: ...``) and exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Started as a file (``torchrun internvl/train/internvl_chat_finetune.py``): make the package importable, and
    # import it before transformers, which loads bitsandbytes, so that its log filters (internvl.log_filters) apply.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import internvl  # noqa: F401

import os
import shlex
import shutil
import time
import warnings
from contextlib import nullcontext

import torch
import transformers
from transformers import EarlyStoppingCallback, set_seed

from internvl.data.collate import InternVLDataCollator
from internvl.data.dataset import DatasetHealthError, build_datasets
from internvl.model.fusion import apply_liger_kernels, check_liger_usable, compile_decoder_layers
from internvl.model.loading import load_internvl_model, load_tokenizer
from internvl.tools.evaluate import load_eval_records
from internvl.tools.infer import generation_config
from internvl.tools.plots import load_loss_history, plot_training_curves
from internvl.train.arguments import (
    DataTrainingArguments,
    InternVLTrainingArguments,
    ModelArguments,
    parse_args,
)
from internvl.train.callbacks import TRAINING_LOG_NAME, TrainingLogCallback
from internvl.train.checkpoint import last_complete_checkpoint, list_checkpoints
from internvl.train.deepspeed_ops import build_announcement, use_environment_build_cache
from internvl.train.generation_metrics import GenerationEvaluation, default_num_frames
from internvl.train.launch import CUDA_ARCH_LIST_ENV, LAUNCH_COMMAND_ENV, deepspeed_compatible_arch_list
from internvl.train.memory_budget import leave_layers_out_of_checkpointing
from internvl.train.run_guard import (
    RunRecordCallback,
    output_dir_lock,
    preflight,
    resume_checkpoint,
    save_run_record,
)
from internvl.train.model_card import RunSummary, write_model_card
from internvl.train.run_warnings import dataset_size_warnings
from internvl.train.trainer import InternVLTrainer

COMMAND_NAME = "command.txt"
# DeepSpeed's ZeRO collectives call torch.distributed functions that torch >= 2.14 deprecates, with a warning on
# every step of every process; nothing for users to change.
DEEPSPEED_COLLECTIVE_DEPRECATION = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def log(message: str) -> None:
    """Print once (from the main process)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def check_arguments(model_args: ModelArguments, training_args: InternVLTrainingArguments) -> None:
    """Reject combinations that cannot train, before minutes are spent loading the model."""
    if not (training_args.do_train or training_args.do_eval):
        raise ValueError("Nothing to do: pass --do_train True and/or --do_eval True.")
    if training_args.do_train and training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise ValueError(
            f"--num_train_epochs {training_args.num_train_epochs:g} trains nothing: set EPOCHS (--num_train_epochs) "
            "or --max_steps above 0."
        )
    if model_args.load_in_4bit and not model_args.freeze_llm and not model_args.use_llm_lora:
        raise ValueError(
            "A 4-bit LLM cannot be trained directly: pass --use_llm_lora R (QLoRA), or --load_in_4bit False to "
            "train the full LLM."
        )
    if training_args.do_train and all(
        (model_args.freeze_llm, model_args.freeze_backbone, model_args.freeze_mlp)
    ) and not (model_args.use_llm_lora or model_args.use_backbone_lora or model_args.unfreeze_vit_layers):
        raise ValueError("Every part is frozen and no LoRA is requested: there is nothing to train.")
    if model_args.skip_layers_setting() != 0 and not model_args.grad_checkpoint:
        raise ValueError(
            "--grad_checkpoint_skip_layers leaves layers out of gradient checkpointing, which is off "
            "(--grad_checkpoint False): every layer keeps its activations already; drop one of the two flags."
        )
    if model_args.use_liger:
        check_liger_usable()
    if model_args.grad_checkpoint_memory_gb is not None and model_args.grad_checkpoint_memory_gb <= 0:
        raise ValueError(f"--grad_checkpoint_memory_gb must be positive, got {model_args.grad_checkpoint_memory_gb}.")


def prepare_output_dir(training_args: InternVLTrainingArguments) -> str | None:
    """Start over (``--overwrite_output_dir True``) or return the checkpoint to resume from."""
    output_dir = Path(training_args.output_dir)
    if training_args.overwrite_output_dir and not training_args.resume_from_checkpoint:
        # Old checkpoints would otherwise mix with the new run's in rotation and in a later resume.
        with training_args.main_process_first(local=False, desc="clearing old checkpoints"):
            if training_args.should_save:
                for checkpoint in list_checkpoints(output_dir):
                    log(f"--overwrite_output_dir: removing {checkpoint}")
                    shutil.rmtree(checkpoint)
                (output_dir / TRAINING_LOG_NAME).unlink(missing_ok=True)
        return None
    if not training_args.resume_from_checkpoint:
        for folder in last_complete_checkpoint(output_dir)[1]:
            log(f"Skipping incomplete checkpoint {folder} (no trainer_state.json: the run stopped while saving it).")
    checkpoint = resume_checkpoint(training_args)
    if checkpoint is not None and not training_args.resume_from_checkpoint:
        log(f"Resuming from {checkpoint} (pass --overwrite_output_dir True to start over).")
    return str(checkpoint) if checkpoint else None


def compute_dtype(training_args: InternVLTrainingArguments) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    return torch.float16 if training_args.fp16 else torch.float32


def load_model(model_args: ModelArguments, data_args: DataTrainingArguments, dtype: torch.dtype):
    model = load_internvl_model(
        model_args.model_name_or_path,
        load_in_4bit=model_args.load_in_4bit,
        torch_dtype=dtype,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.bnb_4bit_use_double_quant,
        config_overrides={
            "template": data_args.conv_style,
            "select_layer": model_args.vision_select_layer,
            "ps_version": model_args.ps_version,
            "dynamic_image_size": data_args.dynamic_image_size,
            "use_thumbnail": data_args.use_thumbnail,
            "min_dynamic_patch": data_args.min_dynamic_patch,
            "max_dynamic_patch": data_args.max_dynamic_patch,
            "force_image_size": data_args.force_image_size,
            "drop_path_rate": model_args.drop_path_rate,
        },
    )
    if model.config.downsample_ratio != data_args.down_sample_ratio:
        raise ValueError(
            f"--down_sample_ratio {data_args.down_sample_ratio} does not match the checkpoint's downsample_ratio "
            f"{model.config.downsample_ratio} (the projector's input width depends on it)."
        )
    return model


def configure_trainable_parameters(model, model_args: ModelArguments) -> None:
    """Freezing, LoRA and checkpointing, in the official order (LoRA after freezing, so its weights train)."""
    if model_args.freeze_backbone:
        model.vision_model.requires_grad_(False)
    if model_args.freeze_llm:
        model.language_model.requires_grad_(False)
    if model_args.use_backbone_lora:
        r = model_args.use_backbone_lora
        model.wrap_backbone_lora(r=r, lora_alpha=2 * r, lora_dropout=0.05)
    if model_args.use_llm_lora:
        r = model_args.use_llm_lora
        model.wrap_llm_lora(r=r, lora_alpha=2 * r, lora_dropout=0.05)
    if model_args.freeze_mlp:
        model.mlp1.requires_grad_(False)
    if model_args.unfreeze_vit_layers:
        vision = model.vision_model
        encoder = (vision.get_base_model() if hasattr(vision, "get_base_model") else vision).encoder
        for layer in encoder.layers[model_args.unfreeze_vit_layers :]:
            layer.requires_grad_(True)
    if model_args.grad_checkpoint:
        model.gradient_checkpointing_enable()  # reentrant: the variant that works with PEFT + ZeRO-3
    model.base_language_model.config.use_cache = False


def _drop_quant_state_entries(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "weight.")]:
        del state_dict[key]


def prepare_4bit_layers_for_checkpoints(model) -> None:
    """Let DeepSpeed checkpoints of a 4-bit model save and load.

    - On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place into a CPU-only layout the first
      time it runs in inference mode (evaluation); under ZeRO-3 that breaks the partitioned parameter and the
      checkpoint writer, so the standard layout is kept.
    - A 4-bit layer's state dict carries its quantization constants as extra ``weight.*`` entries, which a strict
      load (DeepSpeed resume) rejects as unexpected. The weights are frozen and their quantization state never
      leaves the module, so those entries are dropped on load.
    """
    for module in model.modules():
        if type(getattr(module, "weight", None)).__name__ != "Params4bit":
            continue
        module.support_avx512bf16_for_cpu = False
        module.register_load_state_dict_pre_hook(_drop_quant_state_entries)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit tensor element holds several weights."""
    trainable = total = 0
    for param in model.parameters():
        # A parameter partitioned by ZeRO-3 at load time (an unquantized model) is empty here; ds_numel is its size.
        count = getattr(param, "ds_numel", param.numel())
        if param.__class__.__name__ == "Params4bit":
            count *= 2 * param.element_size()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def count_over_ranks(count: int) -> int:
    """Sum of a per-process count over all processes."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    total = torch.tensor(count, dtype=torch.long, device=device)
    torch.distributed.all_reduce(total)
    return int(total.item())


def step_of_final_weights(trainer) -> int:
    """The optimizer step whose weights the model holds: the best checkpoint's with ``--load_best_model_at_end``."""
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best:
        return int(Path(best).name.rsplit("-", 1)[1])
    return trainer.state.global_step


def eval_metrics_of_final_weights(trainer) -> dict | None:
    """The metrics of the periodic evaluation if it already ran on the final weights (no need to run it again)."""
    step = step_of_final_weights(trainer)
    for entry in reversed(trainer.state.log_history):
        if step and entry.get("step") == step and "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_") or k == "epoch"}
    return None


def write_loss_curves(output_dir: Path) -> str:
    """For headless servers: the loss curves as a picture, without starting TensorBoard. Returns what to print."""
    try:
        history = load_loss_history(output_dir)
    except FileNotFoundError:
        # Nothing was logged: fewer optimizer steps than --logging_steps, and no evaluation.
        return "No loss curves: no loss was logged (fewer optimizer steps than --logging_steps)."
    path = plot_training_curves(output_dir)
    if history.too_short_for_a_curve:
        return f"No loss curve: fewer than two losses were logged (lower --logging_steps); {path} says so."
    return f"Loss curves: {path}"


def build_generation_evaluation(
    data_args: DataTrainingArguments, training_args: InternVLTrainingArguments
) -> GenerationEvaluation | None:
    """With ``--eval_generate``: the validation records to summarize at each evaluation (read now, so that a record
    unfit for generation stops the run before the model loads)."""
    if not training_args.eval_generate:
        return None
    records, _ = load_eval_records(meta_path=data_args.meta_path)
    return GenerationEvaluation(
        records=records,
        num_frames=training_args.eval_generate_num_frames
        or default_num_frames(data_args.min_num_frame, data_args.max_num_frame),
        generation_kwargs=generation_config(training_args.eval_generate_max_new_tokens),
        batch_size=training_args.per_device_eval_batch_size,
    )


def early_stopping(training_args: InternVLTrainingArguments) -> list[EarlyStoppingCallback]:
    if training_args.early_stopping_patience is None:
        return []
    return [EarlyStoppingCallback(training_args.early_stopping_patience, training_args.early_stopping_threshold)]


def last_launch_command(output_dir: Path) -> str | None:
    """The newest command recorded in ``command.txt``."""
    path = output_dir / COMMAND_NAME
    if not path.is_file():
        return None
    commands = [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    return commands[-1] if commands else None


def write_run_record(output_dir: Path, argv: list[str], record: dict, world_size: int) -> None:
    """``run_args.json`` (the run record of ``run_guard``) and ``command.txt`` (every launch, appended)."""
    save_run_record(output_dir, record)
    lines = [f"# {time.strftime('%Y-%m-%d %H:%M:%S')} world size {world_size}"]
    if os.environ.get(LAUNCH_COMMAND_ENV):
        lines.append(os.environ[LAUNCH_COMMAND_ENV])
    else:
        lines.append(shlex.join([sys.executable, *sys.argv[:1], *argv]))
    with open(output_dir / COMMAND_NAME, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None, trainer_class: type[InternVLTrainer] = InternVLTrainer) -> None:
    """Train and/or evaluate; ``trainer_class`` lets a benchmark measure the very same run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arch_list = deepspeed_compatible_arch_list(os.environ)
    if arch_list:  # started without the launcher, which fixes the value itself
        os.environ[CUDA_ARCH_LIST_ENV], note = arch_list
        log(note)
    warnings.filterwarnings("ignore", message=DEEPSPEED_COLLECTIVE_DEPRECATION, category=FutureWarning)
    use_environment_build_cache()  # before DeepSpeed builds any op
    model_args, data_args, training_args = parse_args(argv)
    # From here on, transformers' warnings come from the main process only (the others would repeat them).
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    check_arguments(model_args, training_args)
    record, notes = preflight(model_args, data_args, training_args, training_args.world_size)
    for note in notes:
        log(f"Warning: {note}")
    # The main process holds the output folder for the whole run; a second run into it stops here.
    holds_folder = training_args.do_train and training_args.should_save
    with output_dir_lock(training_args.output_dir) if holds_folder else nullcontext():
        train_and_evaluate(argv, (model_args, data_args, training_args), record, trainer_class)


def train_and_evaluate(argv: list[str], args: tuple, record: dict, trainer_class: type[InternVLTrainer]) -> None:
    model_args, data_args, training_args = args
    generation_evaluation = build_generation_evaluation(data_args, training_args)
    build_note = build_announcement(training_args.hf_deepspeed_config.config if training_args.deepspeed else None)
    if build_note and int(os.environ.get("LOCAL_RANK", "0")) == 0:  # each node builds its own
        print(build_note, flush=True)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    resume_from = prepare_output_dir(training_args) if training_args.do_train else None

    tokenizer = load_tokenizer(
        model_args.model_name_or_path,
        model_max_length=data_args.max_seq_length,
        use_fast=model_args.use_fast_tokenizer,
    )
    model = load_model(model_args, data_args, compute_dtype(training_args))
    if model_args.use_liger:
        log(apply_liger_kernels(model))
    configure_trainable_parameters(model, model_args)
    if model_args.compile_llm_layers:
        log(compile_decoder_layers(model))
    checkpointing_note = leave_layers_out_of_checkpointing(model, model_args, data_args, training_args)
    if checkpointing_note:
        log(checkpointing_note)
    prepare_4bit_layers_for_checkpoints(model)
    trainable, total = count_parameters(model)
    log(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")

    train_dataset, eval_dataset = build_datasets(
        data_args.meta_path,
        tokenizer,
        num_image_token=model.num_image_token,
        seed=training_args.seed,
        **data_args.dataset_options(),
    )
    evaluating = training_args.do_eval or training_args.eval_strategy != "no"  # a str enum
    if evaluating and eval_dataset is None:
        raise ValueError(
            f"Evaluation was requested (--do_eval / --eval_strategy) but {data_args.meta_path} lists no evaluation "
            "records (a dataset whose name ends in '_val', with at least one record); add one, or drop --do_eval and "
            "set --eval_strategy no."
        )
    for warning in dataset_size_warnings(len(train_dataset), len(eval_dataset) if evaluating else None,
                                         training_args):  # fmt: skip
        log(warning)

    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if evaluating else None,
        data_collator=InternVLDataCollator(pad_token_id=tokenizer.pad_token_id, **data_args.collator_options()),
        processing_class=tokenizer,
        callbacks=[TrainingLogCallback(output_dir), RunRecordCallback(record), *early_stopping(training_args)],
        base_model_path=model_args.model_name_or_path,
        generation_evaluation=generation_evaluation,
    )
    if training_args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_run_record(output_dir, argv, record, training_args.world_size)
    if data_args.use_packed_ds and training_args.per_device_train_batch_size == 1:
        log("--use_packed_ds True packs the samples of a batch, and --per_device_train_batch_size 1 makes batches of "
            "one sample: nothing is packed. Raise the batch size (and lower --gradient_accumulation_steps) to pack.")
    log(
        f"Effective batch size: {trainer.effective_batch_size} = {training_args.per_device_train_batch_size} per "
        f"device x {training_args.gradient_accumulation_steps} gradient accumulation x {training_args.world_size} "
        "processes"
    )

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        trainer.save_model()
        metrics = {**result.metrics, "train_bad_samples": count_over_ranks(train_dataset.bad_samples)}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = eval_metrics_of_final_weights(trainer) or trainer.evaluate()
        metrics["eval_bad_samples"] = count_over_ranks(eval_dataset.bad_samples)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.do_train and training_args.should_save:
        log(write_loss_curves(output_dir))
        summary = RunSummary(
            model_args=model_args, data_args=data_args, training_args=training_args,
            num_train_samples=len(train_dataset), num_eval_samples=len(eval_dataset) if evaluating else None,
            global_step=trainer.state.global_step, weights_step=step_of_final_weights(trainer),
            train_metrics=result.metrics,
            eval_metrics=eval_metrics_of_final_weights(trainer), best_metric=trainer.state.best_metric,
            best_model_checkpoint=trainer.state.best_model_checkpoint, launch_command=last_launch_command(output_dir),
        )  # fmt: skip
        log(f"Model card: {write_model_card(summary, output_dir)}")
    log(f"Outputs are in {output_dir}")


# Faults of the input or the environment: one line, not a traceback per process.
USER_ERRORS = (ValueError, OSError, DatasetHealthError)


def one_line(error: BaseException) -> str:
    """The error's own message; for one re-raised from a DataLoader worker, without the worker's traceback that
    torch puts in front of it."""
    message = str(error)
    marker = f"{type(error).__name__}: "  # the traceback's last line: "package.module.Name: message"
    if message.startswith("Caught ") and "\nOriginal Traceback" in message and marker in message:
        return message.rsplit(marker, 1)[1].strip()
    return message


def run_command_line() -> None:
    """``main()`` as a command: a ``USER_ERRORS`` error is printed as one line and the exit code is 1. Input errors
    are the same on every process and printed by the first; others (a full disk, a broken file) by each process
    that meets them, as they may concern one node only."""
    try:
        main()
    except USER_ERRORS as error:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        elif not isinstance(error, ValueError):
            print(f"error (rank {rank}): {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    run_command_line()
