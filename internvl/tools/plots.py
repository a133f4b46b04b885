"""Pictures: the curves of a training run, metric bars of one or more evaluated models, and a contact sheet of a
sample's frames.

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
from matplotlib.ticker import MaxNLocator

from internvl.data.files import atomic_path
from internvl.tools.metrics import METRIC_NAMES, METRIC_TITLES
from internvl.train.callbacks import TRAINING_LOG_NAME
from internvl.train.checkpoint import TRAINER_STATE_NAME, list_checkpoints

LOSS_CURVES_NAME = "loss_curves.png"

# Lines written by the training-log callback (internvl.train.callbacks), e.g.
#   "# 2025-01-01 10:00:00 resuming at step 40, 90 optimizer steps in all"
#   "step 3/10 | epoch 0.30 | loss 1.2345 | lr 2.000e-05 | grad_norm 0.5000 | ..."
#   "eval  step 3/10 | eval_loss 1.2345 | rougeL 12.34 | ..."
_HEADER_LINE = re.compile(r"^# .* (?:resuming at step (\d+)|starting), (\d+) optimizer steps in all")
_CHECKPOINT_STEP = re.compile(r"checkpoint-(\d+)/?$")
_STEP_FIELD = re.compile(r"^(eval\s+)?step (\d+)/(\d+)$")
# The loss panel spans at least this fraction of its largest value, so that noise of a flat loss (7.60-7.68)
# does not fill the axis and read as a trend.
MIN_RELATIVE_LOSS_SPAN = 0.2


@dataclass
class LossHistory:
    """The logged values of a training run per optimizer step. ``source`` is the file they were read from;
    ``resumed_at`` the steps a run resumed from (read from ``training_log.txt``); ``logging_steps`` and
    ``max_steps`` are known when the source records them."""

    source: Path
    train: dict[int, float] = field(default_factory=dict)
    eval: dict[int, float] = field(default_factory=dict)
    learning_rate: dict[int, float] = field(default_factory=dict)
    grad_norm: dict[int, float] = field(default_factory=dict)
    eval_metrics: dict[str, dict[int, float]] = field(default_factory=dict)  # "rougeL" -> {step: score}
    resumed_at: list[int] = field(default_factory=list)
    best_step: int | None = None  # of the best checkpoint (--metric_for_best_model), from trainer_state.json
    logging_steps: int | None = None
    max_steps: int | None = None

    def __bool__(self) -> bool:
        return bool(self.train or self.eval)

    @property
    def too_short_for_a_curve(self) -> bool:
        return len(self.train) < 2 and len(self.eval) < 2


def _record_eval_metrics(history: LossHistory, step: int, values: dict[str, float], prefix: str = "") -> None:
    for name in METRIC_NAMES:
        if prefix + name in values:
            history.eval_metrics.setdefault(name, {})[step] = float(values[prefix + name])


def _read_trainer_state(path: Path) -> LossHistory:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        log_history = state["log_history"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a trainer state with a 'log_history' list ({error})") from error
    history = LossHistory(source=path, logging_steps=state.get("logging_steps"), max_steps=state.get("max_steps"))
    best = _CHECKPOINT_STEP.search(state.get("best_model_checkpoint") or "")
    history.best_step = int(best.group(1)) if best else None
    for entry in log_history:
        if "step" not in entry:
            continue
        step = int(entry["step"])
        # Later entries for a step (a resumed run logs it again) replace earlier ones.
        if "loss" in entry:
            history.train[step] = float(entry["loss"])
            for key, values in (("learning_rate", history.learning_rate), ("grad_norm", history.grad_norm)):
                if entry.get(key) is not None:
                    values[step] = float(entry[key])
        if "eval_loss" in entry:
            history.eval[step] = float(entry["eval_loss"])
            _record_eval_metrics(history, step, entry, prefix="eval_")
    return history


def _fields(line: str) -> dict[str, str]:
    """``"name value"`` fields of a training-log line, by name."""
    pairs = (part.strip().split(" ", 1) for part in line.split(" | ")[1:])
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def _number(text: str | None) -> float | None:
    try:
        return float(text.split()[0]) if text else None
    except ValueError:  # "n/a"
        return None


def _read_training_log(path: Path) -> LossHistory:
    history = LossHistory(source=path)
    for line in path.read_text(encoding="utf-8").splitlines():
        if header := _HEADER_LINE.match(line):
            if header.group(1):
                history.resumed_at.append(int(header.group(1)))
            history.max_steps = int(header.group(2))
            continue
        step_field = _STEP_FIELD.match(line.split(" | ", 1)[0])
        if not step_field:
            continue
        step, values = int(step_field.group(2)), {k: _number(v) for k, v in _fields(line).items()}
        if step_field.group(1) and values.get("eval_loss") is not None:
            history.eval[step] = values["eval_loss"]
            _record_eval_metrics(history, step, {k: v for k, v in values.items() if v is not None})
        elif not step_field.group(1) and values.get("loss") is not None:
            history.train[step] = values["loss"]
            for key, series in (("lr", history.learning_rate), ("grad_norm", history.grad_norm)):
                if values.get(key) is not None:
                    series[step] = values[key]
    return history


def load_loss_history(output_dir: str | Path) -> LossHistory:
    """The logged history of a training output folder.

    Read from ``trainer_state.json`` (written at the end of training), else ``training_log.txt`` (written live),
    else the newest ``checkpoint-N/trainer_state.json``. Resume points always come from ``training_log.txt``.
    """
    output_dir = Path(output_dir)
    training_log = output_dir / TRAINING_LOG_NAME
    candidates = [output_dir / TRAINER_STATE_NAME, training_log]
    candidates += [c / TRAINER_STATE_NAME for c in reversed(list_checkpoints(output_dir))]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        reader = _read_training_log if candidate.name == TRAINING_LOG_NAME else _read_trainer_state
        history = reader(candidate)
        if history:
            if candidate != training_log and training_log.is_file():
                history.resumed_at = _read_training_log(training_log).resumed_at
            return history
    raise FileNotFoundError(
        f"{output_dir} has no loss values: expected {TRAINER_STATE_NAME} or {TRAINING_LOG_NAME} (or a "
        "checkpoint-N/trainer_state.json) written by a training run with at least one logging step"
    )


def loss_axis_limits(values: list[float]) -> tuple[float, float]:
    """The y-range of the loss panel: the values, widened around their middle to span at least
    ``MIN_RELATIVE_LOSS_SPAN`` of the largest one, with a 5% margin (never below 0 for non-negative losses)."""
    low, high = min(values), max(values)
    min_span = MIN_RELATIVE_LOSS_SPAN * max(abs(high), abs(low), 1e-6)
    if high - low < min_span:
        middle = (high + low) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    margin = 0.05 * (high - low)
    low = max(low - margin, 0.0) if min(values) >= 0 else low - margin
    return low, high + margin


def _series(axes, values: dict[int, float], **style) -> None:
    steps = sorted(values)
    axes.plot(steps, [values[s] for s in steps], marker="." if len(steps) <= 50 else None, **style)


def _change(values: dict[int, float]) -> str:
    steps = sorted(values)
    first, last = values[steps[0]], values[steps[-1]]
    relative = f" ({100 * (last - first) / abs(first):+.2f}%)" if first else ""
    return f"{first:.4f} at step {steps[0]} -> {last:.4f} at step {steps[-1]}{relative}"


def _too_short_note(history: LossHistory) -> str:
    logged = {step: ("train", value) for step, value in history.train.items()}
    logged.update({step: ("eval", value) for step, value in history.eval.items()})
    points = ", ".join(f"{kind} loss {value:.4f} at step {step}" for step, (kind, value) in sorted(logged.items()))
    every = f"every {history.logging_steps} optimizer steps (--logging_steps {history.logging_steps})" if (
        history.logging_steps) else "every --logging_steps optimizer steps"
    run = f"; this run had {history.max_steps}" if history.max_steps else ""
    return (
        f"Too few points for a curve: {points}.\n\n"
        f"The loss is logged {every}{run}.\n"
        "Lower --logging_steps (e.g. 1) to see how the loss evolves."
    )


def build_loss_figure(history: LossHistory, title: str) -> Figure:
    """Loss (train per logging step, eval per evaluation), learning rate, gradient norm and generation metrics
    against the optimizer step, one panel each (panels without values are left out); resume points and the best
    checkpoint are marked.
    With fewer than two points the figure is a note saying why there is no curve."""
    if history.too_short_for_a_curve:
        figure = Figure(figsize=(8, 3), dpi=120, layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.set_axis_off()
        axes.set_title(title)
        axes.text(0.5, 0.5, _too_short_note(history), ha="center", va="center", wrap=True, fontsize=10)
        return figure

    panels = ["loss"] + [name for name, values in (("learning rate", history.learning_rate),
                                                   ("grad norm", history.grad_norm),
                                                   ("generation metrics", history.eval_metrics)) if values]
    heights = [3] + [1.3] * (len(panels) - 1)
    figure = Figure(figsize=(8, 0.9 + sum(heights)), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes_by_panel = dict(zip(panels, figure.subplots(len(panels), 1, sharex=True, squeeze=False,
                                                     height_ratios=heights)[:, 0]))
    loss = axes_by_panel["loss"]
    notes = []
    if history.train:
        _series(loss, history.train, label="train loss", color="tab:blue", linewidth=1.2)
        notes.append(f"train {_change(history.train)}")
    if history.eval:
        _series(loss, history.eval, label="eval loss", color="tab:orange", linewidth=1.8, markersize=9)
        notes.append(f"eval {_change(history.eval)}")
    loss.set_ylim(*loss_axis_limits([*history.train.values(), *history.eval.values()]))
    loss.set_ylabel("loss")
    figure.suptitle(title)
    loss.set_title("\n".join(notes), fontsize=8, loc="left", color="0.25")
    if "learning rate" in axes_by_panel:
        axes = axes_by_panel["learning rate"]
        _series(axes, history.learning_rate, color="tab:green", linewidth=1.2)
        axes.set_ylabel("learning rate")
        axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if "grad norm" in axes_by_panel:
        axes = axes_by_panel["grad norm"]
        _series(axes, history.grad_norm, color="tab:red", linewidth=1.2)
        axes.set_ylabel("grad norm")
        axes.set_ylim(0, 1.15 * max(history.grad_norm.values()) or 1.0)
    if "generation metrics" in axes_by_panel:
        axes = axes_by_panel["generation metrics"]
        for name, values in history.eval_metrics.items():
            _series(axes, values, label=METRIC_TITLES.get(name, name), linewidth=1.2)
        axes.set_ylabel("eval score")
        axes.set_ylim(0, 1.15 * max(v for values in history.eval_metrics.values() for v in values.values()) or 1.0)
        axes.legend(fontsize=7, ncols=3, loc="best")
    for index, axes in enumerate(axes_by_panel.values()):
        axes.grid(True, alpha=0.3)
        for step in history.resumed_at:
            axes.axvline(step, color="0.4", linestyle="--", linewidth=1,
                         label="resumed" if index == 0 and step == history.resumed_at[0] else None)
        if history.best_step is not None:
            axes.axvline(history.best_step, color="tab:green", linestyle=":", linewidth=1.5,
                         label="best checkpoint" if index == 0 else None)
    loss.legend(loc="upper right")
    last = axes_by_panel[panels[-1]]
    last.set_xlabel("optimizer step")
    last.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    figure = build_loss_figure(history, title=f"{output_dir.resolve().name} ({history.source.name})")
    return save_figure(figure, output_path or output_dir / LOSS_CURVES_NAME)


def _all_zero_note(scores_by_model: dict[str, dict[str, float]], metric_names: list[str]) -> str:
    titles = ", ".join(METRIC_TITLES.get(m, m) for m in metric_names)
    return (
        f"Every score is 0 for {', '.join(scores_by_model)} ({titles}).\n\n"
        "No prediction shares a word with its reference: look at the examples in report.md\n"
        "(empty, repeated or off-topic text), at --max-new-tokens and at the prompt."
    )


def build_metric_bars_figure(scores_by_model: dict[str, dict[str, float]], metric_names: list[str]) -> Figure:
    """Grouped bars on one 0-100 scale (CIDEr x 100, as in captioning papers): one group per metric, one labelled
    bar per model (1-3 models side by side). Metrics no model has (e.g. METEOR without WordNet) are left out; when
    every score is 0 the figure is a note instead of empty bars."""
    models = list(scores_by_model)
    metric_names = [m for m in metric_names if any(m in scores for scores in scores_by_model.values())]
    if not metric_names:
        raise ValueError("no metric values to plot")
    values = {model: [scores_by_model[model].get(m) for m in metric_names] for model in models}
    figure = Figure(figsize=(max(6.0, 1.2 * len(metric_names) * max(len(models), 2) / 2 + 2), 4.2), dpi=120,
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if not any(v for row in values.values() for v in row):
        axes.set_axis_off()
        axes.text(0.5, 0.5, _all_zero_note(scores_by_model, metric_names), ha="center", va="center", fontsize=10)
        return figure
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        offsets = [m + (index - (len(models) - 1) / 2) * width for m in range(len(metric_names))]
        bars = axes.bar(offsets, [v or 0.0 for v in values[model]], width * 0.92, label=model, color=f"C{index}")
        axes.bar_label(bars, labels=[f"{v:.1f}" if v is not None else "n/a" for v in values[model]], fontsize=8,
                       padding=2)
    axes.set_xticks(range(len(metric_names)), [METRIC_TITLES.get(m, m) for m in metric_names])
    highest = max(v or 0.0 for row in values.values() for v in row)
    axes.set_ylim(0, highest * 1.15)
    axes.set_ylabel("score (0-100; CIDEr x 100)")
    axes.grid(True, axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    figure.legend(loc="outside upper center", ncols=len(models), fontsize=9)  # never over a bar
    return figure


def build_contact_sheet_figure(images: list, title: str, columns: int = 4) -> Figure:
    """Frames (HxWx3 ``uint8`` arrays) in a grid, each titled ``Frame-i`` as the prompt announces it."""
    if not images:
        raise ValueError("no frames to show")
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    figure = Figure(figsize=(2.4 * columns, 2.4 * rows + 0.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for index, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        if index >= len(images):
            axes.set_axis_off()
            continue
        axes.imshow(images[index])
        axes.set_xticks([])
        axes.set_yticks([])  # the frame's border stays: a white frame keeps its edges on the white page
        axes.set_title(f"Frame-{index + 1}", fontsize=9)
    figure.suptitle(title, fontsize=9)
    return figure


def plot_metric_bars(
    scores_by_model: dict[str, dict[str, float]], metric_names: list[str], output_path: str | Path
) -> Path:
    """Write a PNG of metric bars, one colour per model (e.g. base vs fine-tuned)."""
    return save_figure(build_metric_bars_figure(scores_by_model, metric_names), output_path)
