"""Evaluation end to end on the tiny model and demo videos: predictions, metrics, report, resumption."""

from __future__ import annotations

import json
import logging
import runpy
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from internvl.data.prepare import prepare_dataset
from internvl.data.records import RecordError
from internvl.tools import evaluate
from internvl.tools.evaluate import EvaluationConfig, load_eval_records, run_evaluation
from internvl.tools.metrics import compute_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
METRICS = {"rouge1", "rouge2", "rougeL", "bleu4", "cider", "meteor"}


@pytest.fixture(scope="module")
def prepared_data(demo_videos_dir, tmp_path_factory):
    """The demo videos prepared as the training data is: meta.json with a _val entry of 3 records."""
    output = tmp_path_factory.mktemp("prepared")
    prepare_dataset(demo_videos_dir, output, val_ratio=0.5, progress=False)
    return output


def _val_records(prepared_data):
    meta = json.loads((prepared_data / "meta.json").read_text())
    name = next(name for name in meta if name.endswith("_val"))
    lines = (prepared_data / meta[name]["annotation"]).read_text().splitlines()
    return [json.loads(line) for line in lines]


def _predictions(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _config(model, output_dir, **overrides):
    settings = dict(batch_size=2, num_frames=2, max_new_tokens=5, dtype="float32", device="cpu")
    settings.update(overrides)
    return EvaluationConfig(model=model, output_dir=output_dir, **settings)


def test_evaluate_script_compares_base_and_finetuned(
    prepared_data, tiny_lora_output, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    output_dir = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", [
        "evaluate_internvl3.py", "--model", str(tiny_lora_output), "--compare", str(tiny_model_dir),
        "--meta-path", str(prepared_data / "meta.json"), "--output-dir", str(output_dir), "--batch-size", "2",
        "--num-frames", "2", "--max-new-tokens", "5", "--dtype", "float32", "--device", "cpu",
    ])  # fmt: skip
    runpy.run_path(str(REPO_ROOT / "scripts" / "evaluate_internvl3.py"), run_name="__main__")
    printed = capsys.readouterr().out

    val = _val_records(prepared_data)
    assert len(val) == 3
    for file_name in ("predictions.jsonl", "predictions_base.jsonl"):
        predictions = _predictions(output_dir / file_name)
        # One prediction per record, in order, paired with the record's own reference and prompt.
        assert [p["id"] for p in predictions] == [r["id"] for r in val]
        assert [p["reference"] for p in predictions] == [r["conversations"][1]["value"] for r in val]
        assert [p["prompt"] for p in predictions] == [r["conversations"][0]["value"] for r in val]
        assert all(isinstance(p["prediction"], str) and "error" not in p for p in predictions)

    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "fine-tuned"]
    assert metrics["data"]["num_records"] == 3
    for label, file_name in (("base", "predictions_base.jsonl"), ("fine-tuned", "predictions.jsonl")):
        summary = metrics["models"][label]
        assert summary["num_scored"] == 3 and summary["num_failed"] == 0
        assert set(summary["scores"]) | set(summary["skipped_metrics"]) == METRICS
        predictions = _predictions(output_dir / file_name)
        recomputed = compute_metrics([p["prediction"] for p in predictions], [p["reference"] for p in predictions])
        assert summary["scores"] == pytest.approx(recomputed.scores)
    assert metrics["models"]["fine-tuned"]["base_model"] == str(tiny_model_dir)

    report = (output_dir / "report.md").read_text()
    assert "| metric | base | fine-tuned | Δ |" in report
    assert "| ROUGE-1 |" in report and "| CIDEr |" in report
    assert "![metrics](metric_bars.png)" in report
    assert val[0]["id"] in report  # an example with its reference and both predictions
    with Image.open(output_dir / "metric_bars.png") as image:
        assert image.format == "PNG" and image.width > 200
    assert "fine-tuned: 3/3 scored" in printed and "base: 3/3 scored" in printed


def test_rerun_generates_only_missing_ids(prepared_data, tiny_lora_output, tmp_path, monkeypatch):
    config = _config(tiny_lora_output, tmp_path, meta_path=prepared_data / "meta.json")
    run_evaluation(config)
    predictions_path = tmp_path / "predictions.jsonl"
    first = _predictions(predictions_path)

    # An interrupted run: the last record is missing and a half-written line is left behind.
    lines = predictions_path.read_text().splitlines(keepends=True)
    predictions_path.write_text("".join(lines[:-1]) + lines[-1][:20])
    loaded = []
    original = evaluate.load_visual_input

    def spy(path, *args, **kwargs):
        loaded.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(evaluate, "load_visual_input", spy)
    metrics = run_evaluation(config)

    assert loaded == [first[-1]["media"]]  # only the missing record was generated again
    assert _predictions(predictions_path) == first  # greedy decoding gives the same text
    assert metrics["models"]["model"]["num_scored"] == 3

    # Everything done: the metrics are recomputed without loading the model.
    monkeypatch.setattr(evaluate, "load_model_for_inference", lambda *a, **k: pytest.fail("model loaded"))
    assert run_evaluation(config)["models"]["model"]["scores"] == metrics["models"]["model"]["scores"]


def test_unreadable_video_is_reported_and_retried(prepared_data, tiny_lora_output, demo_videos_dir, tmp_path):
    records = _val_records(prepared_data)
    records[1]["video"] = "missing.mp4"
    records[1].pop("decoded_frames")
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = _config(tiny_lora_output, tmp_path / "eval", jsonl=jsonl, root=demo_videos_dir)

    summary = run_evaluation(config)["models"]["model"]
    assert summary["num_scored"] == 2 and summary["num_failed"] == 1
    assert summary["failures"][0]["id"] == records[1]["id"] and "missing.mp4" in summary["failures"][0]["error"]
    assert "## Failed records" in (tmp_path / "eval" / "report.md").read_text()

    shutil.copy(demo_videos_dir / "demo_000.mp4", demo_videos_dir / "missing.mp4")
    try:
        summary = run_evaluation(config)["models"]["model"]
    finally:
        (demo_videos_dir / "missing.mp4").unlink()
    assert summary["num_scored"] == 3 and summary["num_failed"] == 0
    lines = _predictions(tmp_path / "eval" / "predictions.jsonl")
    assert len(lines) == 4 and "error" in lines[1] and lines[-1]["id"] == records[1]["id"]


def test_other_generation_settings_start_over(prepared_data, tiny_lora_output, tmp_path, caplog):
    run_evaluation(_config(tiny_lora_output, tmp_path, meta_path=prepared_data / "meta.json", max_new_tokens=2))
    first = _predictions(tmp_path / "predictions.jsonl")
    with caplog.at_level(logging.INFO, logger="internvl.tools.evaluate"):
        run_evaluation(
            _config(tiny_lora_output, tmp_path, meta_path=prepared_data / "meta.json", max_new_tokens=2, num_frames=3)
        )
    assert "they were generated with other num_frames; starting over" in caplog.text
    assert "reusing 3" not in caplog.text and "generating 3 of 3 records" in caplog.text
    assert _predictions(tmp_path / "predictions.previous.jsonl") == first  # kept, not lost
    assert len(_predictions(tmp_path / "predictions.jsonl")) == 3


def test_a_retrained_adapter_in_the_same_folder_is_evaluated_again(prepared_data, tiny_lora_output, tmp_path,
                                                                   caplog):
    """Retraining (or resuming) into the same output folder changes the adapter under the same path: the old
    predictions must not be reported as the new adapter's scores."""
    adapter_dir = tmp_path / "run"
    shutil.copytree(tiny_lora_output, adapter_dir)
    config = _config(adapter_dir, tmp_path / "eval", meta_path=prepared_data / "meta.json", max_new_tokens=2)
    run_evaluation(config)
    with caplog.at_level(logging.INFO, logger="internvl.tools.evaluate"):
        run_evaluation(config)  # same weights: reused, and said
    assert f"reusing 3 predictions from {tmp_path / 'eval' / 'predictions.jsonl'}" in caplog.text
    caplog.clear()

    adapter_file = adapter_dir / "adapter_model.safetensors"
    weights = load_file(adapter_file)
    save_file({name: tensor * 3 if ".lora_B." in name else tensor for name, tensor in weights.items()}, adapter_file)
    with caplog.at_level(logging.INFO, logger="internvl.tools.evaluate"):
        run_evaluation(config)
    assert "they were generated with other weights; starting over" in caplog.text
    assert "reusing 3" not in caplog.text
    assert (tmp_path / "eval" / "predictions.previous.jsonl").is_file()


def test_predictions_without_their_settings_are_not_reused(prepared_data, tiny_lora_output, tmp_path, caplog):
    config = _config(tiny_lora_output, tmp_path, meta_path=prepared_data / "meta.json", max_new_tokens=2)
    run_evaluation(config)
    (tmp_path / "run_settings.json").unlink()  # e.g. written by an older version
    with caplog.at_level(logging.INFO, logger="internvl.tools.evaluate"):
        run_evaluation(config)
    assert "no run_settings.json records what produced them; starting over" in caplog.text


def test_evaluate_script_exits_non_zero_when_records_failed(prepared_data, tiny_lora_output, demo_videos_dir,
                                                           tmp_path, monkeypatch, capsys):
    records = _val_records(prepared_data)
    records[0]["video"] = "missing.mp4"
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(sys, "argv", [
        "evaluate_internvl3.py", "--model", str(tiny_lora_output), "--jsonl", str(jsonl), "--root",
        str(demo_videos_dir), "--output-dir", str(tmp_path / "eval"), "--num-frames", "2", "--max-new-tokens", "2",
        "--dtype", "float32", "--device", "cpu",
    ])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "scripts" / "evaluate_internvl3.py"), run_name="__main__")
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    assert "model: 2/3 scored" in printed and "1 records failed" in printed and "report:" in printed


def test_output_dir_that_is_a_file_is_one_line(tiny_lora_output, prepared_data, tmp_path, monkeypatch):
    a_file = tmp_path / "eval.txt"
    a_file.write_text("")
    for output_dir, reason in ((a_file, "is a file"), (a_file / "eval", f"cannot be created: {a_file} is a file")):
        monkeypatch.setattr(sys, "argv", ["evaluate_internvl3.py", "--model", str(tiny_lora_output), "--meta-path",
                                          str(prepared_data / "meta.json"), "--output-dir", str(output_dir)])  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO_ROOT / "scripts" / "evaluate_internvl3.py"), run_name="__main__")
        assert exit_info.value.code == f"error: --output-dir {output_dir} {reason}; give a writable folder"


def test_predictions_of_another_set_are_refused(prepared_data, tiny_lora_output, tmp_path):
    config = _config(tiny_lora_output, tmp_path, meta_path=prepared_data / "meta.json", max_new_tokens=2)
    run_evaluation(config)
    with open(tmp_path / "predictions.jsonl", "a") as f:  # same model and settings, another set's record
        f.write(json.dumps({"id": "other", "prediction": "x"}) + "\n")
    with pytest.raises(ValueError, match="not in this evaluation set"):
        run_evaluation(config)


def test_records_are_checked_with_their_source_line(tmp_path):
    good = {"id": "a", "video": "a.mp4", "conversations": [
        {"from": "human", "value": "<video>\nSummarize."}, {"from": "gpt", "value": "A cat."}]}  # fmt: skip
    no_answer = {"id": "b", "video": "b.mp4", "conversations": [{"from": "human", "value": "<video>\nSummarize."}]}
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text(json.dumps(good) + "\n" + json.dumps(no_answer) + "\n")
    with pytest.raises(RecordError, match=r"set.jsonl:2: no non-empty 'gpt' turn"):  # refused as training does
        load_eval_records(jsonl=jsonl)

    two_questions = dict(good, conversations=good["conversations"] * 2)  # trainable, but which answer is the reference?
    jsonl.write_text(json.dumps(good) + "\n" + json.dumps(two_questions) + "\n")
    with pytest.raises(ValueError, match=r"set.jsonl:2: evaluation needs one 'human' turn"):
        load_eval_records(jsonl=jsonl)

    jsonl.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="id 'a' appears twice"):
        load_eval_records(jsonl=jsonl)

    system = dict(good, conversations=[{"from": "system", "value": "Be brief."}, *good["conversations"]])
    jsonl.write_text(json.dumps(system) + "\n")
    records, _ = load_eval_records(jsonl=jsonl)
    assert records[0].system_message == "Be brief." and records[0].prompt == "<video>\nSummarize."
    assert records[0].media == str(tmp_path / "a.mp4")  # relative to the JSONL's folder by default


def test_evaluate_script_reports_bad_input_in_one_line(tiny_lora_output, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate_internvl3.py", "--model", str(tiny_lora_output), "--meta-path",
                                      str(tmp_path / "meta.json"), "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "scripts" / "evaluate_internvl3.py"), run_name="__main__")
    assert str(exit_info.value.code).startswith(f"error: meta file {tmp_path / 'meta.json'} not found")
    assert not (tmp_path / "eval").exists()


def test_meta_without_val_entry_is_a_clear_error(prepared_data, tmp_path):
    meta = json.loads((prepared_data / "meta.json").read_text())
    train_only = {name: dict(entry, root=str(prepared_data / entry["root"]),
                             annotation=str(prepared_data / entry["annotation"]))
                  for name, entry in meta.items() if not name.endswith("_val")}  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(train_only))
    with pytest.raises(ValueError, match="no evaluation entry"):
        load_eval_records(meta_path=tmp_path / "meta.json")


def test_an_hf_base_evaluates_as_the_original_one(prepared_data, tiny_lora_output, tiny_hf_model_dir, tmp_path):
    """The adapter on the -hf base (``--base-model``) predicts what it predicts on the official base, whose tensors
    the -hf folder holds under other names."""
    meta = prepared_data / "meta.json"
    run_evaluation(_config(tiny_lora_output, tmp_path / "original", meta_path=meta))
    metrics = run_evaluation(_config(tiny_lora_output, tmp_path / "hf", meta_path=meta, base_model=tiny_hf_model_dir))
    assert metrics["models"]["model"]["base_model"] == str(tiny_hf_model_dir)
    predictions = _predictions(tmp_path / "hf" / "predictions.jsonl")
    assert len(predictions) == 3
    assert predictions == _predictions(tmp_path / "original" / "predictions.jsonl")
