"""The recipe's own steps around the Trainer: argument checks, output folder (resume or start over), parameter
counts, loss curves at the end of a run."""

from __future__ import annotations

import json

import pytest
import torch

from internvl.data.dataset import DatasetHealthError
from internvl.model.loading import load_internvl_model
from internvl.train.arguments import parse_args
from internvl.train.internvl_chat_finetune import (
    check_arguments,
    count_parameters,
    one_line,
    prepare_output_dir,
    write_loss_curves,
)


def arguments(output_dir, *extra):
    return parse_args(["--model_name_or_path", "m", "--meta_path", "meta.json", "--output_dir", str(output_dir),
                       "--report_to", "none", *extra])  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "Nothing to do"),
        (["--do_train", "True"], "4-bit LLM cannot be trained directly"),
        (["--do_train", "True", "--freeze_llm", "True", "--freeze_backbone", "True", "--freeze_mlp", "True"],
         "nothing to train"),
        (["--do_train", "True", "--use_llm_lora", "8", "--grad_checkpoint", "False",
          "--grad_checkpoint_skip_layers", "auto"], "gradient checkpointing, which is off"),
        (["--do_train", "True", "--use_llm_lora", "8", "--grad_checkpoint_memory_gb", "0"], "must be positive"),
        (["--do_train", "True", "--use_llm_lora", "8", "--num_train_epochs", "0"], "--num_train_epochs 0 trains nothing"),
    ],
)  # fmt: skip
def test_arguments_that_cannot_train_are_refused_before_loading(tmp_path, extra, message):
    model_args, _, training_args = arguments(tmp_path, *extra)
    with pytest.raises(ValueError, match=message):
        check_arguments(model_args, training_args)


def make_checkpoint(output_dir, step, complete=True):
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "trainer_state.json").write_text("{}")
    return folder


def test_rerun_resumes_from_the_last_complete_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, complete=False)  # killed while saving
    _, _, training_args = arguments(tmp_path, "--do_train", "True")
    assert prepare_output_dir(training_args) == str(tmp_path / "checkpoint-2")


def test_overwrite_output_dir_starts_over(tmp_path):
    make_checkpoint(tmp_path, 2)
    (tmp_path / "training_log.txt").write_text("step 1/2 | ...\n")
    (tmp_path / "command.txt").write_text("# the earlier run\n")
    _, _, training_args = arguments(tmp_path, "--do_train", "True", "--overwrite_output_dir", "True")
    assert prepare_output_dir(training_args) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["command.txt"]  # every launch stays recorded


def test_parameter_counts_are_in_weights_whatever_the_storage(tiny_model_dir):
    full = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    quantized = load_internvl_model(tiny_model_dir, load_in_4bit=True, torch_dtype=torch.bfloat16)
    # A packed 4-bit element holds several weights: both models have the same number of weights.
    assert count_parameters(quantized)[1] == count_parameters(full)[1] == sum(p.numel() for p in full.parameters())

    # Under ZeRO-3 a partitioned parameter is empty on a rank; DeepSpeed records its size as ds_numel.
    partitioned = torch.nn.Linear(4, 3)
    for param in partitioned.parameters():
        param.ds_numel = param.numel()
        param.data = torch.empty(0)
    partitioned.bias.requires_grad_(False)
    assert count_parameters(partitioned) == (12, 15)


def test_loss_curves_or_why_there_are_none(tmp_path):
    # A run shorter than --logging_steps, without evaluation: the trainer state holds only the final summary.
    state = {"global_step": 3, "log_history": [{"step": 3, "train_runtime": 1.0, "train_loss": 2.0}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert "--logging_steps" in write_loss_curves(tmp_path)
    assert not (tmp_path / "loss_curves.png").exists()

    state["log_history"].insert(0, {"step": 3, "loss": 2.0})  # one point: a note, not a dot
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert write_loss_curves(tmp_path).startswith("No loss curve: fewer than two losses were logged")
    assert (tmp_path / "loss_curves.png").stat().st_size > 0

    state["log_history"].insert(0, {"step": 2, "loss": 2.5})
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert write_loss_curves(tmp_path) == f"Loss curves: {tmp_path / 'loss_curves.png'}"
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


def test_training_started_without_the_launcher_fixes_the_arch_list_first(monkeypatch, tmp_path, capsys):
    from internvl.train import internvl_chat_finetune

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    with pytest.raises(ValueError, match="Nothing to do"):  # stops before loading anything
        internvl_chat_finetune.main(["--model_name_or_path", "m", "--meta_path", "meta.json", "--output_dir",
                                     str(tmp_path), "--report_to", "none"])  # fmt: skip
    assert internvl_chat_finetune.os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert "TORCH_CUDA_ARCH_LIST='9.0a' set to '9.0'" in capsys.readouterr().out


def test_output_folder_that_is_the_base_model_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch,
                                                                        capsys):
    """The base model's files stay as they were, and the command says why in one line (exit code 1)."""
    import sys

    from internvl.train import internvl_chat_finetune
    from tests.train.test_launch import write_split_meta

    before = {path.name: path.read_bytes() for path in tiny_model_dir.iterdir()}
    argv = ["--model_name_or_path", str(tiny_model_dir), "--meta_path", str(write_split_meta(tmp_path)),
            "--output_dir", str(tiny_model_dir), "--do_train", "True", "--use_llm_lora", "8", "--freeze_llm", "True",
            "--report_to", "none"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["internvl_chat_finetune.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        internvl_chat_finetune.run_command_line()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: --output_dir {tiny_model_dir} is the base model folder")
    assert {path.name: path.read_bytes() for path in tiny_model_dir.iterdir()} == before


class _Unbuildable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise DatasetHealthError("10 of the last 10 samples could not be built")


def test_an_error_from_a_dataloader_worker_is_its_own_message():
    """torch puts the worker's traceback in front of the message of an error raised in a DataLoader worker."""
    with pytest.raises(DatasetHealthError) as raised:
        next(iter(torch.utils.data.DataLoader(_Unbuildable(), num_workers=1)))
    assert "Original Traceback" in str(raised.value)
    assert one_line(raised.value) == "10 of the last 10 samples could not be built"
    assert one_line(ValueError("a plain one")) == "a plain one"
