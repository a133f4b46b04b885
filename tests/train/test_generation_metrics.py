"""Generation metrics during training (``--eval_generate``): the evaluator's scores of the summaries the model writes
at each evaluation, in the logs and TensorBoard, driving the best checkpoint and early stopping.

The tiny model (full precision, no DeepSpeed) on demo videos; the 2-process ZeRO-3 path runs in
tests/scripts/test_finetune.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # started by torchrun as a file: make the packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch
from safetensors.torch import load_file
from transformers import set_seed

from internvl.data.collate import InternVLDataCollator
from internvl.data.dataset import build_datasets
from internvl.model.loading import load_tokenizer
from internvl.tools.metrics import compute_metrics
from internvl.train.arguments import parse_args
from internvl.train.callbacks import TRAINING_LOG_NAME, TrainingLogCallback
from internvl.train.internvl_chat_finetune import (
    build_generation_evaluation,
    early_stopping,
    eval_metrics_of_final_weights,
    step_of_final_weights,
)
from internvl.train.trainer import InternVLTrainer
from tests.conftest import _tiny_lora_model

GENERATION_METRICS = ("rouge1", "rouge2", "rougeL", "bleu4", "cider")


@pytest.fixture(scope="module")
def demo_meta(demo_videos_dir, tmp_path_factory) -> Path:
    """Demo videos prepared with three validation records."""
    from internvl.data.prepare import prepare_dataset

    output_dir = tmp_path_factory.mktemp("generation-data")
    prepare_dataset(demo_videos_dir / "annotations.csv", output_dir, val_ratio=0.5, progress=False)
    return output_dir / "meta.json"


def run_arguments(model_dir, meta, output_dir, *extra: str):
    return parse_args([
        "--model_name_or_path", str(model_dir), "--meta_path", str(meta), "--output_dir", str(output_dir),
        "--do_train", "True", "--do_eval", "True", "--use_llm_lora", "8", "--load_in_4bit", "False",
        "--min_num_frame", "2", "--max_num_frame", "2", "--max_seq_length", "1024", "--report_to", "none",
        "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "2", "--dataloader_num_workers", "0",
        "--eval_generate", "True", "--eval_generate_max_new_tokens", "8", "--learning_rate", "5e-3",
        "--logging_steps", "1", "--seed", "0", *extra,
    ])  # fmt: skip


def make_trainer(model_dir, meta, output_dir, *extra: str, callbacks=()):
    model_args, data_args, training_args = run_arguments(model_dir, meta, output_dir, *extra)
    tokenizer = load_tokenizer(model_dir)
    set_seed(0)  # LoRA's A matrices draw from the global generator: the same run whatever ran before
    model = _tiny_lora_model(model_dir).train()
    train, evaluation = build_datasets(meta, tokenizer, num_image_token=model.num_image_token,
                                       **data_args.dataset_options())  # fmt: skip
    return InternVLTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
        data_collator=InternVLDataCollator(pad_token_id=tokenizer.pad_token_id), processing_class=tokenizer,
        callbacks=[TrainingLogCallback(output_dir), *early_stopping(training_args), *callbacks],
        base_model_path=str(model_dir), generation_evaluation=build_generation_evaluation(data_args, training_args),
    )  # fmt: skip


def test_each_evaluation_adds_the_evaluators_scores_of_the_generated_summaries(tiny_model_dir, demo_meta, tmp_path):
    trainer = make_trainer(tiny_model_dir, demo_meta, tmp_path)
    metrics = trainer.evaluate()
    assert {f"eval_{name}" for name in GENERATION_METRICS} <= set(metrics) and "eval_loss" in metrics

    # The summaries are written down, and the evaluator's metric code scores them exactly as logged.
    rows = [json.loads(line) for line in (tmp_path / "eval_generations" / "step-0.jsonl").read_text().splitlines()]
    header, lines = rows[0], rows[1:]
    assert [line["id"] for line in lines] == [r.id for r in trainer.generation_evaluation.records]
    assert len(lines) == 3 and all(isinstance(line["prediction"], str) for line in lines)
    scores = compute_metrics([line["prediction"] for line in lines], [line["reference"] for line in lines]).scores
    assert header["scores"] == scores
    assert {name: metrics[f"eval_{name}"] for name in scores} == scores

    eval_line = (tmp_path / TRAINING_LOG_NAME).read_text().splitlines()[-1]
    assert eval_line.startswith("eval  step 0/") and f"| rougeL {scores['rougeL']:.2f}" in eval_line


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = {path.parent for path in log_dir.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_the_best_checkpoint_is_the_one_with_the_best_rougeL(tiny_model_dir, demo_meta, tmp_path):
    trainer = make_trainer(
        tiny_model_dir, demo_meta, tmp_path, "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "1",
        "--save_strategy", "steps", "--save_steps", "1", "--metric_for_best_model", "rougeL",
        "--load_best_model_at_end", "True", "--report_to", "tensorboard",
    )  # fmt: skip
    trainer.train()
    rouge = {e["step"]: e["eval_rougeL"] for e in trainer.state.log_history if "eval_rougeL" in e}
    assert sorted(rouge) == [1, 2, 3, 4]
    assert len(set(rouge.values())) > 1, rouge  # the choice is a real one
    best_step = max(rouge, key=lambda step: (rouge[step], -step))  # the first of equal bests
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    assert trainer.state.best_metric == rouge[best_step]

    # The weights at the end are the best checkpoint's, not the last step's.
    saved = load_file(tmp_path / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    final = {name.removeprefix("language_model."): param.detach() for name, param in trainer.model.named_parameters()
             if param.requires_grad}  # fmt: skip
    for name, value in saved.items():
        torch.testing.assert_close(final[name.replace(".weight", ".default.weight")], value, msg=name)
    if best_step != 4:
        last = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
        assert any(not torch.equal(last[name], saved[name]) for name in saved)

    # What the run reports as its evaluation is the evaluation of these weights, not of the last step's.
    assert step_of_final_weights(trainer) == best_step
    assert eval_metrics_of_final_weights(trainer)["eval_rougeL"] == rouge[best_step]

    # TensorBoard holds the scores at each evaluation.
    assert tensorboard_scalars(tmp_path / "runs", "eval/rougeL") == pytest.approx(rouge)


def test_early_stopping_on_a_generation_metric(tiny_model_dir, demo_meta, tmp_path):
    # No evaluation can beat the first by 1000 ROUGE-L points: training stops after 1 + patience evaluations.
    trainer = make_trainer(
        tiny_model_dir, demo_meta, tmp_path, "--max_steps", "6", "--eval_strategy", "steps", "--eval_steps", "1",
        "--save_strategy", "steps", "--save_steps", "1", "--metric_for_best_model", "rougeL",
        "--load_best_model_at_end", "True", "--early_stopping_patience", "2", "--early_stopping_threshold", "1000",
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 3
    assert [e["step"] for e in trainer.state.log_history if "eval_rougeL" in e] == [1, 2, 3]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--metric_for_best_model", "rougeL", "--load_best_model_at_end", "True", "--eval_strategy", "steps",
          "--save_strategy", "steps"], "add --eval_generate True"),
        (["--eval_generate", "True"], "there is none"),
        (["--early_stopping_patience", "2"], "needs --load_best_model_at_end True"),
    ],
)  # fmt: skip
def test_generation_settings_that_cannot_work_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_args(["--model_name_or_path", "m", "--meta_path", "x", "--output_dir", "out", "--report_to", "none",
                    *extra])  # fmt: skip


def test_validation_records_unfit_for_generation_stop_the_run_before_loading(demo_meta, tmp_path):
    meta = json.loads(demo_meta.read_text())
    for entry in meta.values():  # absolute paths, so that the meta file can live elsewhere
        entry["root"] = str((demo_meta.parent / entry["root"]).resolve())
        entry["annotation"] = str(demo_meta.parent / entry["annotation"])
    val = next(entry for name, entry in meta.items() if name.endswith("_val"))
    record = json.loads(Path(val["annotation"]).read_text().splitlines()[0])
    record["conversations"] = record["conversations"][:1]  # no reference summary
    val["annotation"] = str(tmp_path / "val.jsonl")
    Path(val["annotation"]).write_text(json.dumps(record) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    _, data_args, training_args = parse_args(["--model_name_or_path", "m", "--meta_path", str(tmp_path / "meta.json"),
                                              "--output_dir", str(tmp_path), "--report_to", "none", "--do_eval",
                                              "True", "--eval_generate", "True"])  # fmt: skip
    with pytest.raises(ValueError, match=r"val\.jsonl:1: .*'gpt' turn"):
        build_generation_evaluation(data_args, training_args)


# --- several processes ----------------------------------------------------------------------------------------------


def distributed_worker(model_dir: str, meta: str, output: str) -> None:
    """Under torchrun (gloo): every process generates for its share, one of them has nothing left to generate."""
    _, data_args, training_args = run_arguments(model_dir, meta, output, "--per_device_eval_batch_size", "1")
    evaluation = build_generation_evaluation(data_args, training_args)  # the arguments set up the processes
    set_seed(0)
    scores, lines = evaluation.run(_tiny_lora_model(model_dir), load_tokenizer(model_dir))
    if training_args.should_save:
        Path(output, "result.json").write_text(json.dumps({"scores": scores, "lines": lines}))


@pytest.mark.e2e
def test_two_processes_share_the_records_and_agree_with_one(tiny_model_dir, demo_meta, tmp_path):
    from tests.scripts.test_finetune import free_port, run_env

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), __file__, str(tiny_model_dir), str(demo_meta), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = json.loads((tmp_path / "result.json").read_text())

    _, data_args, training_args = run_arguments(tiny_model_dir, demo_meta, tmp_path,
                                                "--per_device_eval_batch_size", "1")  # fmt: skip
    set_seed(0)
    one_scores, one_lines = build_generation_evaluation(data_args, training_args).run(
        _tiny_lora_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    )
    assert [line["id"] for line in two["lines"]] == [line["id"] for line in one_lines]
    assert [line["prediction"] for line in two["lines"]] == [line["prediction"] for line in one_lines]
    assert two["scores"] == pytest.approx(one_scores)


if __name__ == "__main__":
    distributed_worker(*sys.argv[1:4])
