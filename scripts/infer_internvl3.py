"""Summarize a video (or describe an image) with an InternVL model: base, merged, or a LoRA training output.

    python scripts/infer_internvl3.py --model work_dirs/internvl3_8b_lora --video clip.mp4 --load-in-4bit
    python scripts/infer_internvl3.py --model models/InternVL3-8B --image photo.jpg --prompt "What is shown?"

Videos: --num-frames frames at the middles of equal segments, one 448-px tile each. Images: dynamic tiles plus a
thumbnail. Without --prompt, videos get the prompt the training data uses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl.data.video import VideoDecodeError  # noqa: E402
from internvl.model.adapters import load_model_for_inference  # noqa: E402
from internvl.tools.infer import (  # noqa: E402
    DTYPES,
    add_model_arguments,
    check_media_kind,
    generation_config,
    summarize,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    media = parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", type=Path, help="video file, GIF, or folder of <name>_<index>.jpg frames")
    media.add_argument("--image", type=Path, help="image file")
    parser.add_argument("--prompt", help="question or instruction (default: the training summary prompt)")
    args = parser.parse_args()
    media_path = args.video or args.image
    if not media_path.exists():  # checked before minutes of model loading
        sys.exit(f"error: {media_path}: no such file or folder")
    try:
        check_media_kind(media_path, video=args.video is not None)
    except ValueError as error:
        sys.exit(f"error: {error}")

    try:
        model, tokenizer, source = load_model_for_inference(
            args.model,
            base_model=args.base_model,
            load_in_4bit=args.load_in_4bit,
            torch_dtype=DTYPES[args.dtype],
            device=args.device,
        )
        print(f"model: {source.describe()}", file=sys.stderr)
        answer = summarize(
            model,
            tokenizer,
            media_path,
            args.prompt,
            num_frames=args.num_frames,
            generation_kwargs=generation_config(args.max_new_tokens, args.do_sample, args.temperature, args.top_p),
        )
    except (OSError, ValueError, VideoDecodeError) as error:
        sys.exit(f"error: {error}")
    print(answer)


if __name__ == "__main__":
    main()
