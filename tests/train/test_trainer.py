"""The trainer's length-grouped sampler: the dataset's precomputed lengths, never a decoded sample."""

from __future__ import annotations

import pytest
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from internvl.data.collate import InternVLDataCollator
from internvl.model.loading import load_internvl_model
from internvl.train.arguments import parse_args
from internvl.train.trainer import InternVLTrainer


class LengthsOnlyDataset(torch.utils.data.Dataset):
    """Decoding a sample is an error: the sampler must use ``lengths``."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        raise AssertionError("the sampler decoded a sample")


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    model = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    model.requires_grad_(False)
    model.wrap_llm_lora(r=2)
    return model


def make_trainer(model, dataset, tmp_path, *extra):
    _, _, args = parse_args(["--model_name_or_path", "m", "--meta_path", "x", "--output_dir", str(tmp_path),
                             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3",
                             "--report_to", "none", *extra])  # fmt: skip
    return InternVLTrainer(model=model, args=args, train_dataset=dataset, data_collator=InternVLDataCollator(0),
                           base_model_path="m")  # fmt: skip


def test_group_by_length_uses_precomputed_lengths(lora_model, tmp_path):
    lengths = [(i * 37) % 101 + 1 for i in range(60)]
    trainer = make_trainer(lora_model, LengthsOnlyDataset(lengths), tmp_path, "--group_by_length", "True")
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths == lengths
    assert sampler.batch_size == trainer.effective_batch_size == 2 * 3 * trainer.args.world_size
    assert sorted(sampler) == list(range(60))


def test_group_by_length_without_lengths_is_an_error(lora_model, tmp_path):
    class NoLengths(torch.utils.data.Dataset):
        def __len__(self):
            return 3

    trainer = make_trainer(lora_model, NoLengths(), tmp_path, "--group_by_length", "True")
    with pytest.raises(ValueError, match="precomputed length"):
        trainer._get_train_sampler()


def test_random_sampling_by_default(lora_model, tmp_path):
    trainer = make_trainer(lora_model, LengthsOnlyDataset([5] * 8), tmp_path)
    assert isinstance(trainer._get_train_sampler(), torch.utils.data.RandomSampler)


def test_a_model_with_nothing_to_train_is_refused(tiny_model_dir, tmp_path):
    frozen = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_trainer(frozen, LengthsOnlyDataset([1]), tmp_path)


def test_zero3_leaf_modules_that_would_drop_gradients_are_refused(tiny_lora_model):
    from deepspeed.utils import set_z3_leaf_modules
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2Model

    from internvl.model.vision import InternVisionModel
    from internvl.train.trainer import check_zero3_leaf_modules

    check_zero3_leaf_modules(tiny_lora_model)  # no leaves
    # Decoder layers (hidden states passed positionally) and the frozen vision tower may be leaves.
    set_z3_leaf_modules(tiny_lora_model, [Qwen2DecoderLayer, InternVisionModel])
    check_zero3_leaf_modules(tiny_lora_model)
    # The LLM body, fed inputs_embeds by keyword, holding the LoRA weights: its gradients would be dropped.
    set_z3_leaf_modules(tiny_lora_model, [Qwen2Model])
    with pytest.raises(ValueError, match=r"made language_model\.base_model\.model\.model a leaf module"):
        check_zero3_leaf_modules(tiny_lora_model)
