"""Generation metrics during training (``--eval_generate True``).

At each evaluation the model summarizes the validation records, as ``internvl.tools.evaluate`` does after training
(frames at segment middles, greedy decoding), and the evaluator's metrics score the summaries: ROUGE-1/2/L,
BLEU-4, CIDEr (and METEOR with WordNet). The trainer adds them to the evaluation's metrics as ``eval_rougeL`` and so
on, so they reach TensorBoard / W&B, ``training_log.txt``, ``--metric_for_best_model rougeL`` and early stopping.
Each evaluation's summaries are written to ``eval_generations/step-N.jsonl``.

Every process generates for its share of the records. Under ZeRO-3 each forward pass gathers the partitioned
weights from all processes, so every process runs the same number of generation calls: one with fewer batches
(or a batch whose media all failed to load) generates for a one-frame blank video and discards it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from internvl.data.files import atomic_write_text
from internvl.tools.evaluate import EvalRecord, batches_of_records, predict_batch
from internvl.tools.infer import DEFAULT_NUM_FRAMES, VisualInput, generate_answers
from internvl.tools.metrics import compute_metrics

logger = logging.getLogger(__name__)

GENERATIONS_DIR = "eval_generations"


def default_num_frames(min_num_frame: int, max_num_frame: int) -> int:
    """The evaluator's frame count, kept within the training's ``--min_num_frame`` / ``--max_num_frame``."""
    return min(max(DEFAULT_NUM_FRAMES, min_num_frame), max_num_frame)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _most_over_processes(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


@dataclass
class GenerationEvaluation:
    """What to generate at each evaluation, and how."""

    records: list[EvalRecord]
    num_frames: int
    generation_kwargs: dict
    batch_size: int

    def run(self, model, tokenizer) -> tuple[dict[str, float], list[dict]]:
        """``({metric: score}, one line per record in record order)``; call it on every process."""
        rank, world_size = _distributed()
        batches = list(batches_of_records(self.records[rank::world_size], self.batch_size))
        device = model.get_input_embeddings().weight.device
        rounds = _most_over_processes(len(batches), device)
        lines = []
        for index in range(rounds):
            batch = batches[index] if index < len(batches) else []
            batch_lines = predict_batch(model, tokenizer, batch, num_frames=self.num_frames,
                                        generation_kwargs=self.generation_kwargs) if batch else []  # fmt: skip
            if world_size > 1 and not any("prediction" in line for line in batch_lines):
                self._generate_in_step(model, tokenizer)
            lines += batch_lines
        if world_size > 1:
            gathered: list[list[dict] | None] = [None] * world_size
            dist.all_gather_object(gathered, lines)
            lines = [line for part in gathered for line in part]
        order = {record.id: i for i, record in enumerate(self.records)}
        lines.sort(key=lambda line: order[line["id"]])
        scored = [line for line in lines if "prediction" in line]
        failed = len(lines) - len(scored)
        if failed:
            logger.warning("eval_generate: %d of %d validation records could not be read (see %s)", failed,
                           len(lines), GENERATIONS_DIR)
        if not scored:
            raise RuntimeError(
                f"--eval_generate: none of the {len(lines)} validation records could be read; the first error: "
                f"{lines[0]['error'] if lines else 'no records'}"
            )
        result = compute_metrics([line["prediction"] for line in scored], [line["reference"] for line in scored])
        return result.scores, lines

    def _generate_in_step(self, model, tokenizer) -> None:
        """A throwaway generation call that keeps this process in step with the others (see the module docstring)."""
        size = model.config.image_size
        blank = VisualInput(torch.zeros(1, 3, size, size), is_video=True)
        generate_answers(model, tokenizer, [blank], [""], {**self.generation_kwargs, "max_new_tokens": 1})


def write_generations(output_dir: str | Path, step: int, lines: list[dict], scores: dict[str, float]) -> Path:
    """``eval_generations/step-N.jsonl``: the scores, then one line per record."""
    path = Path(output_dir) / GENERATIONS_DIR / f"step-{step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"step": step, "scores": scores}] + [
        {key: line[key] for key in ("id", "prediction", "error", "reference") if key in line} for line in lines
    ]
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path
