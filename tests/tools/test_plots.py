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
    MIN_RELATIVE_LOSS_SPAN,
    LossHistory,
    build_loss_figure,
    build_metric_bars_figure,
    load_loss_history,
    loss_axis_limits,
    plot_metric_bars,
    plot_training_curves,
    save_figure,
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


def _panels(figure):
    """{y label: {line label: (steps, values)}} of every panel of a loss figure."""
    return {
        axes.get_ylabel(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}
        for axes in figure.axes
    }


def test_a_flat_noisy_loss_is_not_drawn_as_a_trend():
    """A loss that wanders between 7.60 and 7.68 must not fill the axis (the trend it would suggest is noise)."""
    flat = LossHistory(source=Path("x"), train={1: 7.68, 2: 7.61, 3: 7.65, 4: 7.60})
    low, high = build_loss_figure(flat, "run").axes[0].get_ylim()
    assert high - low >= MIN_RELATIVE_LOSS_SPAN * 7.68
    assert low < 7.60 and high > 7.68 and low > 0

    falling = LossHistory(source=Path("x"), train={1: 2.5, 2: 1.8, 3: 1.2, 4: 1.0}, eval={2: 1.9, 4: 1.1})
    low, high = build_loss_figure(falling, "run").axes[0].get_ylim()
    assert 0.9 < low < 1.0 and 2.5 < high < 2.6  # a real trend keeps the axis close to the data

    # Widened around the middle, 5% margin on each side; a loss falling to 0 keeps the axis at 0.
    span = MIN_RELATIVE_LOSS_SPAN * 7.68
    assert loss_axis_limits([7.60, 7.68]) == pytest.approx((7.64 - 0.55 * span, 7.64 + 0.55 * span))
    assert loss_axis_limits([2.0, 0.01])[0] == 0.0


def test_learning_rate_grad_norm_and_generation_metrics_panels(tmp_path):
    history = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-4 / s, "grad_norm": 0.5 + s} for s in range(1, 5)]
    history += [{"step": 2, "eval_loss": 1.5, "eval_rougeL": 12.0, "eval_cider": 30.0},
                {"step": 4, "eval_loss": 1.0, "eval_rougeL": 20.0, "eval_cider": 45.0}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    panels = _panels(build_loss_figure(load_loss_history(tmp_path), "run"))
    assert list(panels) == ["loss", "learning rate", "grad norm", "eval score"]
    assert panels["learning rate"]["_child0"] == ([1, 2, 3, 4], [1e-4 / s for s in range(1, 5)])
    assert panels["grad norm"]["_child0"] == ([1, 2, 3, 4], [1.5, 2.5, 3.5, 4.5])
    assert panels["eval score"] == {"ROUGE-L": ([2, 4], [12.0, 20.0]), "CIDEr": ([2, 4], [30.0, 45.0])}

    # Without logged learning rates, grad norms or generation metrics, the loss panel stands alone.
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 2.0},
                                                                             {"step": 2, "loss": 1.0}]}))
    assert list(_panels(build_loss_figure(load_loss_history(tmp_path), "run"))) == ["loss"]


def test_resume_points_from_the_training_log_are_marked_on_every_panel(tmp_path):
    _write_trainer_state(tmp_path, train_steps=list(range(1, 9)), eval_steps=[4, 8])
    (tmp_path / "training_log.txt").write_text(
        "# 2025-01-01 10:00:00 starting, 8 optimizer steps in all\n"
        "step 1/8 | epoch 0.10 | loss 3.0000 | lr 1.000e-05 | grad_norm n/a | tokens/s 1.0 | samples/s 1.000\n"
        "# 2025-01-01 11:00:00 resuming at step 4, 8 optimizer steps in all\n"
        "# 2025-01-01 12:00:00 resuming at step 6, 8 optimizer steps in all\n"
    )
    history = load_loss_history(tmp_path)
    assert history.source.name == "trainer_state.json" and history.resumed_at == [4, 6]
    figure = build_loss_figure(history, "run")
    for axes in figure.axes:
        marks = [line for line in axes.lines if line.get_linestyle() == "--"]
        assert [line.get_xdata()[0] for line in marks] == [4, 6]
    assert "resumed" in [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_the_best_checkpoint_is_marked(tmp_path):
    _write_trainer_state(tmp_path, train_steps=list(range(1, 9)), eval_steps=[4, 8])
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    state["best_model_checkpoint"] = str(tmp_path / "checkpoint-4")
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    history = load_loss_history(tmp_path)
    assert history.best_step == 4
    figure = build_loss_figure(history, "run")
    for axes in figure.axes:
        assert [list(line.get_xdata()) for line in axes.lines if line.get_linestyle() == ":"] == [[4, 4]]
    assert "best checkpoint" in [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_a_single_logged_point_gives_a_note_instead_of_a_dot(tmp_path):
    state = {"logging_steps": 10, "max_steps": 3,
             "log_history": [{"step": 3, "loss": 7.58}, {"step": 3, "train_runtime": 1.0}]}  # fmt: skip
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    history = load_loss_history(tmp_path)
    assert history.too_short_for_a_curve
    figure = build_loss_figure(history, "run")
    axes = figure.axes[0]
    assert not axes.lines and not axes.axison
    note = axes.texts[0].get_text()
    assert "train loss 7.5800 at step 3" in note
    assert "every 10 optimizer steps (--logging_steps 10); this run had 3" in note
    _assert_png(plot_training_curves(tmp_path))


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
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=6, logging_steps=1)
    callback.on_train_begin(SimpleNamespace(logging_strategy="steps", logging_steps=1), state, None)
    for step in range(1, 7):
        state.global_step = step
        callback.on_log(None, state, None, logs={"loss": 1.0 / step, "learning_rate": 1e-5 * step, "epoch": step / 6,
                                                 "grad_norm": 0.25 * step})  # fmt: skip
        if step % 3 == 0:
            callback.on_log(None, state, None, logs={"eval_loss": 0.5 / step, "eval_rougeL": 10.0 * step,
                                                     "eval_cider": 2.0 * step})  # fmt: skip

    history = load_loss_history(tmp_path)
    assert history.source.name == "training_log.txt"
    assert sorted(history.train) == [1, 2, 3, 4, 5, 6]
    assert history.train[4] == pytest.approx(0.25, abs=1e-4)  # the log keeps 4 decimals
    assert history.eval == pytest.approx({3: 0.5 / 3, 6: 0.5 / 6}, abs=1e-4)
    assert history.learning_rate == pytest.approx({step: 1e-5 * step for step in range(1, 7)})
    assert history.grad_norm == pytest.approx({step: 0.25 * step for step in range(1, 7)})
    assert history.eval_metrics == {"rougeL": {3: 30.0, 6: 60.0}, "cider": {3: 6.0, 6: 12.0}}
    assert history.max_steps == 6 and history.resumed_at == []
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


def _bars_by_model(figure):
    """{model: [bar heights]} of the single axes of a metric chart (one bar container per model)."""
    axes = figure.axes[0]
    return {container.get_label(): [bar.get_height() for bar in container] for container in axes.containers}


def test_metric_bars_share_one_scale(tmp_path):
    scores = {
        "base": {"rouge1": 10.0, "bleu4": 2.5, "cider": 30.0},
        "fine-tuned": {"rouge1": 45.0, "bleu4": 20.0, "cider": 250.0},
    }
    figure = build_metric_bars_figure(scores, ["rouge1", "bleu4", "cider", "meteor"])
    # One axes for every metric, so a BLEU bar of 2.5 is drawn shorter than a ROUGE bar of 10. METEOR has no value
    # for any model: no group for it.
    assert len(figure.axes) == 1
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["ROUGE-1", "BLEU-4", "CIDEr"]
    assert _bars_by_model(figure) == {"base": [10.0, 2.5, 30.0], "fine-tuned": [45.0, 20.0, 250.0]}
    low, high = axes.get_ylim()
    assert low == 0 and 250.0 < high < 250.0 * 1.3  # room for the value label above the highest bar

    path = plot_metric_bars(scores, ["rouge1", "bleu4", "cider"], tmp_path / "bars.png")
    _assert_png(path)


@pytest.mark.parametrize("num_models", [1, 2, 3])
def test_metric_bars_of_one_to_three_models_sit_side_by_side(num_models):
    metrics = ["rouge1", "rouge2", "rougeL", "bleu4", "cider"]
    scores = {f"model {i}": {m: 10.0 * (i + 1) + j for j, m in enumerate(metrics)} for i in range(num_models)}
    figure = build_metric_bars_figure(scores, metrics)
    axes = figure.axes[0]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == list(scores)
    # Each metric's group holds one bar per model, inside the group's slot and without overlapping.
    for group in range(len(metrics)):
        bars = sorted((container[group] for container in axes.containers), key=lambda bar: bar.get_x())
        assert len(bars) == num_models
        assert group - 0.5 < bars[0].get_x() and bars[-1].get_x() + bars[-1].get_width() < group + 0.5
        assert all(a.get_x() + a.get_width() <= b.get_x() for a, b in zip(bars, bars[1:]))
    # Every bar carries its value.
    labels = [text.get_text() for text in axes.texts]
    assert len(labels) == num_models * len(metrics) and "10.0" in labels


def test_all_zero_scores_give_a_note_instead_of_empty_bars(tmp_path):
    figure = build_metric_bars_figure({"model": dict.fromkeys(["rouge1", "rougeL", "bleu4", "cider"], 0.0)},
                                      ["rouge1", "rougeL", "bleu4", "cider", "meteor"])
    axes = figure.axes[0]
    assert not axes.patches and not axes.axison
    assert "Every score is 0 for model" in axes.texts[0].get_text()
    _assert_png(save_figure(figure, tmp_path / "zero.png"))


def test_metric_missing_for_one_model_is_drawn_as_not_available():
    figure = build_metric_bars_figure({"a": {"rouge1": 5.0}, "b": {"rouge1": 6.0, "cider": 7.0}}, ["rouge1", "cider"])
    assert _bars_by_model(figure) == {"a": [5.0, 0.0], "b": [6.0, 7.0]}
    assert [text.get_text() for text in figure.axes[0].texts] == ["5.0", "n/a", "6.0", "7.0"]


def test_plot_script_reports_the_points_it_drew(tmp_path, monkeypatch, capsys):
    _write_trainer_state(tmp_path, train_steps=[1, 2, 3, 4], eval_steps=[2, 4])
    monkeypatch.setattr(sys, "argv", ["plot_training_curves.py", str(tmp_path)])
    runpy.run_path(str(REPO_ROOT / "scripts" / "plot_training_curves.py"), run_name="__main__")
    assert "4 train and 2 eval loss points" in capsys.readouterr().out
    _assert_png(tmp_path / LOSS_CURVES_NAME)
