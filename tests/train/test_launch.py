"""The launcher: environment -> torchrun command, batch arithmetic, multi-node and SLURM, CPU fallback, the free
port, and the checks that stop a run in one line before torchrun starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from internvl.data.dataset import META_FOLDER
from internvl.train import launch
from internvl.train.arguments import default_loader_workers, parse_args
from internvl.train.launch import (
    FINETUNE_SCRIPT,
    choose_master_port,
    deepspeed_compatible_arch_list,
    port_is_free,
    resolve_plan,
    zero3_speed_note,
)
from internvl.train.run_guard import output_dir_lock
from tests.scripts.test_finetune import guide_training_args

REPO = Path(__file__).resolve().parents[2]


def write_split_meta(folder: Path, train: int = 2, val: int = 1) -> Path:
    """``meta.json`` with a training and a ``_val`` dataset of ``train`` / ``val`` text records (an empty ``_val``
    entry when ``val`` is 0, as older prepare versions wrote for ``--val-ratio 0``)."""
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    meta = {}
    for name, count in (("clips_train", train), ("clips_val", val)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(record) + "\n" for _ in range(count)))
        meta[name] = {"root": ".", "annotation": f"{name}.jsonl", "length": count, "paths_relative_to": META_FOLDER}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "meta.json"


def flag(args: list[str], name: str) -> str:
    """The value of the last occurrence of ``name`` (argparse semantics)."""
    positions = [i for i, arg in enumerate(args) if arg == name]
    assert positions, f"{name} missing from {args}"
    return args[positions[-1] + 1]


def test_guide_defaults_on_two_gpus():
    plan = resolve_plan({}, [], visible_gpus=2)
    assert (plan.nnodes, plan.nproc_per_node, plan.per_device_batch_size, plan.batch_size) == (1, 2, 4, 32)
    assert plan.gradient_accumulation_steps == 4
    args = plan.train_args
    assert flag(args, "--gradient_accumulation_steps") == "4"
    assert flag(args, "--use_llm_lora") == "32"
    assert flag(args, "--learning_rate") == "2e-5"
    assert flag(args, "--num_train_epochs") == "3"
    assert flag(args, "--deepspeed") == "zero_stage3_config.json"
    assert "--use_cpu" not in args
    assert plan.env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    command = plan.command("python")
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    assert flag(command, "--nproc_per_node") == "2" and flag(command, "--master_port") == "34229"
    assert str(FINETUNE_SCRIPT) in command


def test_the_users_cuda_allocator_settings_are_kept():
    plan = resolve_plan({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, [], visible_gpus=2)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in plan.env  # the launcher passes the caller's environment on unchanged


def deepspeed_arch_flags(monkeypatch, arch_list: str) -> list[str]:
    """What DeepSpeed's own JIT op builder (FusedAdam, as ZeRO-2 builds it) makes of a TORCH_CUDA_ARCH_LIST."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder  # the CUDA builder, whatever the accelerator

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    builder = FusedAdamBuilder()
    builder.jit_mode = True
    return builder.compute_capability_args()


@pytest.mark.parametrize(
    "value, fixed",
    [
        ("9.0a", "9.0"),
        ("8.0;9.0a", "8.0;9.0"),
        ("8.6 9.0a+PTX", "8.6;9.0+PTX"),
        ("10.0f;10.0", "10.0"),
        ("Hopper", ""),
    ],
)
def test_arch_lists_deepspeed_cannot_parse_are_fixed_for_its_op_builds(monkeypatch, value, fixed):
    with pytest.raises(ValueError):  # DeepSpeed's own parser, as on the H200 image
        deepspeed_arch_flags(monkeypatch, value)
    new_value, note = deepspeed_compatible_arch_list({"TORCH_CUDA_ARCH_LIST": value})
    assert new_value == fixed and repr(value) in note
    if fixed:
        deepspeed_arch_flags(monkeypatch, fixed)  # parses now
    plan = resolve_plan({"TORCH_CUDA_ARCH_LIST": value}, [], visible_gpus=1)
    assert plan.env["TORCH_CUDA_ARCH_LIST"] == fixed and plan.notes == [note]


@pytest.mark.parametrize("value", ["9.0", "8.0;8.6 9.0+PTX", ""])
def test_arch_lists_deepspeed_parses_are_kept(value):
    assert deepspeed_compatible_arch_list({"TORCH_CUDA_ARCH_LIST": value}) is None
    assert deepspeed_compatible_arch_list({}) is None
    assert "TORCH_CUDA_ARCH_LIST" not in resolve_plan({"TORCH_CUDA_ARCH_LIST": value}, [], visible_gpus=1).env


def test_zero3_on_gpus_comes_with_the_measured_cost_and_the_faster_stage(tmp_path):
    note = zero3_speed_note(resolve_plan({}, [], visible_gpus=2))
    assert note and "ZeRO-2" in note and "DEEPSPEED_CONFIG=zero_stage2_config.json" in note
    assert zero3_speed_note(resolve_plan({"DEEPSPEED_CONFIG": "zero_stage3_no_offload_config.json"}, [], 2))
    custom = tmp_path / "my_zero3.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert zero3_speed_note(resolve_plan({"DEEPSPEED_CONFIG": str(custom)}, [], 2))


def test_launcher_prints_the_note_before_starting_on_gpus(monkeypatch, capsys):
    from internvl.train import launch

    monkeypatch.setattr(launch, "visible_gpu_count", lambda: 2)
    for name in ("DEEPSPEED_CONFIG", "GPUS", "PER_DEVICE_BATCH_SIZE", "BATCH_SIZE", "NNODES", "SLURM_NNODES"):
        monkeypatch.delenv(name, raising=False)
    launch.main(["--dry-run"])
    printed = capsys.readouterr().out
    assert "DEEPSPEED_CONFIG=zero_stage2_config.json" in printed
    launch.main(["--dry-run", "--deepspeed", "zero_stage2_config.json"])
    assert "DEEPSPEED_CONFIG=zero_stage2_config.json" not in capsys.readouterr().out


@pytest.mark.parametrize("env, extra, gpus", [
    ({"DEEPSPEED_CONFIG": "zero_stage2_config.json"}, [], 2),
    ({}, ["--deepspeed", "zero_stage2_config.json"], 2),  # the last --deepspeed is the one training uses
    ({}, ["--deepspeed=zero_stage2_config.json"], 2),
    ({}, [], 0),  # CPU processes: the GPU measurements do not apply
    ({"DEEPSPEED_CONFIG": "missing.json"}, [], 2),  # training reports the missing file itself
])  # fmt: skip
def test_no_speed_note_for_other_stages_cpu_runs_or_unreadable_configs(env, extra, gpus):
    assert zero3_speed_note(resolve_plan(env, extra, visible_gpus=gpus)) is None


def test_default_launch_means_the_guide_command(tmp_path):
    """Spelled with the new flag names, the launcher's default run is the guide's, except that it resumes instead
    of overwriting the output folder and that its loader workers are what the CPUs allow, not always 4."""
    meta = write_split_meta(tmp_path)
    guide = guide_training_args()
    guide[guide.index("--meta_path") + 1] = str(meta)
    plan = resolve_plan({"META_PATH": str(meta)}, [], visible_gpus=2)
    launched, expected = parse_args(plan.train_args), parse_args(guide)
    assert launched[:2] == expected[:2]  # model and data arguments
    launched_training, expected_training = launched[2].to_dict(), expected[2].to_dict()
    assert expected_training.pop("overwrite_output_dir") and not launched_training.pop("overwrite_output_dir")
    # The guide spells two of them the old way; both land on the same new fields.
    for old_spelling in ("evaluation_strategy", "warmup_ratio"):
        launched_training.pop(old_spelling), expected_training.pop(old_spelling)
    assert expected_training.pop("dataloader_num_workers") == 4
    assert launched_training.pop("dataloader_num_workers") == default_loader_workers(os.environ)
    launched_training.pop("dataloader_prefetch_factor"), expected_training.pop("dataloader_prefetch_factor")
    assert launched_training == expected_training


def test_environment_overrides_and_derived_gradient_accumulation():
    env = {"GPUS": "8", "PER_DEVICE_BATCH_SIZE": "2", "BATCH_SIZE": "64", "MODEL_PATH": "m", "META_PATH": "x.json",
           "OUTPUT_DIR": "o", "LORA_RANK": "16", "LR": "1e-4", "EPOCHS": "1", "MASTER_PORT": "29999",
           "DEEPSPEED_CONFIG": "zero_stage2_config.json"}
    plan = resolve_plan(env, [], visible_gpus=8)
    args = plan.train_args
    assert plan.gradient_accumulation_steps == 4
    assert [flag(args, f) for f in ("--model_name_or_path", "--meta_path", "--output_dir", "--use_llm_lora",
                                    "--learning_rate", "--num_train_epochs", "--deepspeed")] == [
        "m", "x.json", "o", "16", "1e-4", "1", "zero_stage2_config.json"]
    assert flag(plan.command(), "--master_port") == "29999"


def test_indivisible_batch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"BATCH_SIZE=30 is not a multiple of .* = 8"):
        resolve_plan({"BATCH_SIZE": "30"}, [], visible_gpus=2)


@pytest.mark.parametrize("env, message", [({"GPUS": "two"}, "GPUS='two'"), ({"PER_DEVICE_BATCH_SIZE": "0"}, ">= 1"),
                                          ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2")])
def test_bad_numbers_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        resolve_plan(env, [], visible_gpus=2)


def test_multi_node_layout():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5"}
    plan = resolve_plan(env, [], visible_gpus=2)
    assert plan.gradient_accumulation_steps == 2  # 32 / (4 x 2 GPUs x 2 nodes)
    command = plan.command()
    assert [flag(command, f) for f in ("--nnodes", "--node_rank", "--master_addr")] == ["2", "1", "10.0.0.5"]


def test_slurm_environment_is_read():
    env = {"SLURM_NNODES": "4", "SLURM_NODEID": "3", "SLURM_GPUS_ON_NODE": "8", "BATCH_SIZE": "128"}
    plan = resolve_plan(env, [], visible_gpus=8)
    assert (plan.nnodes, plan.node_rank, plan.nproc_per_node, plan.gradient_accumulation_steps) == (4, 3, 8, 1)


def test_cpu_fallback_without_gpus():
    plan = resolve_plan({}, [], visible_gpus=0)
    assert plan.use_cpu and plan.nproc_per_node == 2
    assert plan.env == {"DS_ACCELERATOR": "cpu"}
    assert flag(plan.train_args, "--use_cpu") == "True"


def test_evaluation_only_when_meta_has_evaluation_records(tmp_path):
    meta = write_split_meta(tmp_path, val=1)
    with_val = resolve_plan({"META_PATH": str(meta)}, [], visible_gpus=2).train_args
    assert flag(with_val, "--do_eval") == "True" and flag(with_val, "--eval_strategy") == "steps"
    # An empty _val entry (--val-ratio 0 with older prepare versions), or none at all: no evaluation.
    meta = write_split_meta(tmp_path, val=0)
    assert "--do_eval" not in resolve_plan({"META_PATH": str(meta)}, [], visible_gpus=2).train_args
    meta.write_text(json.dumps({"clips_train": json.loads(meta.read_text())["clips_train"]}))
    assert "--do_eval" not in resolve_plan({"META_PATH": str(meta)}, [], visible_gpus=2).train_args


def test_extra_arguments_come_last_and_win_when_parsed():
    plan = resolve_plan({"LR": "2e-5"}, ["--learning_rate", "1e-3", "--max_steps", "7"], visible_gpus=2)
    _, _, training_args = parse_args(plan.train_args)
    assert training_args.learning_rate == pytest.approx(1e-3)
    assert training_args.max_steps == 7
    assert training_args.gradient_accumulation_steps == 4
    assert training_args.train_sampling_strategy == "group_by_length"


def run_script(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(REPO / "scripts" / script), *args], env=full_env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.e2e
def test_finetune_script_dry_run_prints_the_torchrun_command():
    result = run_script("finetune_internvl3_8b_4bit_lora.sh", {"GPUS": "2", "BATCH_SIZE": "16"}, "--dry-run",
                        "--max_steps", "3")
    assert result.returncode == 0, result.stderr
    assert "gradient accumulation 2 = batch 16" in result.stdout
    command = result.stdout.strip().splitlines()[-1]
    assert "torch.distributed.run" in command and "--gradient_accumulation_steps 2" in command
    assert command.endswith("--max_steps 3")


@pytest.mark.e2e
def test_finetune_script_reports_an_indivisible_batch():
    result = run_script("finetune_internvl3_8b_4bit_lora.sh", {"GPUS": "2", "BATCH_SIZE": "12",
                                                               "PER_DEVICE_BATCH_SIZE": "4"}, "--dry-run")
    assert result.returncode != 0
    assert "BATCH_SIZE=12 is not a multiple" in result.stderr


@pytest.mark.e2e
def test_slurm_script_starts_one_launcher_per_node_with_the_allocation(tmp_path):
    # Stand-ins for SLURM's tools: scontrol lists the allocated hosts, srun runs the command it is given.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4",
           "BATCH_SIZE": "64", "PER_DEVICE_BATCH_SIZE": "4"}  # fmt: skip
    env.update(dict.fromkeys(("GPUS", "NNODES", "NODE_RANK", "MASTER_ADDR"), ""))  # unset: SLURM's values apply
    result = run_script("slurm_finetune_internvl3_8b_4bit_lora.sh", env, "--dry-run")
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip().splitlines()[-1].split()
    assert [flag(command, f) for f in ("--nnodes", "--node_rank", "--master_addr", "--nproc_per_node")] == [
        "2", "1", "node-a", "4"]  # fmt: skip
    assert flag(command, "--gradient_accumulation_steps") == "2"  # 64 / (4 per device x 4 GPUs x 2 nodes)


@pytest.mark.e2e
def test_quick_start_stops_when_the_setup_check_fails(tmp_path):
    result = run_script("quick_start_internvl3_4bit_lora.sh", {"MODEL_PATH": str(tmp_path / "no-model"),
                                                               "OUTPUT_DIR": str(tmp_path / "out")})  # fmt: skip
    assert result.returncode != 0
    assert "❌ model folder" in result.stdout and "no-model" in result.stdout
    assert "== Training" not in result.stdout and not (tmp_path / "out").exists()


def test_a_taken_port_moves_a_single_node_run_and_stops_others():
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free, note = choose_master_port({}, nnodes=1, node_rank=0, default=port)
        assert free != port and port_is_free(free)
        assert note == f"Port {port} is in use (another training run?): using port {free} (MASTER_PORT sets it)."
        with pytest.raises(ValueError, match=f"MASTER_PORT={port} is in use on this machine.*set MASTER_PORT"):
            choose_master_port({"MASTER_PORT": str(port)}, nnodes=1, node_rank=0)
        with pytest.raises(ValueError, match="set MASTER_PORT to a free port"):
            choose_master_port({}, nnodes=2, node_rank=0, default=port)
        # Only node 0 listens: another node cannot tell.
        assert choose_master_port({"MASTER_PORT": str(port)}, nnodes=2, node_rank=1) == (port, None)


@pytest.fixture
def launch_env(monkeypatch, tmp_path, tiny_model_dir):
    """The launcher's environment for a small run of the tiny model; the test changes what it plants a fault in."""
    env = {"MODEL_PATH": str(tiny_model_dir), "META_PATH": str(write_split_meta(tmp_path)),
           "OUTPUT_DIR": str(tmp_path / "run"), "GPUS": "2", "PER_DEVICE_BATCH_SIZE": "1", "BATCH_SIZE": "2"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setattr(launch, "run_torchrun", lambda plan: pytest.fail("torchrun started"))
    return env


@pytest.mark.parametrize("fault, message", [
    ({"MODEL_PATH": "models/InternVL3-8B"}, "--model_name_or_path models/InternVL3-8B does not exist"),
    ({"META_PATH": "nowhere/meta.json"}, "meta file nowhere/meta.json not found"),
    ({"EPOCHS": "0"}, "--num_train_epochs 0 trains nothing"),
    ({"OUTPUT_DIR": "MODEL"}, "is the base model folder"),
])  # fmt: skip
def test_the_launcher_stops_with_one_line_before_torchrun_starts(launch_env, monkeypatch, capsys, fault, message):
    for name, value in fault.items():
        monkeypatch.setenv(name, launch_env["MODEL_PATH"] if value == "MODEL" else value)
    with pytest.raises(SystemExit) as exit_info:
        launch.main([])
    assert str(exit_info.value.code).startswith("error: ") and message in str(exit_info.value.code)
    assert "\n" not in str(exit_info.value.code)


def test_the_launcher_refuses_an_output_folder_in_use(launch_env):
    with output_dir_lock(launch_env["OUTPUT_DIR"]), pytest.raises(SystemExit) as exit_info:
        launch.main([])
    assert "is in use by another training run (pid" in str(exit_info.value.code)


def test_the_launcher_starts_torchrun_when_the_checks_pass(launch_env, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(launch, "run_torchrun", started.append)
    launch.main(["--max_steps", "1"])
    [plan] = started
    assert plan.world_size == 2 and port_is_free(plan.master_port)
    assert os.environ[launch.LAUNCH_COMMAND_ENV] == capsys.readouterr().out.strip().splitlines()[-1]
