"""The HF ``Trainer`` specialised for InternVL LoRA fine-tuning.

Changes to the stock trainer:
- length-grouped batches, in training and evaluation, use the dataset's precomputed ``lengths`` (the stock sampler
  would decode every sample to measure it); in training, in an order drawn from the seed and the epoch, so that
  every process draws the same one and a resumed run the same one again (the stock sampler draws from each
  process's global RNG, which drift apart with the first epoch's dropout: from the second epoch on, the processes
  trained some samples twice and others not at all, and a run resumed inside a later epoch drew the first epoch's
  order);
- ``save_model`` writes the trained weights only (peft adapters and any other trainable tensors), gathered from
  the ZeRO-3 partitions first, so what is saved is what was trained (and resuming without DeepSpeed loads them);
- the loss of a batch is divided by the summed loss weights of the whole optimizer step (all accumulation steps
  and, with ``average_tokens_across_devices``, all processes): transformers' ``num_items_in_batch`` path, fed with
  the collator's ``loss_weight`` (1 per trained token for ``--loss_reduction token``). Gradients then do not depend
  on how a step is split into batches, accumulation steps or processes, and the logged loss is the step's weighted
  mean per token;
- evaluation asks the model for the loss only (``prediction_loss_only``), so no [batch, length, vocab] logits;
  with a ``generation_evaluation`` (``--eval_generate True``) it then generates summaries of the validation records
  and adds their ROUGE / BLEU / CIDEr to the evaluation's metrics (``eval_rougeL``, ...), which
  ``--metric_for_best_model`` and early stopping can use;
- an evaluation set of which no sample can be built skips that evaluation with a warning instead of ending the run
  (``internvl.data.dataset`` skips the samples that fail and counts them);
- a checkpoint or final save that fails (a full disk) is one ``CheckpointWriteError`` naming the folder, the last
  file written and the free space, and the incomplete checkpoint is removed;
- the best checkpoint (``--load_best_model_at_end``) is loaded from the trained weights a checkpoint holds when
  DeepSpeed is off (the stock trainer looks for a whole model or a top-level peft adapter);
- logged values include tokens/s, samples/s (of the samples trained on, counted per batch) and peak GPU memory;
- training stops before its first step if a DeepSpeed ZeRO-3 leaf module would drop gradients
  (``check_zero3_leaf_modules``).
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import Trainer, TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_pt_utils import LengthGroupedSampler

from internvl.constants import IGNORE_INDEX
from internvl.data.dataset import NoEvaluationSampleError
from internvl.data.packing import packed_token_mask, sample_lengths
from internvl.train.callbacks import ThroughputMeter
from internvl.train.checkpoint import (
    TRAINER_STATE_NAME,
    CheckpointWriteError,
    checkpoint_write_error,
    gather_trainable_state_dict,
    load_trained_weights,
    save_trained_weights,
)
from internvl.train.generation_metrics import GenerationEvaluation, write_generations

logger = logging.getLogger(__name__)


@contextmanager
def _adapters_visible_to_quantization_check(model):
    """The stock trainer refuses a 4-bit model unless the model itself carries peft adapters; here they sit on
    sub-modules (``language_model``, ``vision_model``), which its check cannot see. Flag them for the check only:
    the flag also changes ``save_pretrained``, so it does not stay set."""
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError("The model has no trainable parameters: nothing to fine-tune.")
    previous = model.__dict__.get("_hf_peft_config_loaded")
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if previous is None:
            del model._hf_peft_config_loaded
        else:
            model._hf_peft_config_loaded = previous


def check_zero3_leaf_modules(model) -> None:
    """Refuse ZeRO-3 leaf modules that would lose their gradients.

    A leaf module (``stage3_module_granularity_threshold``, or ``zero_optimization.leaf_module``) has its weights
    fetched as one unit; DeepSpeed hands its parameters' gradients to the optimizer only when the leaf's backward
    hook fires, and that hook hangs on the leaf's positional tensor inputs. A leaf fed by keyword (the LLM's
    ``Qwen2Model``, fed ``inputs_embeds=``, or the whole model) never gets it: on CPU its LoRA gradients stayed on
    the parameters and the optimizer stepped without them. Decoder layers take the hidden states positionally, so
    they may be leaves; so may modules with nothing to train.
    """
    from deepspeed.utils import z3_leaf_module

    losing = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if z3_leaf_module(module)
        and not isinstance(module, GradientCheckpointingLayer)
        and any(param.requires_grad for param in module.parameters())
    ]
    if losing:
        raise ValueError(
            f"DeepSpeed ZeRO-3 made {', '.join(losing[:3])}{' and others' if len(losing) > 3 else ''} a leaf module "
            "(stage3_module_granularity_threshold or leaf_module in the DeepSpeed config). It holds trained "
            "parameters and takes its inputs by keyword, so DeepSpeed would drop their gradients. Lower "
            "stage3_module_granularity_threshold until only decoder layers are leaves (or list them in "
            "zero_optimization.leaf_module.classes), or remove it."
        )


def _precomputed_lengths(dataset, which: str) -> list[int]:
    lengths = getattr(dataset, "lengths", None)
    if lengths is None or len(lengths) != len(dataset):
        raise ValueError(
            f"--group_by_length needs a {which} dataset with one precomputed length per sample (`lengths`)."
        )
    return [int(n) for n in lengths]


class _Zero3LeafCheck(TrainerCallback):
    # At train begin DeepSpeed has set its leaf modules and no step has run.
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.deepspeed and model is not None:
            check_zero3_leaf_modules(model)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """``LengthGroupedSampler`` whose order depends on ``seed`` and the epoch (``set_epoch``) only: the same on every
    process, and the same epoch's order again when a run resumes inside it."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class _SamplerEpoch(TrainerCallback):
    """Tells the length-grouped sampler its epoch before the epoch's batches are drawn. The Trainer's own call
    (through accelerate) does not reach it when a resume skips the epoch's first batches (transformers 5.24):
    resumed runs then drew the first epoch's order again and trained on other samples than the run they continue.
    ``state.epoch`` is the whole epoch at an epoch's start, and the epoch plus the trained part when resuming."""

    def __init__(self, trainer: InternVLTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer.length_grouped_sampler
        if sampler is not None:
            sampler.set_epoch(int(state.epoch + 1e-9))  # 2.9999999... from float sums is still epoch 3


class InternVLTrainer(Trainer):
    def __init__(
        self, *args, model, base_model_path: str, generation_evaluation: GenerationEvaluation | None = None, **kwargs
    ):
        with _adapters_visible_to_quantization_check(model):
            super().__init__(*args, model=model, **kwargs)
        self.base_model_path = base_model_path
        self.generation_evaluation = generation_evaluation
        self.throughput = ThroughputMeter()
        self._samples_seen_here = 0  # training samples of this process in this run
        self.add_callback(self.throughput)
        self.add_callback(_Zero3LeafCheck())
        self.length_grouped_sampler: EpochSeededLengthGroupedSampler | None = None
        self.add_callback(_SamplerEpoch(self))

    @property
    def effective_batch_size(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size

    def _get_train_sampler(self, train_dataset=None):
        train_dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        # One group is one optimizer step over all ranks, as in the official recipe.
        self.length_grouped_sampler = EpochSeededLengthGroupedSampler(
            self.effective_batch_size, _precomputed_lengths(train_dataset, "training"), self._sampler_seed()
        )
        return self.length_grouped_sampler

    def _sampler_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def _get_eval_sampler(self, eval_dataset):
        # The stock sampler would build every evaluation sample in the main process to measure it, at each
        # evaluation (decoding video there, beside the loader workers, can also hang in FFmpeg's threads).
        if eval_dataset is None or self.args.train_sampling_strategy != "group_by_length":
            return super()._get_eval_sampler(eval_dataset)
        return LengthGroupedSampler(self.args.eval_batch_size, lengths=_precomputed_lengths(eval_dataset, "evaluation"),
                                    generator=torch.Generator().manual_seed(self._sampler_seed()))  # fmt: skip

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The loss normalizer of one optimizer step: the summed weights of its targets (the trained next tokens),
        over the step's batches and, as transformers does for token counts, over all processes."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        weights = [
            batch["loss_weight"][:, 1:] if "loss_weight" in batch else batch["labels"][:, 1:] != IGNORE_INDEX
            for batch in batch_samples
        ]
        total = sum(w.sum() for w in weights).to(device=device, dtype=torch.float32)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def _track_num_input_tokens(self, inputs) -> None:
        # A packed batch has no attention mask (see internvl.data.packing); without one the stock count would fall
        # back to counting the main input, pixel_values.
        self._samples_seen_here += len(sample_lengths(inputs))
        if "attention_mask" not in inputs and "position_ids" in inputs:
            inputs = {**inputs, "attention_mask": packed_token_mask(inputs["position_ids"])}
        super()._track_num_input_tokens(inputs)

    def _samples_seen(self) -> int:
        """Training samples of all processes in this run (every process logs at the same steps)."""
        count = torch.tensor(self._samples_seen_here, device=self.args.device, dtype=torch.int64)
        return int(self.accelerator.reduce(count, reduction="sum").item())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.prediction_loss_only and not model.training:
            inputs = {**inputs, "return_logits": False}  # the loss alone: keep the supervised-only projection
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every rank joins the ZeRO-3 gather; only the main process writes.
        output_dir = Path(output_dir or self.args.output_dir)
        state = gather_trainable_state_dict(self.model)
        if self.args.should_save:
            try:
                save_trained_weights(self.model, state, output_dir, base_model_path=self.base_model_path)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
            except (OSError, SafetensorError) as error:
                raise checkpoint_write_error(output_dir, error) from error

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as error:  # torch's writer on a full disk: "basic_ios::clear: iostream error"
            failure = error if isinstance(error, CheckpointWriteError) else checkpoint_write_error(folder, error)
            # Without its trainer state the folder is never resumed from; removing it gives the space back.
            if self.args.should_save and folder.is_dir() and not (folder / TRAINER_STATE_NAME).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                failure.args = (f"{failure} (the incomplete {folder.name} was removed)",)
            if failure is error:
                raise
            raise failure from error

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        try:
            return super().evaluate(*args, **kwargs)
        except NoEvaluationSampleError:
            logger.warning("evaluation skipped at step %d: no evaluation sample can be built (each is named in a "
                           "warning above); training goes on", self.state.global_step)
            return {}

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):  # fmt: skip
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.generation_evaluation is not None:  # the loop left the model in eval mode (no dropout)
            scores, lines = self.generation_evaluation.run(self.model, self.processing_class)
            output.metrics.update({f"{metric_key_prefix}_{name}": score for name, score in scores.items()})
            if self.args.should_save:
                write_generations(self.args.output_dir, self.state.global_step, lines, scores)
        return output

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:  # DeepSpeed's own checkpoint holds the weights
            return super()._load_best_model()
        load_trained_weights(self.model, self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Resuming without DeepSpeed: the checkpoint holds the trained weights only (see save_model).
        load_trained_weights(model if model is not None else self.model, resume_from_checkpoint)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.throughput.measure(self.state, self._samples_seen()))
        super().log(logs, start_time)
