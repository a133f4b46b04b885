"""The trainer: the length-grouped sampler (the dataset's precomputed lengths, never a decoded sample), saves that
fail, the saved files' permissions, an evaluation set that cannot be built."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
from contextlib import contextmanager

import pytest
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from internvl.data.collate import InternVLDataCollator
from internvl.data.dataset import MetaEntry, build_datasets, write_meta
from internvl.model.loading import load_internvl_model
from internvl.train.arguments import parse_args
from internvl.train.checkpoint import CheckpointWriteError
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


@contextmanager
def file_size_limit(num_bytes: int):
    """Writes past ``num_bytes`` fail with EFBIG, as they fail with ENOSPC on a full disk."""
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, previous_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)


def trainer_with_optimizer_state(model, tmp_path) -> InternVLTrainer:
    trainer = make_trainer(model, LengthsOnlyDataset([1] * 4), tmp_path)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.ones_like(param)
    trainer.optimizer.step()  # Adam's moments: optimizer.pt is about twice the adapter
    trainer.state.global_step = 3
    return trainer


@pytest.mark.parametrize("limit, last_file, cause", [
    (60_000, "optimizer.pt", "unexpected pos"),  # torch's writer
    (20_000, None, "File too large"),  # safetensors' writer, in peft's scratch folder
])  # fmt: skip
def test_a_checkpoint_that_cannot_be_written_is_named_with_the_free_space_and_removed(lora_model, tmp_path, limit,
                                                                                       last_file, cause):
    """Above 60 kB the optimizer state fails, above 20 kB already the adapter: either way one error naming the
    folder, the file written last and the free space, and no incomplete checkpoint left behind."""
    trainer = trainer_with_optimizer_state(lora_model, tmp_path)
    with file_size_limit(limit), pytest.raises(CheckpointWriteError) as failure:
        trainer._save_checkpoint(trainer.model, None)
    message = str(failure.value)
    assert message.startswith(f"saving {tmp_path / 'checkpoint-3'} failed")
    assert cause in message and "MiB free on its disk" in message
    assert message.endswith("(the incomplete checkpoint-3 was removed)")
    if last_file:
        assert f"(last file written: {last_file})" in message
    assert not (tmp_path / "checkpoint-3").exists()

    trainer._save_checkpoint(trainer.model, None)  # without the limit it saves
    assert (tmp_path / "checkpoint-3" / "trainer_state.json").is_file()


def test_weight_files_get_the_permissions_of_every_other_file(lora_model, tmp_path):
    trainer = trainer_with_optimizer_state(lora_model, tmp_path)
    previous = os.umask(0o022)
    try:
        trainer._save_checkpoint(trainer.model, None)
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "checkpoint-3").iterdir()}
    assert modes["adapter_model.safetensors"] == modes["adapter_config.json"] == 0o644, modes


def test_an_evaluation_set_that_cannot_be_built_skips_the_evaluation(lora_model, tiny_tokenizer, tmp_path, caplog):
    late_system = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}, {"from": "system", "value": "!"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"conversations": late_system[:2]}) + "\n")
    (tmp_path / "chat_val.jsonl").write_text(json.dumps({"conversations": late_system}) + "\n")
    write_meta(tmp_path / "meta.json", {name: MetaEntry(root=".", annotation=f"{name}.jsonl", length=1)
                                        for name in ("chat", "chat_val")})  # fmt: skip
    _, evaluation = build_datasets(tmp_path / "meta.json", tiny_tokenizer)
    trainer = make_trainer(lora_model, LengthsOnlyDataset([1] * 4), tmp_path)
    with caplog.at_level(logging.WARNING):
        assert trainer.evaluate(evaluation) == {}
    assert "skipping bad evaluation sample chat_val chat_val.jsonl:1" in caplog.text
    assert "evaluation skipped at step 0" in caplog.text and "training goes on" in caplog.text
