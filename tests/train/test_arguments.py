"""Argument parsing: the guide's command, the flags transformers 5 dropped, unsupported official flags, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvl.train import arguments
from internvl.train.arguments import CONFIGS_DIR, parse_args, resolve_deepspeed_config
from tests.scripts.test_finetune import guide_training_args

GUIDE_ARGS = guide_training_args()

MINIMAL = ["--model_name_or_path", "m", "--meta_path", "meta.json", "--output_dir", "out"]


def test_guide_command_parses_with_the_meaning_of_every_flag(tmp_path):
    model_args, data_args, training_args = parse_args(GUIDE_ARGS)

    assert (model_args.use_llm_lora, model_args.freeze_llm, model_args.freeze_mlp, model_args.freeze_backbone) == (
        32, True, True, True
    )
    assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4"
    assert (data_args.max_seq_length, data_args.max_dynamic_patch, data_args.conv_style) == (8192, 12, "internvl2_5")
    # The four flags transformers 5 removed keep their meaning.
    assert str(training_args.eval_strategy.value) == "steps" and training_args.eval_steps == 100
    assert training_args.warmup_steps == pytest.approx(0.03)
    assert training_args.get_warmup_steps(1000) == 30
    assert training_args.train_sampling_strategy == "group_by_length"
    assert training_args.overwrite_output_dir is True
    # A bare DeepSpeed config name is the file shipped in configs/.
    assert Path(training_args.deepspeed) == CONFIGS_DIR / "zero_stage3_config.json"
    assert training_args.report_to == ["tensorboard"]
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (4, 4)


def test_defaults_without_the_older_flags():
    _, _, training_args = parse_args(MINIMAL)
    assert training_args.train_sampling_strategy == "random"
    assert training_args.warmup_steps == 0
    assert training_args.overwrite_output_dir is False
    assert training_args.include_num_input_tokens_seen == "non_padding"
    assert training_args.prediction_loss_only is True


def test_group_by_length_false_keeps_random_sampling():
    _, _, training_args = parse_args(MINIMAL + ["--group_by_length", "False"])
    assert training_args.train_sampling_strategy == "random"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--evaluation_strategy", "steps", "--eval_strategy", "epoch", "--eval_steps", "5"], "contradicts"),
        (["--warmup_ratio", "1.5"], r"\[0, 1\)"),
        (["--warmup_ratio", "0.1", "--warmup_steps", "10"], "either"),
        (["--group_by_length", "True", "--train_sampling_strategy", "sequential"], "contradicts"),
    ],
)
def test_contradictory_older_flags_are_rejected(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_args(MINIMAL + extra)


def test_unsupported_official_flags_at_their_default_are_accepted():
    parse_args(MINIMAL + ["--num_images_expected", "40", "--max_buffer_size=20", "--strict_mode", "False",
                          "--unfreeze_lm_head", "False"])  # fmt: skip


def test_unsupported_official_flags_set_otherwise_are_rejected_together():
    with pytest.raises(ValueError) as error:
        parse_args(MINIMAL + ["--num_images_expected", "48", "--strict_mode=True", "--use_data_resampling"])
    text = str(error.value)
    assert "--num_images_expected 48" in text and "--strict_mode True" in text
    assert "--use_data_resampling True" in text


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_official_loss_reductions_are_accepted(reduction):
    _, data_args, _ = parse_args(MINIMAL + ["--loss_reduction", reduction])
    assert data_args.collator_options()["loss_reduction"] == reduction
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        parse_args(MINIMAL + ["--loss_reduction", "mean"])


def test_loss_is_normalized_over_all_processes_unless_asked_otherwise():
    _, _, training_args = parse_args(MINIMAL)
    assert training_args.average_tokens_across_devices is True
    for value in (True, False):
        _, _, training_args = parse_args(MINIMAL + ["--loss_reduction_all_gather", str(value)])
        assert training_args.average_tokens_across_devices is value


def test_packing_flags():
    _, data_args, _ = parse_args(MINIMAL)
    assert data_args.collator_options()["max_packed_tokens"] is None  # not packed
    _, data_args, _ = parse_args(MINIMAL + ["--use_packed_ds", "True", "--max_seq_length", "4096"])
    assert data_args.collator_options()["max_packed_tokens"] == 4096
    _, data_args, _ = parse_args(MINIMAL + ["--use_packed_ds", "True", "--max_packed_tokens", "16384"])
    assert data_args.collator_options()["max_packed_tokens"] == 16384
    with pytest.raises(ValueError, match="with --use_packed_ds True"):
        parse_args(MINIMAL + ["--max_packed_tokens", "16384"])
    with pytest.raises(ValueError, match="below --max_seq_length"):
        parse_args(MINIMAL + ["--use_packed_ds", "True", "--max_packed_tokens", "1024", "--max_seq_length", "2048"])


def test_unknown_flag_is_an_error():
    with pytest.raises(ValueError, match="not_a_flag"):
        parse_args(MINIMAL + ["--not_a_flag", "1"])


def test_deepspeed_config_resolution(tmp_path):
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert resolve_deepspeed_config(str(own)) == str(own)
    assert resolve_deepspeed_config("zero_stage2_config.json") == str(CONFIGS_DIR / "zero_stage2_config.json")
    with pytest.raises(FileNotFoundError, match="zero_stage3_config.json"):
        resolve_deepspeed_config("zero_stage9_config.json")


def test_json_file_with_the_same_keys(tmp_path):
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"model_name_or_path": "m", "meta_path": "meta.json", "output_dir": "out",
                                  "warmup_ratio": 0.1, "group_by_length": True, "use_packed_ds": False}))
    model_args, _, training_args = parse_args([str(config)])
    assert model_args.model_name_or_path == "m"
    assert training_args.warmup_steps == pytest.approx(0.1)
    assert training_args.train_sampling_strategy == "group_by_length"


@pytest.mark.parametrize("name", ["zero_stage3_config.json", "zero_stage3_no_offload_config.json",
                                  "zero_stage2_config.json"])
def test_deepspeed_configs_are_valid_and_leave_batch_values_to_the_trainer(name):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = json.loads((CONFIGS_DIR / name).read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto"
    assert config["optimizer"]["params"]["lr"] == "auto"
    # deepspeed validates zero_optimization strictly: an unknown or misspelt key raises here.
    zero = DeepSpeedZeroConfig(**config["zero_optimization"])
    if name == "zero_stage3_config.json":
        assert zero.stage == 3 and zero.gather_16bit_weights_on_model_save
        assert zero.offload_param.device == "cpu" and zero.offload_param.pin_memory
        assert zero.offload_optimizer.device == "cpu" and zero.offload_optimizer.pin_memory


def test_deepspeed_auto_values_are_filled_from_the_command_line():
    _, _, training_args = parse_args(
        MINIMAL + ["--deepspeed", "zero_stage3_config.json", "--per_device_train_batch_size", "3",
                   "--gradient_accumulation_steps", "5", "--learning_rate", "1e-4", "--weight_decay", "0.05",
                   "--max_grad_norm", "0.5", "--bf16", "True"]
    )  # fmt: skip
    config = training_args.hf_deepspeed_config.config
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 3 * 5 * training_args.world_size
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"]["lr"] == 1e-4
    assert config["optimizer"]["params"]["weight_decay"] == 0.05
    assert config["bf16"]["enabled"] is True


@pytest.mark.parametrize(
    "extra, prefetch",
    [
        (["--dataloader_num_workers", "4", "--gradient_accumulation_steps", "4"], 2),
        (["--dataloader_num_workers", "4", "--gradient_accumulation_steps", "16"], 4),
        (["--dataloader_num_workers", "3", "--gradient_accumulation_steps", "16"], 6),
        (["--dataloader_num_workers", "4", "--gradient_accumulation_steps", "16", "--dataloader_prefetch_factor", "3"],
         3),
        (["--dataloader_num_workers", "0", "--gradient_accumulation_steps", "16"], None),
    ],
)  # fmt: skip
def test_loader_workers_hold_one_optimizer_step_of_micro_batches(extra, prefetch):
    _, _, training_args = parse_args(MINIMAL + extra)
    assert training_args.dataloader_prefetch_factor == prefetch


@pytest.mark.parametrize(
    "cpus, processes, workers",
    [(2, "2", 1), (2, None, 2), (1, "4", 1), (16, "2", 4), (64, "8", 4)],
)
def test_loader_workers_default_to_what_the_cpus_allow(monkeypatch, cpus, processes, workers):
    """torch warns once per loader start and process when a process has more workers than CPUs; the default never
    asks for more than the CPUs shared among this node's processes (and the official 4 at most)."""
    monkeypatch.setattr(arguments.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    _, _, training_args = parse_args(MINIMAL)
    assert training_args.dataloader_num_workers == workers
    _, _, training_args = parse_args(MINIMAL + ["--dataloader_num_workers", "3"])
    assert training_args.dataloader_num_workers == 3  # a value given is kept
