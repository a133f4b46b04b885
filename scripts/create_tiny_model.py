"""Write a tiny random-init InternVL3-layout checkpoint (with its offline-trained tokenizer) for tests and demos.

    python scripts/create_tiny_model.py --output-dir work/tiny-internvl3 [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl.model.tiny import create_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, type=Path, help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (same seed, same bytes)")
    args = parser.parse_args()
    try:
        output_dir = create_tiny_model(args.output_dir, seed=args.seed)
    except OSError as error:
        sys.exit(f"error: cannot write the checkpoint to {args.output_dir}: {error}")
    size_mb = sum(path.stat().st_size for path in output_dir.iterdir()) / 2**20
    print(f"tiny InternVL3 checkpoint written to {output_dir} ({size_mb:.1f} MB)")


if __name__ == "__main__":
    main()
