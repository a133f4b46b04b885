"""The data: ``meta.json``, every record of its annotation files (read by ``internvl.data.records``, as training
reads them), the videos and images they reference (present, and for videos the first frame decoding), and the
longest training and evaluation samples built by the project's own dataset and collator."""

from __future__ import annotations

import os
import random
from dataclasses import replace

from internvl.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl.tools.checks.context import CheckContext, Checked
from internvl.tools.checks.results import CheckResult, fail, failed, listing, ok, read_json, warn
from internvl.tools.checks.settings import SetupSettings

PREPARE_COMMAND = "python scripts/prepare_internvl3_finetuning.py --input <annotations> --output-dir internvl3_data"


def check_data(context: CheckContext) -> Checked:
    """``meta.json``, every record of its annotation files, the referenced media (all, or a sample), and the
    longest micro-batch built as training builds it. Finds ``answer_tokens``."""
    from internvl.data.dataset import EVAL_SUFFIX, META_KEYS, PATHS_RELATIVE_TO, has_eval_records, load_meta

    s = context.settings
    meta_path = s.meta_path
    if not meta_path.is_file():
        return [fail("meta.json", f"{meta_path} not found", f"{PREPARE_COMMAND} (or set META_PATH)")], context
    raw, error = read_json(meta_path)
    if error:
        return [fail("meta.json", f"not valid JSON: {error}", "fix the JSON syntax at that position")], context
    try:
        specs = load_meta(meta_path)
    except (OSError, ValueError) as error:
        return [fail("meta.json", str(error), f"fix {meta_path}, or write it again with {PREPARE_COMMAND}")], context
    results = []
    known = (*META_KEYS, PATHS_RELATIVE_TO)
    unknown = sorted({f"{name}.{key}" for name, entry in raw.items() for key in entry if key not in known})
    if unknown:
        results.append(warn("meta.json", f"unknown keys are ignored: {', '.join(unknown)}",
                            f"the official keys are {', '.join(META_KEYS)}, and ours {PATHS_RELATIVE_TO}"))
    evaluation = [spec.name for spec in specs if spec.is_eval]
    evaluates = "evaluation on" if s.evaluation_requested else "no evaluation"
    results.append(ok("meta.json", f"{len(specs) - len(evaluation)} training and {len(evaluation)} evaluation "
                                   f"dataset(s): {', '.join(spec.name for spec in specs)}; {evaluates}"))
    if s.evaluation_requested and not has_eval_records(meta_path):
        results.append(fail("meta.json", f"evaluation is requested (--do_eval / --eval_strategy) but {meta_path} "
                                         f"has no dataset whose name ends in {EVAL_SUFFIX!r} with records",
                            f"add a '*{EVAL_SUFFIX}' dataset, or drop --do_eval and pass --eval_strategy no"))
    answer_texts: list[list[str]] = []
    for spec in specs:
        spec_results, spec_answers = _check_annotation(spec, s)
        results += spec_results
        answer_texts += spec_answers
    answer_tokens = None
    if context.tokenizer is not None and answer_texts:
        answer_tokens = _most_answer_tokens(context.tokenizer, answer_texts)
    if failed(results):
        results.append(warn("batch", "not built: fix the data problems above first"))
    else:
        results += _check_batch(context)
    return results, replace(context, answer_tokens=answer_tokens)


def _check_annotation(spec, settings: SetupSettings) -> tuple[list[CheckResult], list[list[str]]]:
    """The results for one annotation file, and the answers of each of its usable records."""
    from internvl.data.records import Record, RecordError, read_records  # internvl.data imports torch

    name = f"data {spec.name}"
    try:
        entries = read_records(spec.annotation)
    except (OSError, ValueError) as error:
        return [fail(name, str(error), f"fix or remove that line of {spec.annotation}, or rerun the prepare "
                                       "script to write the file again")], []
    if not entries:
        return [warn(name, f"{spec.annotation} holds no records; the dataset is left out")], []
    records = [entry for entry in entries if isinstance(entry, Record)]
    answer_texts = [record.answers for record in records]
    problems = [str(entry) for entry in entries if isinstance(entry, RecordError)]
    if problems:
        return [fail(name, f"{len(problems)} of {len(entries)} records are unusable: {listing(problems)}",
                     "fix those lines (the training would skip them)")], answer_texts

    media = [(record, os.path.join(spec.root, p)) for record in records for p in record.media]
    full = settings.full_media_check or len(media) <= settings.media_sample_size
    checked = media if full else random.Random(0).sample(media, settings.media_sample_size)
    missing = [f"{record.path}:{record.line}: {path} ({why})"
               for record, path in checked if (why := _media_problem(path, is_video=record.video is not None))]
    scope = f"all {len(media)}" if full else f"a sample of {len(checked)} of {len(media)}"
    if missing:
        return [fail(name, f"{len(missing)} of {scope} referenced videos/images are unusable: {listing(missing)}",
                     f"fix the paths (relative to root {spec.root}) or the files, or rerun the prepare script if "
                     "the videos changed since; run with --full to check every file")], answer_texts
    return [ok(name, f"{len(entries)} record(s) parse; {scope} referenced videos/images present, the videos' first "
                     "frame decoding")], answer_texts


def _most_answer_tokens(tokenizer, answer_texts: list[list[str]]) -> int:
    """The most supervised tokens in one record: its answers plus one <|im_end|> per answer."""
    flat = [text for answers in answer_texts for text in answers]
    counts = iter(len(ids) for ids in tokenizer(flat, add_special_tokens=False)["input_ids"])
    return max(sum(next(counts) + 1 for _ in answers) for answers in answer_texts)


def num_image_token_for(model_config, data_args) -> int:
    """``<IMG_CONTEXT>`` tokens per tile of the run: the model's, at the run's ``--force_image_size``."""
    patch = model_config.vision_config.patch_size
    return int((data_args.force_image_size // patch) ** 2 * model_config.downsample_ratio**2)


def _check_batch(context: CheckContext) -> list[CheckResult]:
    """Build the longest training micro-batch, and the longest evaluation one when the run evaluates, through the
    project's dataset and collator, as training will."""
    name = "batch"
    tokenizer, model_config = context.tokenizer, context.model_config
    if tokenizer is None or model_config is None:
        return [warn(name, "not built: the model folder did not pass its checks (see Model above)")]
    from internvl.data.collate import InternVLDataCollator
    from internvl.data.dataset import build_datasets

    s, data_args = context.settings, context.settings.data_args
    num_image_token = num_image_token_for(model_config, data_args)
    collate = InternVLDataCollator(pad_token_id=tokenizer.pad_token_id)
    try:
        train, evaluation = build_datasets(
            s.meta_path, tokenizer, num_image_token=num_image_token, **data_args.dataset_options()
        )
        parts = [("training", train)] + ([("evaluation", evaluation)] if evaluation and s.evaluation_requested else [])
        batches = {}
        for split, dataset in parts:
            samples, problem = _longest_samples(dataset, s.per_device_batch_size)
            if problem:
                return [fail(name, f"{split} sample {problem}", f"fix or remove that record ({split} would skip it)")]
            batches[split] = collate(samples)
    except Exception as error:
        return [fail(name, f"the dataset cannot be built: {type(error).__name__}: {error}",
                     "fix the data or the training arguments as the message says")]
    return [_batch_result(name, batch, split, tokenizer, num_image_token, data_args.max_seq_length)
            for split, batch in batches.items()]


def _longest_samples(dataset, count: int) -> tuple[list, str | None]:
    """The ``count`` longest samples by the dataset's own length estimates (the batch most likely to hit the
    limit), or the description of the first that cannot be built."""
    import numpy as np

    candidates = [(length, part, index) for part in dataset.datasets for index, length in enumerate(part.lengths)]
    candidates.sort(key=lambda item: item[0], reverse=True)
    samples = []
    for _, part, index in candidates[:count]:
        try:
            samples.append(part.get_sample(index, np.random.default_rng(0)))
        except Exception as error:
            return [], f"{part.describe(index)} cannot be built: {type(error).__name__}: {error}"
    return samples, None


def _batch_result(name: str, batch: dict, split: str, tokenizer, num_image_token: int,
                  max_seq_length: int) -> CheckResult:
    length = batch["input_ids"].shape[1]
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    context_tokens = int((batch["input_ids"] == context_id).sum())
    real_tiles = int((batch["image_flags"] == 1).sum())
    supervised = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    if length > max_seq_length:
        return fail(name, f"a {split} sample has {length} tokens, above max_seq_length {max_seq_length}",
                    "raise --max_seq_length or lower --max_num_frame")
    if context_tokens != real_tiles * num_image_token:
        return fail(name, f"{context_tokens} {IMG_CONTEXT_TOKEN} tokens for {real_tiles} tiles × "
                          f"{num_image_token} in a {split} batch: the model rejects such a batch",
                    "rebuild the data with the prepare script; check that the records' <image>/<video> "
                    "placeholders match their media")
    if min(supervised) == 0:
        return fail(name, f"a {split} sample has no trained (answer) token left after fitting max_seq_length",
                    "raise --max_seq_length, lower --max_num_frame, or shorten the prompts")
    frames = batch["pixel_values"].shape[0]
    return ok(name, f"{len(supervised)} longest {split} sample(s) built and collated: {length} tokens "
                    f"(max_seq_length {max_seq_length}), {frames} tiles/frames, {sum(supervised)} trained tokens")


def _media_problem(path: str, is_video: bool) -> str | None:
    if path.endswith("/") or os.path.isdir(path):
        if not os.path.isdir(path):
            return "frame folder not found"
        with os.scandir(path) as entries:
            if not any(entries):
                return "frame folder is empty"
    elif not os.path.isfile(path):
        return "not found"
    elif os.path.getsize(path) == 0:
        return "empty file"
    if is_video:
        from internvl.data.video import VideoDecodeError, read_frames_at

        try:
            read_frames_at(path, [0])  # a file replaced or damaged since prepare
        except (VideoDecodeError, ValueError) as error:
            return f"does not decode: {error}"
    return None
