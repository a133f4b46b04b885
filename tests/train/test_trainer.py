"""The trainer: length-grouped batches from the dataset's precomputed lengths (never a decoded sample); saves that
fail, the saved files' permissions, an evaluation set that cannot be built; and a loss normalized over the whole
optimizer step, so gradients do not depend on how a step is split into batches, accumulation steps or processes.

Run as a script (under torchrun), this file is the worker of the 2-process test: see ``distributed_worker``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

if __name__ == "__main__":  # started by torchrun as a file: make the packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from internvl.data.collate import InternVLDataCollator
from internvl.data.dataset import META_FOLDER, MetaEntry, build_datasets, write_meta
from internvl.model.loading import load_internvl_model, load_tokenizer
from internvl.train.arguments import parse_args
from internvl.train.checkpoint import CheckpointWriteError
from internvl.train.trainer import InternVLTrainer
from tests.conftest import _tiny_lora_model


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
    # Evaluation batches are grouped from the same lengths: no sample is built in the main process to measure it.
    eval_sampler = trainer._get_eval_sampler(LengthsOnlyDataset(lengths[:10]))
    assert isinstance(eval_sampler, LengthGroupedSampler) and eval_sampler.lengths == lengths[:10]
    assert sorted(eval_sampler) == list(range(10))


def test_group_by_length_order_is_the_same_on_every_process_and_new_each_epoch(lora_model, tmp_path):
    lengths = [(i * 37) % 101 + 1 for i in range(60)]
    trainer = make_trainer(lora_model, LengthsOnlyDataset(lengths), tmp_path, "--group_by_length", "True")
    orders = {}
    # Two processes whose global RNGs drifted apart (different dropout draws), at epochs 0 and 1.
    for process in (0, 1):
        torch.manual_seed(1000 + process)
        sampler = trainer._get_train_sampler()
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            orders[process, epoch] = list(sampler)
    assert orders[0, 0] == orders[1, 0] and orders[0, 1] == orders[1, 1]
    assert orders[0, 0] != orders[0, 1] and sorted(orders[0, 1]) == list(range(60))

    # Resumed halfway through epoch 1 (0-based), or starting epoch 2: the trainer gives the sampler that epoch.
    for epoch, expected in ((1.5, 1), (2.0, 2), (2.9999999999, 3)):
        trainer.state.epoch = epoch
        trainer.callback_handler.on_epoch_begin(trainer.args, trainer.state, trainer.control)
        assert trainer.length_grouped_sampler.epoch == expected


def test_group_by_length_without_lengths_is_an_error(lora_model, tmp_path):
    class NoLengths(torch.utils.data.Dataset):
        def __len__(self):
            return 3

    trainer = make_trainer(lora_model, NoLengths(), tmp_path, "--group_by_length", "True")
    with pytest.raises(ValueError, match="training dataset with one precomputed length"):
        trainer._get_train_sampler()
    with pytest.raises(ValueError, match="evaluation dataset with one precomputed length"):
        trainer._get_eval_sampler(NoLengths())


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
    entries = {name: MetaEntry(root=".", annotation=f"{name}.jsonl", length=1, paths_relative_to=META_FOLDER)
               for name in ("chat", "chat_val")}  # fmt: skip
    write_meta(tmp_path / "meta.json", entries)
    _, evaluation = build_datasets(tmp_path / "meta.json", tiny_tokenizer)
    # Samples built in this process, so that their warnings reach caplog (a loader worker prints its own).
    trainer = make_trainer(lora_model, LengthsOnlyDataset([1] * 4), tmp_path, "--dataloader_num_workers", "0")
    with caplog.at_level(logging.WARNING):
        assert trainer.evaluate(evaluation) == {}
    assert "skipping bad evaluation sample chat_val chat_val.jsonl:1" in caplog.text
    assert "evaluation skipped at step 0" in caplog.text and "training goes on" in caplog.text


# --- loss normalized over the optimizer step ------------------------------------------------------------------------


class GradientRecorder(TrainerCallback):
    """The trainable parameters' gradients just before the optimizer step (without DeepSpeed)."""

    def __init__(self, model):
        self.model, self.grads = model, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def one_step_args(output_dir, batch_size: int, accumulation: int, *extra: str):
    return ["--model_name_or_path", "m", "--meta_path", "x", "--output_dir", str(output_dir), "--max_steps", "1",
            "--per_device_train_batch_size", str(batch_size), "--gradient_accumulation_steps", str(accumulation),
            "--max_grad_norm", "0", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--train_sampling_strategy", "sequential", "--dataloader_num_workers", "0", *extra]  # fmt: skip


def train_one_step(model, samples, pad_token_id, argv) -> tuple[dict[str, torch.Tensor], float, int]:
    """Gradients of one optimizer step (learning rate 0, so the model is left as it was), the logged loss and the
    input tokens the trainer counted."""
    _, data_args, args = parse_args(argv + ["--learning_rate", "0"])
    recorder = GradientRecorder(model)
    collator = InternVLDataCollator(pad_token_id, **data_args.collator_options())
    trainer = InternVLTrainer(model=model, args=args, train_dataset=ListDataset(samples), data_collator=collator,
                              callbacks=[recorder], base_model_path="m")  # fmt: skip
    trainer.train()
    return recorder.grads, trainer.state.log_history[0]["loss"], trainer.state.num_input_tokens_seen


def whole_batch_loss_and_grads(model, samples, pad_token_id, reduction: str):
    """The reference: every sample of the step in one batch, as the model normalizes it by itself."""
    model.zero_grad()
    batch = InternVLDataCollator(pad_token_id, loss_reduction=reduction)(samples)
    loss = model(**batch, return_logits=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.item(), grads


def assert_same_grads(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert expected and actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_gradients_do_not_depend_on_how_the_step_is_split(
    tiny_lora_model, tiny_tokenizer, tiny_video_samples, tmp_path, reduction
):
    model, samples, pad = without_dropout(tiny_lora_model), tiny_video_samples, tiny_tokenizer.pad_token_id
    loss, grads = whole_batch_loss_and_grads(model, samples, pad, reduction)
    if reduction == "token":
        # Summaries of 1 to 40 words: a mean of per-batch means would weigh the tokens differently.
        batch_means = [whole_batch_loss_and_grads(model, [sample], pad, reduction)[0] for sample in samples]
        assert abs(sum(batch_means) / len(batch_means) - loss) > 1e-2
    packed = ["--use_packed_ds", "True", "--max_seq_length", "4096"]  # rows of up to 4096 tokens
    for batch_size, accumulation, packing in [(1, 4, []), (4, 1, []), (2, 2, packed)]:
        step_grads, logged_loss, tokens_seen = train_one_step(model, samples, pad, one_step_args(
            tmp_path / f"{batch_size}x{accumulation}", batch_size, accumulation, "--loss_reduction", reduction, *packing
        ))  # fmt: skip
        assert_same_grads(step_grads, grads)
        # The logged loss is the step's (weighted) mean per token, however the step was split.
        assert logged_loss == pytest.approx(loss, abs=1e-5)
        assert tokens_seen == sum(len(sample["input_ids"]) for sample in samples)


@pytest.mark.parametrize("packing", [[], ["--use_packed_ds", "True", "--max_seq_length", "4096"]])
def test_samples_seen_are_the_samples_trained_on(tiny_lora_model, tiny_tokenizer, tiny_video_samples, tmp_path,
                                                 packing):  # fmt: skip
    """Three samples in a step of nominally 2 x 2: samples/s counts three, packed into rows or not."""
    _, data_args, args = parse_args(one_step_args(tmp_path, 2, 2, *packing))
    collator = InternVLDataCollator(tiny_tokenizer.pad_token_id, **data_args.collator_options())
    trainer = InternVLTrainer(model=tiny_lora_model, args=args, train_dataset=ListDataset(tiny_video_samples[:3]),
                              data_collator=collator, base_model_path="m")  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.effective_batch_size == 4 * args.world_size
    assert trainer._samples_seen() == 3
    assert trainer.state.log_history[0]["samples_per_second"] > 0


def test_evaluation_computes_the_loss_without_full_logits(
    tiny_lora_model, tiny_tokenizer, tiny_video_samples, tmp_path
):
    model, samples, pad = without_dropout(tiny_lora_model), tiny_video_samples, tiny_tokenizer.pad_token_id
    loss, _ = whole_batch_loss_and_grads(model, samples, pad, "token")
    _, _, args = parse_args(one_step_args(tmp_path, 1, 1, "--per_device_eval_batch_size", "4"))
    trainer = InternVLTrainer(model=model, args=args, data_collator=InternVLDataCollator(pad), base_model_path="m")
    logits = []
    hook = model.register_forward_hook(lambda module, inputs, outputs: logits.append(outputs.logits))
    try:
        metrics = trainer.evaluate(ListDataset(samples))
    finally:
        hook.remove()
    assert logits == [None]  # one batch, scored from the supervised positions only
    assert metrics["eval_loss"] == pytest.approx(loss, abs=1e-5)



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


# The 2-process run: DeepSpeed ZeRO-3 (gradient averaging over processes, its own gradient-accumulation scaling) with
# a plain SGD step, so the weights after one step are the initial weights minus the learning rate times the gradient.
ZERO3_WITH_TRAINER_OPTIMIZER = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}
SGD_LEARNING_RATE = 0.5


def distributed_worker(model_dir: str, initial_weights: str, output_dir: str, ds_config: str) -> None:
    """One process of the 2-process run: 1 sample per process x 2 accumulation steps x 2 processes, one SGD step;
    rank 0 writes the trained weights and the logged loss."""
    from internvl.train.checkpoint import gather_trainable_state_dict
    from tests.conftest import _tiny_lora_model, make_tiny_video_samples

    model = without_dropout(_tiny_lora_model(model_dir))
    model.load_state_dict(load_file(initial_weights), strict=False)
    tokenizer = load_tokenizer(model_dir)
    samples = make_tiny_video_samples(tokenizer, model.num_image_token)
    _, data_args, args = parse_args(
        one_step_args(output_dir, 1, 2, "--deepspeed", ds_config, "--optim", "sgd", "--learning_rate",
                      str(SGD_LEARNING_RATE), "--lr_scheduler_type", "constant")
    )  # fmt: skip
    collator = InternVLDataCollator(tokenizer.pad_token_id, **data_args.collator_options())
    trainer = InternVLTrainer(model=model.train(), args=args, train_dataset=ListDataset(samples),
                              data_collator=collator, base_model_path=model_dir)  # fmt: skip
    trainer.train()
    state = gather_trainable_state_dict(trainer.model)
    if args.should_save:
        save_file(state, str(Path(output_dir) / "trained.safetensors"))
        logged = {"loss": trainer.state.log_history[0]["loss"], "world_size": args.world_size}
        (Path(output_dir) / "logged.json").write_text(json.dumps(logged))


@pytest.mark.e2e
def test_two_processes_under_zero3_equal_one_batch(tiny_model_dir, tiny_tokenizer, tiny_video_samples, tmp_path):
    from tests.scripts.test_finetune import free_port, run_env

    model = without_dropout(_tiny_lora_model(tiny_model_dir))
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_file(initial, str(tmp_path / "initial.safetensors"))
    loss, grads = whole_batch_loss_and_grads(model, tiny_video_samples, tiny_tokenizer.pad_token_id, "token")
    ds_config = tmp_path / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3_WITH_TRAINER_OPTIMIZER))

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), __file__, str(tiny_model_dir), str(tmp_path / "initial.safetensors"),
               str(tmp_path / "run"), str(ds_config)]  # fmt: skip
    result = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    logged = json.loads((tmp_path / "run" / "logged.json").read_text())
    assert logged["world_size"] == 2
    assert logged["loss"] == pytest.approx(loss, abs=1e-5)
    trained = load_file(tmp_path / "run" / "trained.safetensors")
    step = {name: (initial[name] - trained[name]) / SGD_LEARNING_RATE for name in initial}
    assert_same_grads(step, grads)


if __name__ == "__main__":
    distributed_worker(*sys.argv[1:])
