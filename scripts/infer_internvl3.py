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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl.tools.infer import (  # noqa: E402
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_FRAMES,
    generation_config,
    summarize,
)
from internvl.tools.merge import load_model_for_inference  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder or LoRA training output")
    parser.add_argument("--base-model", type=Path, help="base model of an adapter (default: the adapter's reference)")
    media = parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", type=Path, help="video file, GIF, or folder of <name>_<index>.jpg frames")
    media.add_argument("--image", type=Path, help="image file")
    parser.add_argument("--prompt", help="question or instruction (default: the training summary prompt)")
    parser.add_argument("--num-frames", type=int, default=DEFAULT_NUM_FRAMES, help="frames sampled from a video")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--load-in-4bit", action="store_true", help="load the LLM in 4-bit NF4 (bitsandbytes)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--device", help="e.g. cuda:1 or cpu (default: first GPU if any)")
    args = parser.parse_args()

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
        args.video or args.image,
        args.prompt,
        num_frames=args.num_frames,
        generation_kwargs=generation_config(args.max_new_tokens, args.do_sample, args.temperature, args.top_p),
    )
    print(answer)


if __name__ == "__main__":
    main()
