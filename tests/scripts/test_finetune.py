"""End to end on CPU: real torchrun processes, DeepSpeed ZeRO-3 with CPU offload, the tiny 4-bit model, demo videos.

- the users' guide command, flag for flag (paths swapped, numbers made small), on 2 processes;
- two single-process "nodes" on localhost (the multi-node path, through the launcher), with every parameter
  partitioned by ZeRO-3;
- a run killed with SIGKILL that resumes and ends after the same number of optimizer steps;
- faults: a run failing in training (one line per process, none of torchrun), an evaluation set that cannot be
  built (skipped, the run goes on), resuming with another LoRA rank or from a damaged checkpoint (one line each).

The saved LoRA weights are compared with the fp32 weights DeepSpeed's optimizer holds at the end of training
(reconstructed from its checkpoint), so an all-zero or stale adapter (official issue #905) fails.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.prepared import VAL, annotation_path

REPO = Path(__file__).resolve().parents[2]

# Real multi-process runs through the scripts: minutes each (`pytest -m "not e2e"` leaves them out).
pytestmark = pytest.mark.e2e

# The fine-tuning command of the users' guide, as printed there.
GUIDE_COMMAND = r"""
torchrun --nnodes=1 --node_rank=0 --master_addr=127.0.0.1 --nproc_per_node=2 --master_port=34229 \
  internvl/train/internvl_chat_finetune.py --model_name_or_path "models/InternVL3-8B" \
  --conv_style "internvl2_5" --use_fast_tokenizer False --output_dir "work_dirs/internvl3_8b_4bit_lora" \
  --meta_path "internvl3_data/meta.json" --overwrite_output_dir True --force_image_size 448 \
  --max_dynamic_patch 12 --down_sample_ratio 0.5 --drop_path_rate 0.0 --freeze_llm True \
  --freeze_mlp True --freeze_backbone True --use_llm_lora 32 --vision_select_layer -1 \
  --dataloader_num_workers 4 --bf16 True --num_train_epochs 3 --per_device_train_batch_size 4 \
  --gradient_accumulation_steps 4 --evaluation_strategy "steps" --eval_steps 100 --save_strategy "steps" \
  --save_steps 200 --save_total_limit 2 --learning_rate 2e-5 --weight_decay 0.05 --warmup_ratio 0.03 \
  --lr_scheduler_type "cosine" --logging_steps 10 --max_seq_length 8192 --do_train True --do_eval True \
  --grad_checkpoint True --group_by_length True --dynamic_image_size True --use_thumbnail True \
  --ps_version 'v2' --deepspeed "zero_stage3_config.json" --report_to "tensorboard"
"""

# Few frames and short sequences keep a step to about a second on two CPU cores; the higher learning rate
# makes the tiny model's loss fall within a few steps.
SMALL_RUN = ["--min_num_frame", "2", "--max_num_frame", "2"]
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| epoch \S+ \| loss (\S+) \|")
RUN_TIMEOUT = 900  # the first DeepSpeed run on a machine JIT-compiles its CPU ops


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def guide_command() -> list[str]:
    return shlex.split(GUIDE_COMMAND.replace("\\\n", " "))


def guide_training_args() -> list[str]:
    """The guide command's arguments to the training script."""
    argv = guide_command()
    return argv[argv.index("internvl/train/internvl_chat_finetune.py") + 1 :]


def guide_argv(**values: str) -> list[str]:
    """The guide command with some flag values replaced (``master_port="123"`` sets ``--master_port=123``)."""
    argv = guide_command()
    assert argv[0] == "torchrun"
    argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    for name, value in values.items():
        for i, arg in enumerate(argv):
            if arg.startswith(f"--{name}="):
                argv[i] = f"--{name}={value}"
                break
            if arg == f"--{name}":
                argv[i + 1] = value
                break
        else:
            raise KeyError(f"--{name} is not in the guide command")
    return argv


def run_env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun starts each worker in a session of its own, so killing the
    launcher's process group would leave the workers running)."""
    tree, index = [pid], 0
    while index < len(tree):
        children = Path(f"/proc/{tree[index]}/task/{tree[index]}/children")
        if children.exists():
            tree += [int(child) for child in children.read_text().split()]
        index += 1
    return tree


def launcher_run(model_dir: Path, meta: Path, output_dir: Path, *, epochs: int, save_steps: int):
    """``(command, env)`` of the launcher on two processes, one sample each per step (2 videos a step)."""
    env = {**run_env(), "GPUS": "2", "MASTER_PORT": str(free_port()), "PER_DEVICE_BATCH_SIZE": "1",
           "BATCH_SIZE": "2", "MODEL_PATH": str(model_dir), "META_PATH": str(meta), "OUTPUT_DIR": str(output_dir),
           "EPOCHS": str(epochs), "LR": "2e-3"}  # fmt: skip
    command = ["bash", str(REPO / "scripts" / "finetune_internvl3_8b_4bit_lora.sh"), "--dataloader_num_workers",
               "1", "--max_seq_length", "1024", "--logging_steps", "1", "--save_steps", str(save_steps),
               *SMALL_RUN]  # fmt: skip
    return command, env


def check_run(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-6000:]}"


def train_losses(output_dir: Path) -> dict[int, float]:
    """Loss per optimizer step, from training_log.txt (a resumed run's lines replace the earlier ones)."""
    losses = {}
    for line in (output_dir / "training_log.txt").read_text().splitlines():
        match = STEP_LINE.match(line)
        if match:
            losses[int(match.group(1))] = float(match.group(3))
    return losses


def check_adapter_matches_optimizer_weights(output_dir: Path, checkpoint: Path) -> None:
    """The saved adapter equals the fp32 master weights DeepSpeed holds (up to bf16 rounding) and is non-zero."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trained = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), exclude_frozen_parameters=True)
    saved = load_file(output_dir / "adapter_model.safetensors")
    assert saved and len(saved) == len(trained)
    for name, value in saved.items():
        # peft drops the adapter name from saved keys: lora_B.weight <- lora_B.default.weight
        reference = trained["language_model." + name.replace(".weight", ".default.weight")]
        torch.testing.assert_close(value.float(), reference, rtol=1e-2, atol=1e-4, msg=name)
        if ".lora_B." in name:  # initialised to zero: non-zero means trained and saved
            assert value.abs().max() > 0, name


@pytest.fixture(scope="module")
def demo_meta(demo_videos_dir, tmp_path_factory) -> Path:
    from internvl.data.prepare import prepare_dataset

    output_dir = tmp_path_factory.mktemp("demo-data")
    prepare_dataset(demo_videos_dir / "annotations.csv", output_dir, val_ratio=0.2, progress=False)
    return output_dir / "meta.json"


def run_small_guide_command(model_dir, meta, output_dir, *extra: str, **values: str):
    """The guide command on 2 processes with the tiny model and demo data, small numbers; ``values`` replace flag
    values of the guide, ``extra`` flags come last."""
    small = dict(master_port=str(free_port()), model_name_or_path=str(model_dir), output_dir=str(output_dir),
                 meta_path=str(meta), dataloader_num_workers="1", gradient_accumulation_steps="1",
                 learning_rate="2e-3", logging_steps="1", max_seq_length="1024")  # fmt: skip
    argv = guide_argv(**{**small, **values}) + SMALL_RUN + list(extra)
    result = subprocess.run(argv, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    check_run(result)
    return result


# Known-benign messages that each process printed (some at every loader start), and peft's parameter count.
SILENCED = ["is deprecated. Please use `torch.distributed", "kernels-community", "Gradient accumulation steps mismatch",
            "No CUDA runtime is found", "trainable params:"]  # fmt: skip


def test_guide_command_trains_with_zero3_offload_on_two_processes(tiny_model_dir, demo_meta, tmp_path):
    """The guide's command, with generation metrics at each evaluation choosing the best checkpoint."""
    output_dir = tmp_path / "run"
    result = run_small_guide_command(
        tiny_model_dir, demo_meta, output_dir, "--eval_generate", "True", "--eval_generate_max_new_tokens", "8",
        "--metric_for_best_model", "rougeL", "--load_best_model_at_end", "True",
        num_train_epochs="3", per_device_train_batch_size="1", eval_steps="3", save_steps="3",
    )  # fmt: skip
    console = result.stdout + result.stderr
    for message in SILENCED:
        assert message not in console, message
    # Said once, by the main process: one parameter count, the small validation set (1 record).
    assert console.count("Trainable parameters:") == 1
    assert console.count("Warning: the validation set has 1 record") == 1
    assert console.count("Compiling DeepSpeed's") <= 1

    state = json.loads((output_dir / "trainer_state.json").read_text())
    steps = state["global_step"]
    assert steps == 9  # 5 training videos / (1 per process x 2 processes) = 3 steps per epoch, 3 epochs
    losses = train_losses(output_dir)
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(loss) for loss in losses.values())
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (7, 8, 9)]
    assert sum(last) / 3 < sum(first) / 3 - 0.1, losses
    log = (output_dir / "training_log.txt").read_text()
    assert "tokens/s" in log and "eval_loss" in log

    # Two ranks: each holds its own ZeRO partition of the optimizer state.
    checkpoint = output_dir / f"checkpoint-{steps}"
    partitions = sorted(p.name for p in checkpoint.glob(f"global_step{steps}/*optim_states.pt"))
    assert partitions == [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    # Each evaluation generated and scored summaries on both processes; the saved adapter is the best checkpoint's.
    rouge = {e["step"]: e["eval_rougeL"] for e in state["log_history"] if "eval_rougeL" in e}
    assert sorted(rouge) == [3, 6, 9] and sorted(p.name for p in (output_dir / "eval_generations").iterdir()) == [
        "step-3.jsonl", "step-6.jsonl", "step-9.jsonl"
    ]
    best_step = max(rouge, key=lambda step: (rouge[step], -step))
    assert state["best_model_checkpoint"] == str(output_dir / f"checkpoint-{best_step}")
    check_adapter_matches_optimizer_weights(output_dir, output_dir / f"checkpoint-{best_step}")
    assert "| rougeL " in log
    card = (output_dir / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and "More Information Needed" not in card
    assert f"best checkpoint by rougeL: `checkpoint-{best_step}`" in card

    config = json.loads((output_dir / "config.json").read_text())
    assert config["use_llm_lora"] == 32
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (32, 64, 0.05)
    assert (output_dir / "tokenizer_config.json").is_file()
    assert list(output_dir.glob("runs/*/events.out.tfevents.*"))
    assert (output_dir / "loss_curves.png").stat().st_size > 0
    run_args = json.loads((output_dir / "run_args.json").read_text())
    assert run_args["training_args"]["train_sampling_strategy"] == "group_by_length"
    assert run_args["model_args"]["load_in_4bit"] is True
    assert "internvl_chat_finetune.py" in (output_dir / "command.txt").read_text()
    assert "eval_loss" in json.loads((output_dir / "eval_results.json").read_text())
    assert json.loads((output_dir / "train_results.json").read_text())["train_bad_samples"] == 0


def test_guide_command_with_packing_trains_and_evaluates(tiny_model_dir, demo_meta, tmp_path):
    output_dir = tmp_path / "run"
    run_small_guide_command(tiny_model_dir, demo_meta, output_dir, "--use_packed_ds", "True", "--loss_reduction",
                            "square", num_train_epochs="2", per_device_train_batch_size="2", eval_steps="2",
                            save_steps="2")  # fmt: skip
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 4  # 5 videos / 4 per step
    losses = train_losses(output_dir)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(loss) for loss in losses.values())
    # A random tiny model predicts about uniformly over its 1,920 tokens: the mean loss per token is near ln(1920).
    assert 0.5 * math.log(1920) < losses[1] < 1.5 * math.log(1920)
    assert "eval_loss" in (output_dir / "training_log.txt").read_text()
    assert json.loads((output_dir / "train_results.json").read_text())["train_bad_samples"] == 0


def test_two_nodes_with_every_parameter_partitioned(tiny_model_dir, demo_meta, tmp_path):
    # Persistence threshold 0: ZeRO-3 partitions even the tiny model's parameters, LoRA weights included.
    ds_config = json.loads((REPO / "configs" / "zero_stage3_config.json").read_text())
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_config_path = tmp_path / "zero3_partition_everything.json"
    ds_config_path.write_text(json.dumps(ds_config))
    output_dir = tmp_path / "run"
    env = {**run_env(), "NNODES": "2", "GPUS": "1", "MASTER_PORT": str(free_port()), "PER_DEVICE_BATCH_SIZE": "1",
           "BATCH_SIZE": "2", "MODEL_PATH": str(tiny_model_dir), "META_PATH": str(demo_meta),
           "OUTPUT_DIR": str(output_dir), "EPOCHS": "1", "LR": "2e-3", "DEEPSPEED_CONFIG": str(ds_config_path)}
    extra = ["--dataloader_num_workers", "1", "--max_seq_length", "1024", "--logging_steps", "1", "--save_steps",
             "3", *SMALL_RUN]  # fmt: skip
    script = str(REPO / "scripts" / "finetune_internvl3_8b_4bit_lora.sh")
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [
        subprocess.Popen(["bash", script, *extra], env={**env, "NODE_RANK": str(rank)}, stdout=log.open("w"),
                         stderr=subprocess.STDOUT)  # fmt: skip
        for rank, log in enumerate(logs)
    ]
    for node, log in zip(nodes, logs):
        assert node.wait(timeout=RUN_TIMEOUT) == 0, log.read_text()[-6000:]

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert "world size 2" in (output_dir / "command.txt").read_text()
    checkpoint = output_dir / "checkpoint-3"
    model_states = sorted(p.name for p in checkpoint.glob("global_step3/*model_states.pt"))
    assert model_states == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
    check_adapter_matches_optimizer_weights(output_dir, checkpoint)


def test_module_run_without_deepspeed_resumes_with_the_trained_adapter(tiny_model_dir, demo_meta, tmp_path):
    """``python -m``, one process, no DeepSpeed: resuming loads the checkpoint's adapter (not DeepSpeed's state)."""
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "internvl.train.internvl_chat_finetune", "--model_name_or_path",
               str(tiny_model_dir), "--meta_path", str(demo_meta), "--output_dir", str(output_dir), "--freeze_llm",
               "True", "--freeze_mlp", "True", "--freeze_backbone", "True", "--use_llm_lora", "8", "--do_train", "True",
               "--per_device_train_batch_size", "1", "--max_steps", "2", "--save_steps", "2", "--learning_rate",
               "2e-3", "--max_seq_length", "1024", "--report_to", "none", *SMALL_RUN]  # fmt: skip
    # Fewer steps than --logging_steps (default 500): nothing to plot, which is said, not an error.
    first = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    check_run(first)
    assert "No loss curves" in first.stdout and not (output_dir / "loss_curves.png").exists()
    trained = load_file(output_dir / "checkpoint-2" / "adapter_model.safetensors")
    assert all(value.abs().max() > 0 for name, value in trained.items() if ".lora_B." in name)

    # The rerun resumes at the last step, so it only loads the checkpoint and saves again: a fresh adapter (lora_B
    # all zero) would show here.
    (output_dir / "adapter_model.safetensors").unlink()
    second = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    check_run(second)
    assert f"Resuming from {output_dir / 'checkpoint-2'}" in second.stdout
    saved = load_file(output_dir / "adapter_model.safetensors")
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[name], trained[name]) for name in trained)


def test_killed_run_resumes_and_finishes_the_same_number_of_steps(tiny_model_dir, demo_meta, tmp_path):
    output_dir = tmp_path / "run"
    command, env = launcher_run(tiny_model_dir, demo_meta, output_dir, epochs=2, save_steps=2)

    # Wait for the first complete checkpoint, then SIGKILL every process of the run at once.
    first_log = tmp_path / "first.log"
    first = subprocess.Popen(command, env=env, stdout=first_log.open("w"), stderr=subprocess.STDOUT)
    first_state = output_dir / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not first_state.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the run ended before it could be killed:\n" + first_log.read_text()[-6000:]
    assert first_state.exists(), "no checkpoint within the time limit"
    for pid in process_tree(first.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone
            pass
    first.wait(timeout=60)
    planned_steps = json.loads(first_state.read_text())["max_steps"]
    assert planned_steps == 6  # 5 training videos / 2 per step = 3 steps per epoch, 2 epochs
    assert not (output_dir / "trainer_state.json").exists()  # the first run never finished

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    check_run(second)
    assert "Resuming from" in second.stdout
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == planned_steps
    log = (output_dir / "training_log.txt").read_text()
    resumed_at = int(re.search(r"resuming at step (\d+)", log).group(1))
    assert 2 <= resumed_at < planned_steps
    assert sorted(train_losses(output_dir)) == list(range(1, planned_steps + 1))
    saved = load_file(output_dir / "adapter_model.safetensors")
    assert all(value.abs().max() > 0 for name, value in saved.items() if ".lora_B." in name)


def test_launcher_trains_from_an_hf_checkpoint_whose_adapter_merges_onto_the_original(
    tiny_hf_model_dir, tiny_model_dir, demo_meta, tmp_path
):
    """MODEL_PATH in transformers' -hf layout: the 4-bit ZeRO-3 run trains, and its adapter applies to the official
    layout as to the -hf base it was trained on."""
    from internvl.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
    from internvl.model import load_internvl_model
    from internvl.model.adapters import load_model_for_inference
    from internvl.tools.merge import merge_lora

    output_dir = tmp_path / "run"
    command, env = launcher_run(tiny_hf_model_dir, demo_meta, output_dir, epochs=1, save_steps=3)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    check_run(result)
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 3
    assert all(math.isfinite(loss) for loss in train_losses(output_dir).values())
    check_adapter_matches_optimizer_weights(output_dir, output_dir / "checkpoint-3")
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_hf_model_dir)

    merge_lora(output_dir, tmp_path / "merged", base_model=tiny_model_dir, torch_dtype=torch.float32)
    trained, tokenizer, _ = load_model_for_inference(output_dir, torch_dtype=torch.float32, device="cpu")
    merged = load_internvl_model(tmp_path / "merged", load_in_4bit=False, torch_dtype=torch.float32).eval()
    text = f"Frame-1: {IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * 256}{IMG_END_TOKEN}\nDescribe the video in detail."
    inputs = {"input_ids": tokenizer(text, return_tensors="pt")["input_ids"], "pixel_values": torch.randn(1, 3, 448, 448)}
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, trained.float()(**inputs).logits, rtol=0, atol=1e-5)


def copy_demo_data(demo_videos_dir: Path, folder: Path) -> Path:
    """The demo videos prepared into ``folder`` (their own copy, to damage), val ratio 0.2: 5 training, 1 val."""
    from internvl.data.prepare import prepare_dataset

    shutil.copytree(demo_videos_dir, folder / "raw")
    prepare_dataset(folder / "raw" / "annotations.csv", folder / "data", val_ratio=0.2, progress=False)
    return folder / "data" / "meta.json"


def test_a_run_that_fails_in_training_ends_in_one_line_per_process(tiny_model_dir, demo_videos_dir, tmp_path):
    """Every training video damaged after prepare: each process says why in one line, the launcher which process
    stopped; no traceback of the processes or of torchrun. MASTER_PORT is left unset: the launcher picks a free
    port when the default one is taken."""
    meta = copy_demo_data(demo_videos_dir, tmp_path)
    for record in annotation_path(tmp_path / "data").read_text().splitlines():
        (tmp_path / "raw" / json.loads(record)["video"]).write_bytes(bytes(5000))
    env = {**run_env(), "GPUS": "2", "PER_DEVICE_BATCH_SIZE": "1", "BATCH_SIZE": "2", "MODEL_PATH": str(tiny_model_dir),
           "META_PATH": str(meta), "OUTPUT_DIR": str(tmp_path / "run"), "EPOCHS": "1"}  # fmt: skip
    env.pop("MASTER_PORT", None)
    command = ["bash", str(REPO / "scripts" / "finetune_internvl3_8b_4bit_lora.sh"), "--dataloader_num_workers", "1",
               "--max_seq_length", "1024", *SMALL_RUN]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert errors[-1].startswith("error: training stopped: process "), errors
    assert any("samples could not be built" in line for line in errors[:-1]), errors
    assert all(line.count("\n") == 0 for line in errors)


def test_resume_refusals_and_a_val_set_that_cannot_be_built(tiny_model_dir, demo_videos_dir, tmp_path):
    """A one-record val set whose video is gone: every evaluation is skipped with a warning and the run ends
    normally. Resuming it with another LoRA rank is refused by the launcher before torchrun starts; a damaged
    checkpoint is named with what to do. Each refusal is one line."""
    meta = copy_demo_data(demo_videos_dir, tmp_path)
    [val_record] = annotation_path(tmp_path / "data", VAL).read_text().splitlines()
    (tmp_path / "raw" / json.loads(val_record)["video"]).unlink()
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "internvl.train.internvl_chat_finetune", "--model_name_or_path",
               str(tiny_model_dir), "--meta_path", str(meta), "--output_dir", str(output_dir), "--freeze_llm", "True",
               "--freeze_mlp", "True", "--freeze_backbone", "True", "--use_llm_lora", "8", "--do_train", "True",
               "--do_eval", "True", "--eval_strategy", "steps", "--eval_steps", "1", "--per_device_train_batch_size",
               "1", "--max_steps", "2", "--save_steps", "2", "--max_seq_length", "1024", "--report_to", "none",
               *SMALL_RUN]  # fmt: skip
    first = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    check_run(first)
    assert "evaluation skipped at step 1" in first.stderr and "evaluation skipped at step 2" in first.stderr
    assert json.loads((output_dir / "eval_results.json").read_text())["eval_bad_samples"] >= 1
    assert (output_dir / "checkpoint-2" / "run_args.json").is_file()

    env = {**run_env(), "GPUS": "1", "PER_DEVICE_BATCH_SIZE": "1", "BATCH_SIZE": "1", "MODEL_PATH": str(tiny_model_dir),
           "META_PATH": str(meta), "OUTPUT_DIR": str(output_dir), "LORA_RANK": "16"}  # fmt: skip
    launcher = subprocess.run(["bash", str(REPO / "scripts" / "finetune_internvl3_8b_4bit_lora.sh")], env=env,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)  # fmt: skip
    assert launcher.returncode == 1 and "Traceback" not in launcher.stderr
    assert launcher.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot resume from {output_dir / 'checkpoint-2'}: LLM LoRA rank (--use_llm_lora, LORA_RANK) 8 -> 16")
    assert "Trainable parameters" not in launcher.stdout  # stopped before torchrun

    optimizer = output_dir / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    resumed = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr
    assert resumed.stderr.strip().splitlines()[-1].startswith(
        f"error: checkpoint {output_dir / 'checkpoint-2'} is damaged (optimizer.pt: BadZipFile")
