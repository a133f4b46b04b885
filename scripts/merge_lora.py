"""Merge a LoRA training output into a full InternVL checkpoint in the official layout (bf16, sharded safetensors).

    python scripts/merge_lora.py work_dirs/internvl3_8b_lora models/InternVL3-8B-video-merged \
        [--base-model models/InternVL3-8B] [--format hf]

INPUT is a training output folder (or one of its checkpoint-N) holding a LoRA adapter, or an official-style
checkpoint with LoRA layers in its weights. The base model defaults to the one the adapter names; it may be in the
official or the -hf layout. --format hf writes transformers' InternVLForConditionalGeneration layout instead (as
OpenGVLab/InternVL3-8B-hf), for transformers, vLLM, LLaMA-Factory and Axolotl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl.model.hf_layout import LAYOUTS, ORIGINAL_LAYOUT  # noqa: E402
from internvl.tools.infer import DTYPES  # noqa: E402
from internvl.tools.merge import DEFAULT_MAX_SHARD_SIZE, merge_lora  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="training output folder (LoRA adapter) or LoRA checkpoint")
    parser.add_argument("output", type=Path, help="folder to write the merged model to (created atomically)")
    parser.add_argument("--base-model", type=Path, help="base InternVL checkpoint (default: the adapter's reference)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the merged weights")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists and is not empty")
    parser.add_argument("--format", choices=LAYOUTS, default=ORIGINAL_LAYOUT,
                        help="layout of the merged model: the official one, or transformers' -hf one")  # fmt: skip
    args = parser.parse_args()

    try:
        info = merge_lora(
            args.input,
            args.output,
            base_model=args.base_model,
            torch_dtype=DTYPES[args.dtype],
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            layout=args.format,
        )
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    ranks = ", ".join(f"{part} r={rank}" for part, rank in info["lora_ranks"].items())
    print(f"merged {info['source']} ({ranks}) into {args.output}")
    print(f"base model: {info['base_model']}")
    print(f"merged onto {info['merged_onto']}")
    official = args.format == ORIGINAL_LAYOUT
    layout = "the official layout (use_llm_lora 0, use_backbone_lora 0)" if official else "transformers' -hf layout"
    print(f"the result is in {layout}; details in merge_info.json")


if __name__ == "__main__":
    main()
