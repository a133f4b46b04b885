"""The HF ``Trainer`` specialised for InternVL LoRA fine-tuning.

Changes to the stock trainer:
- length-grouped batches use the dataset's precomputed ``lengths`` (the stock sampler would decode every sample
  to measure it);
- ``save_model`` writes the trained weights only (peft adapters and any other trainable tensors), gathered from
  the ZeRO-3 partitions first, so what is saved is what was trained (and resuming without DeepSpeed loads them);
- an evaluation set of which no sample can be built skips that evaluation with a warning instead of ending the run
  (``internvl.data.dataset`` skips the samples that fail and counts them);
- a checkpoint or final save that fails (a full disk) is one ``CheckpointWriteError`` naming the folder, the last
  file written and the free space, and the incomplete checkpoint is removed;
- logged values include tokens/s, samples/s and peak GPU memory.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from internvl.data.dataset import NoEvaluationSampleError
from internvl.train.callbacks import ThroughputMeter
from internvl.train.checkpoint import (
    TRAINER_STATE_NAME,
    CheckpointWriteError,
    checkpoint_write_error,
    gather_trainable_state_dict,
    load_trained_weights,
    save_trained_weights,
)

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


class InternVLTrainer(Trainer):
    def __init__(self, *args, model, base_model_path: str, **kwargs):
        with _adapters_visible_to_quantization_check(model):
            super().__init__(*args, model=model, **kwargs)
        self.base_model_path = base_model_path
        self.throughput = ThroughputMeter(samples_per_step=self.effective_batch_size)
        self.add_callback(self.throughput)

    @property
    def effective_batch_size(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size

    def _get_train_sampler(self, train_dataset=None):
        train_dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        lengths = getattr(train_dataset, "lengths", None)
        if lengths is None or len(lengths) != len(train_dataset):
            raise ValueError(
                "--group_by_length needs a training dataset with one precomputed length per sample (`lengths`)."
            )
        # One group is one optimizer step over all ranks, as in the official recipe.
        return LengthGroupedSampler(self.effective_batch_size, lengths=[int(n) for n in lengths])

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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Resuming without DeepSpeed: the checkpoint holds the trained weights only (see save_model).
        load_trained_weights(model if model is not None else self.model, resume_from_checkpoint)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.throughput.measure(self.state))
        super().log(logs, start_time)
