"""Pictures: training / evaluation loss curves of a training run, and metric bars of one or more evaluated models.

Figures are built with matplotlib's object API on the Agg canvas (no display, no global pyplot state) and written
atomically.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from internvl.data.files import atomic_path
from internvl.tools.metrics import METRIC_TITLES
from internvl.train.callbacks import TRAINING_LOG_NAME
from internvl.train.checkpoint import TRAINER_STATE_NAME, list_checkpoints

LOSS_CURVES_NAME = "loss_curves.png"

# Lines written by the training-log callback, e.g. "step 3/10 | epoch 0.30 | loss 1.2345 | ..." and
# "eval  step 3/10 | eval_loss 1.2345".
_TRAIN_LINE = re.compile(r"^step (\d+)/\d+ \|.*\| loss (\S+) \|")
_EVAL_LINE = re.compile(r"^eval\s+step (\d+)/\d+ \| eval_loss (\S+)")


@dataclass
class LossHistory:
    """Loss per optimizer step. ``source`` is the file it was read from."""

    source: Path
    train: dict[int, float] = field(default_factory=dict)
    eval: dict[int, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.train or self.eval)


def _read_trainer_state(path: Path) -> LossHistory:
    try:
        log_history = json.loads(path.read_text(encoding="utf-8"))["log_history"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a trainer state with a 'log_history' list ({error})") from error
    history = LossHistory(source=path)
    for entry in log_history:
        if "step" not in entry:
            continue
        # Later entries for a step (a resumed run logs it again) replace earlier ones.
        if "loss" in entry:
            history.train[int(entry["step"])] = float(entry["loss"])
        if "eval_loss" in entry:
            history.eval[int(entry["step"])] = float(entry["eval_loss"])
    return history


def _read_training_log(path: Path) -> LossHistory:
    history = LossHistory(source=path)
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := _TRAIN_LINE.match(line):
            history.train[int(match.group(1))] = float(match.group(2))
        elif match := _EVAL_LINE.match(line):
            history.eval[int(match.group(1))] = float(match.group(2))
    return history


def load_loss_history(output_dir: str | Path) -> LossHistory:
    """The loss history of a training output folder.

    Read from ``trainer_state.json`` (written at the end of training), else ``training_log.txt`` (written live),
    else the newest ``checkpoint-N/trainer_state.json``.
    """
    output_dir = Path(output_dir)
    candidates = [output_dir / TRAINER_STATE_NAME, output_dir / TRAINING_LOG_NAME]
    candidates += [c / TRAINER_STATE_NAME for c in reversed(list_checkpoints(output_dir))]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        reader = _read_training_log if candidate.name == TRAINING_LOG_NAME else _read_trainer_state
        history = reader(candidate)
        if history:
            return history
    raise FileNotFoundError(
        f"{output_dir} has no loss values: expected {TRAINER_STATE_NAME} or {TRAINING_LOG_NAME} (or a "
        "checkpoint-N/trainer_state.json) written by a training run with at least one logging step"
    )


def build_loss_figure(history: LossHistory, title: str) -> Figure:
    """Train loss per logging step and eval loss per evaluation, against the optimizer step."""
    figure = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if history.train:
        steps = sorted(history.train)
        axes.plot(steps, [history.train[s] for s in steps], label="train loss", color="tab:blue", linewidth=1.2,
                  marker="." if len(steps) <= 50 else None)
    if history.eval:
        steps = sorted(history.eval)
        axes.plot(steps, [history.eval[s] for s in steps], label="eval loss", color="tab:orange", linewidth=1.8,
                  marker="o")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp_path:
        figure.savefig(tmp_path, format="png")
    return path


def plot_training_curves(output_dir: str | Path, output_path: str | Path | None = None) -> Path:
    """Write the loss curves of a training output folder as a PNG (default ``<output_dir>/loss_curves.png``)."""
    output_dir = Path(output_dir)
    history = load_loss_history(output_dir)
    figure = build_loss_figure(history, title=f"{output_dir.resolve().name}: loss ({history.source.name})")
    return save_figure(figure, output_path or output_dir / LOSS_CURVES_NAME)


def build_metric_bars_figure(scores_by_model: dict[str, dict[str, float]], metric_names: list[str]) -> Figure:
    """One panel per metric (their scales differ: CIDEr reaches 1000), one labelled bar per model.

    Metrics no model has (e.g. METEOR without WordNet) get no panel.
    """
    models = list(scores_by_model)
    metric_names = [m for m in metric_names if any(m in scores for scores in scores_by_model.values())]
    if not metric_names:
        raise ValueError("no metric values to plot")
    columns = len(metric_names)
    figure = Figure(figsize=(2.2 * columns + 1, 3.8), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, columns, squeeze=False)[0]
    colours = [f"C{i}" for i in range(len(models))]
    for axes, metric in zip(panels, metric_names):
        values = [scores_by_model[model].get(metric) for model in models]
        bars = axes.bar(range(len(models)), [v or 0.0 for v in values], color=colours)
        axes.bar_label(bars, labels=[f"{v:.1f}" if v is not None else "n/a" for v in values], fontsize=8)
        axes.set_title(METRIC_TITLES.get(metric, metric))
        axes.set_xticks([])
        axes.set_ylim(bottom=0)
        axes.margins(y=0.15)
        axes.grid(True, axis="y", alpha=0.3)
    figure.legend(panels[0].patches, models, loc="outside lower center", ncols=min(len(models), 4))
    figure.suptitle("scores on a 0-100 scale (CIDEr x 100)", fontsize=9)
    return figure


def plot_metric_bars(
    scores_by_model: dict[str, dict[str, float]], metric_names: list[str], output_path: str | Path
) -> Path:
    """Write a PNG of metric bars, one colour per model (e.g. base vs fine-tuned)."""
    return save_figure(build_metric_bars_figure(scores_by_model, metric_names), output_path)
