"""Loss curves and metric bars: the plotted data, and a real PNG on disk."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from internvl.tools.plots import (
    LOSS_CURVES_NAME,
    build_loss_figure,
    build_metric_bars_figure,
    load_loss_history,
    plot_metric_bars,
    plot_training_curves,
)
from internvl.train.callbacks import TrainingLogCallback

REPO_ROOT = Path(__file__).resolve().parents[2]


def _write_trainer_state(folder, train_steps, eval_steps):
    history = [{"step": s, "epoch": s / 10, "loss": 3.0 / s, "learning_rate": 1e-5} for s in train_steps]
    history += [{"step": s, "epoch": s / 10, "eval_loss": 2.0 / s} for s in eval_steps]
    history.append({"step": train_steps[-1], "train_runtime": 12.5, "train_loss": 1.0})  # the final summary entry
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": train_steps[-1], "log_history": history}))


def _plotted(figure):
    axes = figure.axes[0]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}


def _assert_png(path):
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_loss_curves_from_trainer_state(tmp_path):
    _write_trainer_state(tmp_path, train_steps=list(range(1, 13)), eval_steps=[4, 8, 12])
    history = load_loss_history(tmp_path)
    lines = _plotted(build_loss_figure(history, "run"))
    assert lines["train loss"] == (list(range(1, 13)), [3.0 / s for s in range(1, 13)])
    assert lines["eval loss"] == ([4, 8, 12], [2.0 / s for s in (4, 8, 12)])

    path = plot_training_curves(tmp_path)
    assert path == tmp_path / LOSS_CURVES_NAME
    _assert_png(path)


def test_resumed_run_keeps_one_point_per_step(tmp_path):
    _write_trainer_state(tmp_path, train_steps=[1, 2, 3], eval_steps=[])
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    state["log_history"].insert(3, {"step": 2, "loss": 9.0})  # step 2 logged again after a resume from step 1
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    history = load_loss_history(tmp_path)
    assert history.train == {1: 3.0, 2: 9.0, 3: 1.0}  # the later value wins
    assert history.eval == {}


def test_loss_curves_from_the_training_log_written_during_training(tmp_path):
    """While training runs there is no trainer_state.json yet: the live log, written by the trainer's callback,
    is read instead."""
    callback = TrainingLogCallback(tmp_path)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=6)
    callback.on_train_begin(None, state, None)
    for step in range(1, 7):
        state.global_step = step
        callback.on_log(None, state, None, logs={"loss": 1.0 / step, "learning_rate": 1e-5, "epoch": step / 6})
        if step % 3 == 0:
            callback.on_log(None, state, None, logs={"eval_loss": 0.5 / step})

    history = load_loss_history(tmp_path)
    assert history.source.name == "training_log.txt"
    assert sorted(history.train) == [1, 2, 3, 4, 5, 6]
    assert history.train[4] == pytest.approx(0.25, abs=1e-4)  # the log keeps 4 decimals
    assert history.eval == pytest.approx({3: 0.5 / 3, 6: 0.5 / 6}, abs=1e-4)
    _assert_png(plot_training_curves(tmp_path, tmp_path / "curves.png"))


def test_newest_checkpoint_state_is_used_when_the_run_has_no_final_state(tmp_path):
    _write_trainer_state(tmp_path / "checkpoint-2", train_steps=[1, 2], eval_steps=[])
    _write_trainer_state(tmp_path / "checkpoint-10", train_steps=list(range(1, 11)), eval_steps=[5, 10])
    history = load_loss_history(tmp_path)
    assert history.source == tmp_path / "checkpoint-10" / "trainer_state.json"
    assert len(history.train) == 10 and len(history.eval) == 2


def test_a_folder_without_logs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer_state.json or training_log.txt"):
        load_loss_history(tmp_path)


def test_metric_bars_show_each_models_values(tmp_path):
    scores = {
        "base": {"rouge1": 10.0, "bleu4": 2.5, "cider": 30.0},
        "fine-tuned": {"rouge1": 45.0, "bleu4": 20.0, "cider": 250.0},
    }
    figure = build_metric_bars_figure(scores, ["rouge1", "bleu4", "cider", "meteor"])
    # METEOR has no value for any model: no panel for it.
    assert [axes.get_title() for axes in figure.axes] == ["ROUGE-1", "BLEU-4", "CIDEr"]
    heights = {axes.get_title(): [bar.get_height() for bar in axes.patches] for axes in figure.axes}
    assert heights == {"ROUGE-1": [10.0, 45.0], "BLEU-4": [2.5, 20.0], "CIDEr": [30.0, 250.0]}

    path = plot_metric_bars(scores, ["rouge1", "bleu4", "cider"], tmp_path / "bars.png")
    _assert_png(path)


def test_metric_missing_for_one_model_is_drawn_as_not_available():
    figure = build_metric_bars_figure({"a": {"rouge1": 5.0}, "b": {"rouge1": 6.0, "cider": 7.0}}, ["rouge1", "cider"])
    cider = next(axes for axes in figure.axes if axes.get_title() == "CIDEr")
    assert [bar.get_height() for bar in cider.patches] == [0.0, 7.0]
    assert [text.get_text() for text in cider.texts] == ["n/a", "7.0"]


def test_plot_script_reports_the_points_it_drew(tmp_path, monkeypatch, capsys):
    _write_trainer_state(tmp_path, train_steps=[1, 2, 3, 4], eval_steps=[2, 4])
    monkeypatch.setattr(sys, "argv", ["plot_training_curves.py", str(tmp_path)])
    runpy.run_path(str(REPO_ROOT / "scripts" / "plot_training_curves.py"), run_name="__main__")
    assert "4 train and 2 eval loss points" in capsys.readouterr().out
    _assert_png(tmp_path / LOSS_CURVES_NAME)
