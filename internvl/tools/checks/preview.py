"""The first training sample as the model sees it (the setup check's ``--preview``).

The sample is built by the training's own dataset code with the run's settings: its tokens are decoded into the
rendered prompt, in which each run of ``<IMG_CONTEXT>`` tokens is shortened to one ``<IMG_CONTEXT x N>`` and the
supervised tokens (those with a label, the ones the loss trains) are put between ``[[`` and ``]]``; the token counts
follow, and its frames, un-normalized from the very tensors the vision tower gets, go to a contact sheet PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from internvl.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl.data.tiling import NORMALIZATIONS

SUPERVISED_START, SUPERVISED_END = "[[", "]]"
CONTACT_SHEET_NAME = "first_sample_frames.png"
# The setup-check sections whose failures leave nothing to preview.
PREVIEW_NEEDS = ("Model", "Data")


@dataclass
class SamplePreview:
    source: str  # "video_summary_dataset_train annotation.jsonl:1 (video clip.mp4)"
    text: str  # the rendered prompt, supervised spans marked
    num_tokens: int
    num_image_tokens: int
    num_supervised_tokens: int
    num_frames: int
    max_seq_length: int
    contact_sheet: Path | None = None

    def format(self) -> str:
        text_tokens = self.num_tokens - self.num_image_tokens
        per_frame = self.num_image_tokens // self.num_frames if self.num_frames else 0
        lines = [
            f"First training sample: {self.source}",
            f"  {self.num_tokens} tokens of max_seq_length {self.max_seq_length}: {self.num_image_tokens} image tokens "
            f"({self.num_frames} frames x {per_frame}), {text_tokens} text tokens, of which "
            f"{self.num_supervised_tokens} supervised (between {SUPERVISED_START} {SUPERVISED_END})",
        ]
        if self.contact_sheet is not None:
            lines.append(f"  frames as the vision tower gets them: {self.contact_sheet}")
        lines += ["", self.text]
        return "\n".join(lines)


def render_tokens(input_ids: torch.Tensor, labels: torch.Tensor, tokenizer) -> str:
    """The decoded sample: runs of ``<IMG_CONTEXT>`` shortened, supervised runs between the markers."""
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    ids, supervised = input_ids.tolist(), (labels != IGNORE_INDEX).tolist()
    pieces, start = [], 0
    while start < len(ids):
        kind = (ids[start] == context_id, supervised[start])
        end = start
        while end < len(ids) and (ids[end] == context_id, supervised[end]) == kind:
            end += 1
        is_context, is_supervised = kind
        text = f"{IMG_CONTEXT_TOKEN[:-1]} x {end - start}>" if is_context else tokenizer.decode(ids[start:end])
        pieces.append(f"{SUPERVISED_START}{text}{SUPERVISED_END}" if is_supervised else text)
        start = end
    return "".join(pieces)


def frames_as_images(pixel_values: torch.Tensor, normalize_type: str) -> list:
    """``[T, 3, S, S]`` normalized tiles -> T ``uint8`` HxWx3 arrays (what the tiles show)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS[normalize_type])
    pixels = (pixel_values.float() * std + mean).clamp(0, 1)
    return [(frame.permute(1, 2, 0).numpy() * 255).round().astype("uint8") for frame in pixels]


def preview_first_sample(
    meta_path: str | Path, tokenizer, *, num_image_token: int, dataset_options: dict, contact_sheet: Path | None
) -> SamplePreview:
    """Build the first training sample as training does and describe it; writes ``contact_sheet`` when given."""
    from internvl.data.dataset import build_datasets
    from internvl.tools.plots import build_contact_sheet_figure, save_figure

    train, _ = build_datasets(meta_path, tokenizer, num_image_token=num_image_token, **dataset_options)
    sample = train[0]
    source = train.datasets[0].describe(0)
    flags = sample["image_flags"]
    num_frames = int(flags.sum())
    preview = SamplePreview(
        source=source,
        text=render_tokens(sample["input_ids"], sample["labels"], tokenizer),
        num_tokens=len(sample["input_ids"]),
        num_image_tokens=int((sample["input_ids"] == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)).sum()),
        num_supervised_tokens=int((sample["labels"] != IGNORE_INDEX).sum()),
        num_frames=num_frames,
        max_seq_length=dataset_options.get("max_seq_length", 0),
    )
    if contact_sheet is not None and num_frames:
        images = frames_as_images(sample["pixel_values"][flags == 1], dataset_options.get("normalize_type", "imagenet"))
        figure = build_contact_sheet_figure(images, title=f"{source}: {num_frames} tiles as the vision tower gets them")
        preview.contact_sheet = save_figure(figure, contact_sheet)
    return preview


def preview_for_settings(settings, contact_sheet: Path | None) -> SamplePreview:
    """The preview for the run the setup check is about (a ``SetupSettings``): its model's tokenizer and image
    tokens, its data and data arguments."""
    from internvl.model.configuration import InternVLChatConfig
    from internvl.model.loading import load_tokenizer
    from internvl.tools.checks.data import num_image_token_for

    config = InternVLChatConfig.from_pretrained(settings.model_path)
    return preview_first_sample(
        settings.meta_path,
        load_tokenizer(settings.model_path, use_fast=settings.model_args.use_fast_tokenizer),
        num_image_token=num_image_token_for(config, settings.data_args),
        dataset_options=settings.data_args.dataset_options(),
        contact_sheet=contact_sheet,
    )


def preview_after_checks(report, settings, contact_sheet: Path | None) -> str:
    """The setup check's ``--preview``: the preview when the model and data checks passed, else why there is none."""
    blocking = [r.name for r in report.results if r.status.name == "FAIL" and r.section in PREVIEW_NEEDS]
    if blocking:
        return f"No preview of the first sample: fix {', '.join(blocking)} first (see above)."
    try:
        return preview_for_settings(settings, contact_sheet).format()
    except Exception as error:  # the data check builds a batch the same way; this names what still went wrong
        return f"No preview of the first sample: {type(error).__name__}: {error}"
