"""--grad_checkpoint_skip_layers on the tiny model: a number leaves that many last layers out, "auto" as many as the
memory estimate fits in the budget, and bad values fail before anything loads."""

from __future__ import annotations

import pytest

from internvl.model.checkpointing import checkpointed_layers
from internvl.model.dims import ModelDims
from internvl.tools.resource_estimates import ASSUMED_ANSWER_TOKENS, GIB, estimate_gpu_memory
from internvl.train import memory_budget
from internvl.train.arguments import parse_args
from internvl.train.memory_budget import BUDGET_SHARE, leave_layers_out_of_checkpointing


def arguments(tmp_path, *extra):
    return parse_args(["--model_name_or_path", "m", "--meta_path", "meta.json", "--output_dir", str(tmp_path),
                       "--report_to", "none", "--use_llm_lora", "8", "--per_device_train_batch_size", "2",
                       "--max_seq_length", "2048", "--max_num_frame", "4", *extra])  # fmt: skip


def _checkpointed_model(tiny_lora_model):
    tiny_lora_model.gradient_checkpointing_enable()
    return tiny_lora_model


def test_a_number_leaves_the_last_layers_out(tiny_lora_model, tmp_path):
    model = _checkpointed_model(tiny_lora_model)
    note = leave_layers_out_of_checkpointing(model, *arguments(tmp_path, "--grad_checkpoint_skip_layers", "1"))
    assert checkpointed_layers(model) == [0]
    assert note == "Gradient checkpointing: decoder layers 0-0 of 2; layers 1-1 keep their activations."


def test_the_default_checkpoints_every_layer(tiny_lora_model, tmp_path):
    model = _checkpointed_model(tiny_lora_model)
    assert leave_layers_out_of_checkpointing(model, *arguments(tmp_path)) is None
    assert checkpointed_layers(model) == [0, 1]


@pytest.mark.parametrize("expected_layers", [0, 1, 2])
def test_auto_leaves_out_as_many_layers_as_the_estimate_fits(tiny_lora_model, tmp_path, expected_layers):
    model = _checkpointed_model(tiny_lora_model)
    dims = ModelDims.from_config(model.config)
    settings = dict(lora_rank=8, micro_batch_size=2, max_seq_length=2048, max_num_frame=4,
                    answer_tokens=ASSUMED_ANSWER_TOKENS, num_gpus=1, zero_stage=0, offload_param=False,
                    offload_optimizer=False)  # fmt: skip
    # A budget between the estimated peaks with `expected_layers` and one more layer left out.
    fits = estimate_gpu_memory(dims, uncheckpointed_layers=expected_layers, **settings).peak
    budget_gib = (fits + 1000) / BUDGET_SHARE / GIB
    if expected_layers < 2:
        assert estimate_gpu_memory(dims, uncheckpointed_layers=expected_layers + 1, **settings).peak > fits + 1000
    model_args, data_args, training_args = arguments(
        tmp_path, "--grad_checkpoint_skip_layers", "auto", "--grad_checkpoint_memory_gb", repr(budget_gib)
    )
    note = leave_layers_out_of_checkpointing(model, model_args, data_args, training_args)
    assert checkpointed_layers(model) == list(range(2 - expected_layers))
    assert "--grad_checkpoint_skip_layers auto" in note and f"{budget_gib:.1f} GiB per GPU" in note
    assert "micro-batch 2 x 2048 tokens" in note


def test_auto_without_a_gpu_needs_a_budget(tiny_lora_model, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_budget.torch.cuda, "is_available", lambda: False)
    model = _checkpointed_model(tiny_lora_model)
    with pytest.raises(ValueError, match="pass --grad_checkpoint_memory_gb"):
        leave_layers_out_of_checkpointing(model, *arguments(tmp_path, "--grad_checkpoint_skip_layers", "auto"))


def test_a_bad_value_fails_when_the_arguments_are_read(tmp_path):
    with pytest.raises(ValueError, match="--grad_checkpoint_skip_layers '-1': give a number"):
        arguments(tmp_path, "--grad_checkpoint_skip_layers", "-1")
