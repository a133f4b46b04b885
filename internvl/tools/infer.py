"""Video (or image) in, text out: the inputs the model was trained on, and batched greedy generation.

A video becomes ``num_frames`` frames sampled at the middle of equal segments (never more frames than the video
holds), one 448-px tile each, announced by ``Frame-i: <image>`` lines, exactly as in training. An image is cut into
dynamic tiles with a thumbnail, as the checkpoint's config says.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from internvl.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from internvl.data.prepare import DEFAULT_PROMPT as DEFAULT_VIDEO_PROMPT
from internvl.data.tiling import build_transform, dynamic_preprocess
from internvl.data.video import is_frame_folder, probe_video, read_video_frames, recorded_frame_count

DEFAULT_NUM_FRAMES = 16
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_IMAGE_PROMPT = "Describe this image in detail."
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and decoding options shared by the inference and evaluation CLIs."""
    parser.add_argument("--model", type=Path, required=True, help="model folder or LoRA training output")
    parser.add_argument("--base-model", type=Path, help="base model of an adapter (default: the adapter's reference)")
    parser.add_argument("--num-frames", type=int, default=DEFAULT_NUM_FRAMES, help="frames sampled per video")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--load-in-4bit", action="store_true", help="load the LLM in 4-bit NF4 (bitsandbytes)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--device", help="e.g. cuda:1 or cpu (default: first GPU if any)")


@dataclass
class VisualInput:
    """The tiles of one video (one per frame) or one image, ``[tiles, 3, S, S]``."""

    pixel_values: torch.Tensor
    is_video: bool

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]

    def question(self, prompt: str) -> str:
        """``prompt`` with the placeholder the model expands (prepended when the prompt has none)."""
        placeholder = VIDEO_PLACEHOLDER if self.is_video else IMAGE_PLACEHOLDER
        return prompt if placeholder in prompt else f"{placeholder}\n{prompt}"


def is_image_file(path: str | Path) -> bool:
    return not is_frame_folder(path) and Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_video(
    path: str | Path,
    num_frames: int,
    image_size: int,
    *,
    decoded_frames: int | None = None,
    decoder: str | None = None,
    fps: float | None = None,
    clip: tuple[float, float] | None = None,
    backend: str = "pyav",
) -> VisualInput:
    """Up to ``num_frames`` frames at segment middles. ``decoded_frames`` / ``decoder`` / ``fps`` are the values
    ``prepare`` records; without them (or when they do not hold for ``backend``, see ``recorded_frame_count``) the
    video is probed first."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    decoded_frames = recorded_frame_count(path, backend, decoded_frames, decoder)
    if decoded_frames is None:
        info = probe_video(path, backend)
        decoded_frames, fps = info.num_frames, info.fps
    frames = read_video_frames(
        path,
        min(num_frames, decoded_frames),
        "middle",
        backend=backend,
        clip=clip,
        num_decoded_frames=decoded_frames,
        fps=fps,
    )
    transform = build_transform(is_train=False, input_size=image_size)
    return VisualInput(torch.stack([transform(frame) for frame in frames]), is_video=True)


def load_image(path: str | Path, image_size: int, max_num_tiles: int, use_thumbnail: bool = True) -> VisualInput:
    """Dynamic tiles of an image (at most ``max_num_tiles``, plus the thumbnail when there are several)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as error:
        raise ValueError(f"{path}: cannot read it as an image ({error})") from error
    transform = build_transform(is_train=False, input_size=image_size)
    tiles = dynamic_preprocess(image, 1, max_num_tiles, image_size, use_thumbnail)
    return VisualInput(torch.stack([transform(tile) for tile in tiles]), is_video=False)


def check_media_kind(path: str | Path, *, video: bool) -> None:
    """``ValueError`` when ``path`` is not the kind of input its flag says (``--video`` / ``--image``)."""
    if is_frame_folder(path) and not video:
        raise ValueError(f"--image {path} is a folder; a folder of frames is a video: pass it with --video")
    if not video and not is_image_file(path):
        raise ValueError(f"--image {path} is not an image file ({', '.join(IMAGE_SUFFIXES)}); for a video use --video")
    if video and is_image_file(path):
        raise ValueError(f"--video {path} is an image file; use --image")


def load_visual_input(path: str | Path, config, num_frames: int = DEFAULT_NUM_FRAMES, **video_metadata) -> VisualInput:
    """A video or an image (by suffix), prepared as the model's ``config`` (an ``InternVLChatConfig``) wants."""
    if not is_frame_folder(path) and not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such video or image file")
    if is_image_file(path):
        max_tiles = config.max_dynamic_patch if config.dynamic_image_size else 1
        return load_image(path, config.image_size, max_tiles, config.use_thumbnail)
    return load_video(path, num_frames, config.image_size, **video_metadata)


def generation_config(
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
) -> dict:
    """Greedy decoding unless ``do_sample``."""
    config = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": 1}
    if do_sample:
        config.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None})
    return config


@contextmanager
def _system_message(model, message: str | None):
    """Use ``message`` as the system prompt for the calls inside (None keeps the model's own)."""
    if message is None:
        yield
        return
    saved = model.system_message
    model.system_message = message
    try:
        yield
    finally:
        model.system_message = saved


def generate_answers(
    model,
    tokenizer,
    visuals: list[VisualInput],
    prompts: list[str],
    generation_kwargs: dict,
    system_message: str | None = None,
) -> list[str]:
    """One answer per (visual, prompt) pair, generated as one left-padded batch."""
    dtype = next(model.vision_model.parameters()).dtype
    pixel_values = torch.cat([visual.pixel_values for visual in visuals]).to(dtype)
    questions = [visual.question(prompt) for visual, prompt in zip(visuals, prompts)]
    with _system_message(model, system_message), torch.inference_mode():
        return model.batch_chat(
            tokenizer,
            pixel_values,
            questions,
            generation_config=generation_kwargs,
            num_patches_list=[visual.num_tiles for visual in visuals],
        )


def summarize(
    model,
    tokenizer,
    path: str | Path,
    prompt: str | None = None,
    *,
    num_frames: int = DEFAULT_NUM_FRAMES,
    generation_kwargs: dict | None = None,
) -> str:
    """The model's answer to ``prompt`` (default: the training summary prompt) about one video or image."""
    visual = load_visual_input(path, model.config, num_frames)
    if prompt is None:
        prompt = DEFAULT_VIDEO_PROMPT if visual.is_video else DEFAULT_IMAGE_PROMPT
    return generate_answers(model, tokenizer, [visual], [prompt], generation_kwargs or generation_config())[0]
