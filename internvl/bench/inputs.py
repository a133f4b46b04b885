"""What a benchmark run trains on: a random-weight checkpoint of a model config and synthetic frame-folder videos."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from internvl.data.dataset import META_FOLDER, MetaEntry, write_meta
from internvl.data.files import atomic_directory

TINY_MODEL = "tiny"

VIDEO_QUESTION = "<video>\nSummarize what happens in this video."
# One fixed answer by default: every sample then has the same length, so tokens per step follow from the batch shape.
VIDEO_SUMMARY = (
    "A red circle starts in the top left corner of a white frame and moves slowly to the bottom right corner, "
    "while a blue square in the centre grows larger and then turns green. Near the end a yellow triangle rotates "
    "once and a black line crosses the screen from left to right. Nothing else happens and the background stays "
    "white for the whole video."
)


def prepare_checkpoint(model_config: str | Path, work_dir: str | Path) -> Path:
    """A checkpoint folder for ``model_config`` (a config.json path, or ``"tiny"``) with random weights and the tiny
    model's tokenizer, written once into ``work_dir`` and reused afterwards.

    An 8B checkpoint is built on the first GPU when there is one, in a child process, so this process never holds
    GPU memory while the benchmark runs.
    """
    work_dir = Path(work_dir)
    if str(model_config) == TINY_MODEL:
        target = work_dir / "checkpoint-tiny"
    else:
        text = Path(model_config).read_text(encoding="utf-8")
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        target = work_dir / f"checkpoint-{Path(model_config).stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    context = torch.multiprocessing.get_context("spawn")
    writer = context.Process(target=write_random_checkpoint, args=(str(model_config), str(target)))
    writer.start()
    writer.join()
    if writer.exitcode != 0:
        raise RuntimeError(f"writing the random checkpoint {target} failed (exit code {writer.exitcode})")
    return target


def write_random_checkpoint(model_config: str, output_dir: str) -> None:
    """Random-init ``InternVLChatModel`` weights (bf16, safetensors) plus the tiny tokenizer, written atomically.

    The tokenizer has fewer tokens than the model's vocabulary, which loading allows; the token ids of the
    synthetic samples then use the first rows of the embedding only, which costs the same compute.
    """
    from internvl.model.configuration import InternVLChatConfig
    from internvl.model.internvl_chat import InternVLChatModel
    from internvl.model.tiny import build_tiny_tokenizer, create_tiny_model

    if model_config == TINY_MODEL:
        create_tiny_model(output_dir)
        return
    with open(model_config, encoding="utf-8") as f:
        config = InternVLChatConfig(**json.load(f))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = InternVLChatModel(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        build_tiny_tokenizer().save_pretrained(staging)


def summaries_of_lengths(tokenizer, lengths: list[int]) -> list[str]:
    """Summaries of about ``lengths[i]`` tokens each: the start of ``VIDEO_SUMMARY`` repeated as often as needed."""
    ids = tokenizer(VIDEO_SUMMARY + " ", add_special_tokens=False)["input_ids"]
    ids = ids * (max(lengths) // len(ids) + 1)
    return [tokenizer.decode(ids[:n]).strip() for n in lengths]


def prepare_videos(
    output_dir: str | Path,
    *,
    num_frames: int,
    num_samples: int,
    num_videos: int = 8,
    summary_tokens: tuple[int, int] | None = None,
    tokenizer=None,
) -> Path:
    """``num_videos`` frame-folder clips of ``num_frames`` 448-px JPEG frames and ``num_samples`` summarization
    records cycling over them; returns the ``meta.json`` path. Rewritten on every call (it takes a second).

    Every record has the same summary, unless ``summary_tokens`` = ``(fewest, most)``: then summary lengths (in
    ``tokenizer`` tokens) are spread evenly over that range, in a shuffled order (fixed seed)."""
    from internvl.data.demo import COLOURS, MOTIONS, SHAPES, MovingShape, render_frames

    summaries = [VIDEO_SUMMARY] * num_samples
    if summary_tokens is not None:
        fewest, most = summary_tokens
        lengths = [fewest + (most - fewest) * i // max(num_samples - 1, 1) for i in range(num_samples)]
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(0)).tolist()
        summaries = summaries_of_lengths(tokenizer, [lengths[i] for i in order])

    output_dir = Path(output_dir)
    colours, motions = list(COLOURS), list(MOTIONS)
    with atomic_directory(output_dir) as staging:
        for index in range(num_videos):
            item = MovingShape(
                SHAPES[index % len(SHAPES)], colours[index % len(colours)], motions[index % len(motions)]
            )
            clip_dir = staging / f"clip_{index:03d}"
            clip_dir.mkdir()
            for frame_index, frame in enumerate(render_frames([item], frames=num_frames, size=448)):
                frame.save(clip_dir / f"frame_{frame_index:05d}.jpg", quality=90)
        records = [
            {
                "id": i,
                "video": f"clip_{i % num_videos:03d}/",
                "conversations": [
                    {"from": "human", "value": VIDEO_QUESTION},
                    {"from": "gpt", "value": summaries[i]},
                ],
            }
            for i in range(num_samples)
        ]
        (staging / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        entry = MetaEntry(root=".", annotation="train.jsonl", length=num_samples, paths_relative_to=META_FOLDER)
        write_meta(staging / "meta.json", {"benchmark_videos": entry})
    return output_dir / "meta.json"
