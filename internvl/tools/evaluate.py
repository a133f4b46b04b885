"""Evaluate video summaries: generate for an evaluation set, score with standard metrics, write a report.

Records come from the ``_val`` entries of a ``meta.json`` or from any JSONL in the official format; each needs a
video (or image), one ``human`` turn (the prompt, used as is) and one ``gpt`` turn (the reference), optionally
after a ``system`` turn. Frames are sampled at segment middles, as for evaluation during training.

Generation is resumable: predictions are appended to ``predictions*.jsonl`` after every batch, a rerun reuses the
ids already there (and says so) and the metrics are always recomputed from the whole file. The reuse is keyed to
the weights (a fingerprint of the adapter and model files) and the generation settings: when either changed since
the predictions were generated (a retrained adapter in the same folder), the run starts over, keeping the old file
as ``predictions*.previous.jsonl``. A video or image that cannot be read is recorded as a failed prediction (with
the error), reported, and retried on the next run; the script then exits with code 1. Output folder:

- ``predictions.jsonl`` (and ``predictions_base.jsonl`` with a comparison model): ``id``, ``prediction``,
  ``reference``, ``prompt``, ``media``, ``source``, or ``error`` instead of ``prediction``;
- ``metrics.json``: the scores of every evaluated model, the data and the generation settings;
- ``report.md`` and ``metric_bars.png``: the scores side by side and a few examples;
- ``run_settings.json``: what produced the predictions (model, weights fingerprint, generation settings), checked on
  resume so runs are never mixed.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from internvl.data.dataset import EVAL_SUFFIX, load_meta
from internvl.data.files import atomic_write_text, unwritable_folder_reason
from internvl.data.records import Record, RecordError, Role, read_records
from internvl.data.video import VideoDecodeError
from internvl.model.adapters import ModelSource, load_model_for_inference, resolve_model_source
from internvl.tools.infer import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_FRAMES,
    DTYPES,
    generate_answers,
    generation_config,
    load_visual_input,
)
from internvl.tools.metrics import METRIC_NAMES, METRIC_TITLES, compute_metrics
from internvl.tools.plots import plot_metric_bars

logger = logging.getLogger(__name__)

MODEL_LABEL, FINETUNED_LABEL, BASE_LABEL = "model", "fine-tuned", "base"
PREDICTIONS_NAME = "predictions.jsonl"
BASE_PREDICTIONS_NAME = "predictions_base.jsonl"
METRICS_NAME = "metrics.json"
REPORT_NAME = "report.md"
METRIC_BARS_NAME = "metric_bars.png"
RUN_SETTINGS_NAME = "run_settings.json"
NUM_REPORT_EXAMPLES = 3
# Errors reading one record's media: recorded as a failed prediction instead of ending the run.
MEDIA_ERRORS = (VideoDecodeError, FileNotFoundError, ValueError, OSError)
# Weight files up to this size are fingerprinted by their content; larger ones (full-model shards) by their size,
# modification time and first and last MiB, which a rewrite changes too, without reading gigabytes on every run.
FULL_HASH_BYTES = 256 * 2**20
EDGE_BYTES = 2**20


# ---------------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class EvalRecord:
    id: str
    source: str  # "annotation.jsonl:12"
    media: str  # video file, frame folder or image, as a path
    prompt: str
    reference: str
    system_message: str | None = None
    video_metadata: dict = field(default_factory=dict)  # decoded_frames, decoder, fps, clip (from prepare)


def _eval_record(record: Record | RecordError, root: Path) -> EvalRecord:
    if isinstance(record, RecordError):
        raise record
    where = record.source
    turns = record.conversations
    system_message = None
    if turns[0].role is Role.SYSTEM:
        system_message, turns = turns[0].value, turns[1:]
    if [turn.role for turn in turns] != [Role.HUMAN, Role.GPT]:
        raise ValueError(
            f"{where}: evaluation needs one 'human' turn (the prompt) followed by one 'gpt' turn (the reference), "
            f"optionally after a 'system' turn; found roles {[turn.role.value for turn in record.conversations]}"
        )
    if len(record.media) != 1:
        raise ValueError(
            f"{where}: evaluation needs a 'video' (or a single 'image') path per record, got "
            f"{list(record.media)}; text-only and multi-image records cannot be summarized"
        )
    metadata = {
        "decoded_frames": record.decoded_frames,
        "decoder": record.decoder,
        "fps": record.fps,
        "clip": record.clip,
    }
    return EvalRecord(
        id=record.id or where,
        source=where,
        media=os.path.join(root, record.media[0]),  # os.path.join keeps a frame folder's trailing "/"
        prompt=turns[0].value,
        reference=turns[1].value,
        system_message=system_message,
        video_metadata={k: v for k, v in metadata.items() if v is not None} if record.video else {},
    )


def load_eval_records(
    *, meta_path: str | Path | None = None, jsonl: str | Path | None = None, root: str | Path | None = None
) -> tuple[list[EvalRecord], str]:
    """The evaluation records and a description of where they come from.

    Either ``meta_path`` (its entries ending in ``_val``) or ``jsonl`` with ``root`` (default: the JSONL's folder).
    """
    if (meta_path is None) == (jsonl is None):
        raise ValueError("give exactly one of --meta-path or --jsonl")
    if meta_path is not None:
        specs = [spec for spec in load_meta(meta_path) if spec.is_eval]
        if not specs:
            raise ValueError(
                f"{meta_path} has no evaluation entry (a dataset whose name ends in {EVAL_SUFFIX!r}); prepare the "
                "data with a validation split, or pass --jsonl with --root"
            )
        sources = [(spec.annotation, spec.root) for spec in specs]
        description = f"{meta_path} ({', '.join(spec.name for spec in specs)})"
    else:
        jsonl = Path(jsonl)
        if not jsonl.is_file():
            raise FileNotFoundError(f"JSONL file {jsonl} not found")
        sources = [(jsonl, Path(root) if root is not None else jsonl.parent)]
        description = str(jsonl)
    records = [_eval_record(record, source_root) for path, source_root in sources for record in read_records(path)]
    if not records:
        raise ValueError(f"{description} holds no records to evaluate")
    seen: dict[str, str] = {}
    for record in records:
        if record.id in seen:
            raise ValueError(
                f"id {record.id!r} appears twice ({seen[record.id]} and {record.source}); evaluation needs unique ids "
                "to resume and to pair predictions with references"
            )
        seen[record.id] = record.source
    return records, description


# ---------------------------------------------------------------------------------------------------------------
# Predictions file


def read_predictions(path: Path, valid_ids: set[str]) -> dict[str, dict]:
    """The latest line per id of a predictions file (a retried failure overrides its error line).

    A last line cut short by an interrupted run is removed (its record is generated again); any other unreadable
    line, or an id outside ``valid_ids``, is an error.
    """
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    entries: dict[str, dict] = {}
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                logger.warning("%s:%d: incomplete last line of an interrupted run removed; redoing it", path, number)
                atomic_write_text(path, "".join(lines[:-1]))
                break
            raise ValueError(f"{path}:{number}: not valid JSON; fix or delete the line to resume") from None
        if entry.get("id") not in valid_ids:
            raise ValueError(
                f"{path}:{number}: id {entry.get('id')!r} is not in this evaluation set; the folder holds another "
                "run's predictions: choose a new --output-dir"
            )
        entries[entry["id"]] = entry
    return entries


def _append_lines(path: Path, entries: list[dict]) -> None:
    """Append whole lines in one write and sync, so an interruption loses at most this batch."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries))
        f.flush()
        os.fsync(f.fileno())


def batches_of_records(records: list[EvalRecord], batch_size: int):
    """Consecutive records in batches of at most ``batch_size`` sharing one system message."""
    batch: list[EvalRecord] = []
    for record in records:
        if batch and (len(batch) == batch_size or record.system_message != batch[0].system_message):
            yield batch
            batch = []
        batch.append(record)
    if batch:
        yield batch


def generate_predictions(
    model,
    tokenizer,
    records: list[EvalRecord],
    predictions_path: Path,
    *,
    batch_size: int,
    num_frames: int,
    generation_kwargs: dict,
    description: str = "generating",
) -> None:
    """Generate for ``records`` batch by batch, appending each batch's lines to ``predictions_path``."""
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    with tqdm(total=len(records), desc=description, unit="video") as progress:
        for batch in batches_of_records(records, batch_size):
            lines = predict_batch(model, tokenizer, batch, num_frames=num_frames, generation_kwargs=generation_kwargs)
            _append_lines(predictions_path, lines)
            failures += sum("error" in line for line in lines)
            progress.update(len(batch))
            if failures:
                progress.set_postfix(failed=failures)


def predict_batch(
    model, tokenizer, batch: list[EvalRecord], *, num_frames: int, generation_kwargs: dict
) -> list[dict]:
    """One predictions-file line per record of ``batch`` (records sharing one system message): its ``prediction``,
    or the ``error`` that kept its media from loading. The model generates once for the batch, or not at all when no
    record's media loads."""
    lines, ready, visuals = [], [], []
    for record in batch:
        line = {"id": record.id, "source": record.source, "media": record.media, "prompt": record.prompt,
                "reference": record.reference}  # fmt: skip
        try:
            visuals.append(load_visual_input(record.media, model.config, num_frames, **record.video_metadata))
            ready.append(line)
        except MEDIA_ERRORS as error:
            line["error"] = f"{type(error).__name__}: {error}"
        lines.append(line)
    if ready:
        prompts = [line["prompt"] for line in ready]
        answers = generate_answers(
            model, tokenizer, visuals, prompts, generation_kwargs, system_message=batch[0].system_message
        )
        for line, answer in zip(ready, answers):
            line["prediction"] = answer
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Evaluating models


@dataclass
class EvaluationConfig:
    """Everything ``run_evaluation`` needs (the CLI flags of scripts/evaluate_internvl3.py)."""

    model: Path
    output_dir: Path
    meta_path: Path | None = None
    jsonl: Path | None = None
    root: Path | None = None
    base_model: Path | None = None
    compare: Path | None = None
    batch_size: int = 4
    num_frames: int = DEFAULT_NUM_FRAMES
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    load_in_4bit: bool = False
    dtype: str = "bfloat16"
    device: str | None = None

    def generation_kwargs(self) -> dict:
        return generation_config(self.max_new_tokens, self.do_sample, self.temperature, self.top_p)

    def models(self) -> dict[str, tuple[Path, Path | None, str]]:
        """label -> (model path, its base model, predictions file name)."""
        if self.compare is None:
            return {MODEL_LABEL: (self.model, self.base_model, PREDICTIONS_NAME)}
        return {
            BASE_LABEL: (self.compare, None, BASE_PREDICTIONS_NAME),
            FINETUNED_LABEL: (self.model, self.base_model, PREDICTIONS_NAME),
        }

    def run_settings(self) -> dict:
        """What decides the predictions (weights included); a resumed run must match it."""
        shared = {
            "num_frames": self.num_frames,
            "frame_sampling": "middle",
            "generation": self.generation_kwargs(),
            "load_in_4bit": self.load_in_4bit,
            "dtype": self.dtype,
        }
        return {
            label: {
                "model": str(path),
                "base_model": str(base) if base else None,
                "weights": weights_fingerprint(resolve_model_source(path, base)),
                **shared,
            }
            for label, (path, base, _) in self.models().items()
        }


def weights_fingerprint(source: ModelSource) -> str:
    """A hash of the files that decide the loaded weights (see ``FULL_HASH_BYTES``)."""
    digest = hashlib.sha256()
    for path in source.weight_files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}:".encode())
        with open(path, "rb") as f:
            if size <= FULL_HASH_BYTES:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            else:
                digest.update(f"{path.stat().st_mtime_ns}:".encode() + f.read(EDGE_BYTES))
                f.seek(-EDGE_BYTES, os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()


def _start_over_if_stale(config: EvaluationConfig, settings: dict) -> None:
    """Move aside the predictions that other weights or settings produced (or that no settings file vouches for)."""
    previous_path = config.output_dir / RUN_SETTINGS_NAME
    try:
        previous = json.loads(previous_path.read_text(encoding="utf-8")) if previous_path.is_file() else {}
    except ValueError:
        previous = {}
    for label, (_, _, file_name) in config.models().items():
        predictions = config.output_dir / file_name
        if not predictions.is_file() or predictions.stat().st_size == 0:
            continue
        before = previous.get(label) if isinstance(previous, dict) else None
        if not isinstance(before, dict):
            reason = f"no {RUN_SETTINGS_NAME} records what produced them"
        else:
            changed = sorted(key for key in settings[label] if before.get(key) != settings[label][key])
            if not changed:
                continue
            reason = f"they were generated with other {', '.join(changed)}"
        kept = predictions.with_suffix(".previous.jsonl")
        os.replace(predictions, kept)
        logger.warning("[%s] not reusing %s: %s; starting over (the old predictions are now %s)", label,
                       predictions, reason, kept.name)


def _torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_model(
    config: EvaluationConfig, label: str, records: list[EvalRecord]
) -> tuple[dict, dict[str, dict]]:
    """Generate what is missing for one model, then score all its predictions. Returns (summary, predictions)."""
    path, base_model, file_name = config.models()[label]
    source = resolve_model_source(path, base_model)
    predictions_path = config.output_dir / file_name
    ids = {record.id for record in records}
    done = read_predictions(predictions_path, ids)
    pending = [record for record in records if "prediction" not in done.get(record.id, {})]
    if len(pending) < len(records):
        logger.info("[%s] reusing %d predictions from %s (same weights and generation settings)", label,
                    len(records) - len(pending), predictions_path)
    if pending:
        logger.info("[%s] generating %d of %d records", label, len(pending), len(records))
        model, tokenizer, _ = load_model_for_inference(
            path,
            base_model=base_model,
            load_in_4bit=config.load_in_4bit,
            torch_dtype=_torch_dtype(config.dtype),
            device=config.device,
        )
        logger.info("[%s] model: %s", label, source.describe())
        generate_predictions(
            model,
            tokenizer,
            pending,
            predictions_path,
            batch_size=config.batch_size,
            num_frames=config.num_frames,
            generation_kwargs=config.generation_kwargs(),
            description=label,
        )
        _free(model)
        done = read_predictions(predictions_path, ids)

    scored = [record for record in records if "prediction" in done[record.id]]
    failed = [done[record.id] for record in records if "prediction" not in done[record.id]]
    summary = {
        "model": str(path),
        "base_model": str(source.base_model) if source.base_model else None,
        "predictions": file_name,
        "num_records": len(records),
        "num_scored": len(scored),
        "num_failed": len(failed),
        "failures": [{"id": entry["id"], "error": entry["error"]} for entry in failed],
    }
    if scored:
        result = compute_metrics([done[r.id]["prediction"] for r in scored], [r.reference for r in scored])
        summary.update(scores=result.scores, skipped_metrics=result.skipped)
    else:
        summary.update(scores={}, skipped_metrics={name: "no record could be evaluated" for name in METRIC_NAMES})
    return summary, done


def _format_table(summaries: dict[str, dict]) -> list[str]:
    labels = list(summaries)
    header = ["metric", *labels] + (["Δ"] if labels == [BASE_LABEL, FINETUNED_LABEL] else [])
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in METRIC_NAMES:
        values = [summaries[label]["scores"].get(metric) for label in labels]
        if all(value is None for value in values):
            continue
        cells = [f"{value:.2f}" if value is not None else "n/a" for value in values]
        if len(header) > len(labels) + 1:
            cells.append(f"{values[1] - values[0]:+.2f}" if None not in values else "n/a")
        rows.append(f"| {METRIC_TITLES[metric]} | " + " | ".join(cells) + " |")
    return rows


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(empty)"


def write_report(
    path: Path,
    config: EvaluationConfig,
    data_description: str,
    records: list[EvalRecord],
    summaries: dict[str, dict],
    predictions: dict[str, dict[str, dict]],
    bars_name: str | None,
) -> None:
    generation = config.generation_kwargs()
    decoding = "greedy" if not generation["do_sample"] else "sampling"
    lines = [
        "# Video summarization evaluation",
        "",
        f"- data: {data_description}, {len(records)} records",
        f"- frames: {config.num_frames} per video, sampled at segment middles",
        f"- generation: {decoding}, at most {generation['max_new_tokens']} new tokens; "
        f"{'4-bit NF4' if config.load_in_4bit else config.dtype} weights",
    ]
    for label, summary in summaries.items():
        base = f" on {summary['base_model']}" if summary["base_model"] else ""
        lines.append(
            f"- {label}: {summary['model']}{base}: {summary['num_scored']} scored, {summary['num_failed']} failed"
        )
    lines += ["", "Scores are on a 0-100 scale (CIDEr x 100); see docs/EVALUATION.md.", "", *_format_table(summaries)]
    skipped = {(name, reason) for s in summaries.values() for name, reason in s["skipped_metrics"].items()}
    for name, reason in sorted(skipped):
        lines.append(f"\n{METRIC_TITLES[name]} skipped: {reason}.")
    if bars_name:
        lines += ["", f"![metrics]({bars_name})"]
    for label, summary in summaries.items():
        if summary["failures"]:
            lines += ["", f"## Failed records ({label})", ""]
            lines += [f"- `{f['id']}`: {f['error']}" for f in summary["failures"]]
    lines += ["", "## Examples", ""]
    for record in records[:NUM_REPORT_EXAMPLES]:
        lines.append(f"**{record.id}**")
        lines.append("")
        lines.append(f"- reference: {_one_line(record.reference)}")
        for label in summaries:
            entry = predictions[label].get(record.id, {})
            lines.append(f"- {label}: {_one_line(entry['prediction']) if 'prediction' in entry else '(failed)'}")
        lines.append("")
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")


def run_evaluation(config: EvaluationConfig) -> dict:
    """Evaluate ``config.model`` (and ``config.compare``) and write the output folder; returns ``metrics.json``."""
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {config.batch_size}")
    unwritable = unwritable_folder_reason(config.output_dir)
    if unwritable:
        raise ValueError(f"--output-dir {config.output_dir} {unwritable}; give a writable folder")
    records, data_description = load_eval_records(meta_path=config.meta_path, jsonl=config.jsonl, root=config.root)
    settings = config.run_settings()
    config.output_dir.mkdir(parents=True, exist_ok=True)
    _start_over_if_stale(config, settings)
    atomic_write_text(config.output_dir / RUN_SETTINGS_NAME, json.dumps(settings, indent=2) + "\n")

    summaries, predictions = {}, {}
    for label in config.models():
        summaries[label], predictions[label] = evaluate_model(config, label, records)

    scores = {label: summary["scores"] for label, summary in summaries.items() if summary["scores"]}
    bars_name = None
    if scores:
        plot_metric_bars(scores, list(METRIC_NAMES), config.output_dir / METRIC_BARS_NAME)
        bars_name = METRIC_BARS_NAME
    write_report(
        config.output_dir / REPORT_NAME, config, data_description, records, summaries, predictions, bars_name
    )
    metrics = {
        "data": {"source": data_description, "num_records": len(records)},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "models": summaries,
    }
    atomic_write_text(config.output_dir / METRICS_NAME, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics
