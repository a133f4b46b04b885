"""Verify a downloaded InternVL checkpoint folder; ``scripts/download_internvl3_models.sh`` calls it.

    python -m internvl.tools.download models/InternVL3-8B [--quiet]

The checks are the setup check's model-folder checks (``internvl.tools.checks.check_model_dir``): config.json
of an InternVL chat model, every shard named in ``model.safetensors.index.json`` present, complete and holding the
tensors the index assigns to it, and a tokenizer that loads with the InternVL special tokens. Exit code 0 when the
folder is complete, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from internvl.tools.checks import check_model_dir
from internvl.tools.checks.results import failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify a downloaded InternVL checkpoint folder.")
    parser.add_argument("model_dir", type=Path, help="the checkpoint folder")
    parser.add_argument("--quiet", action="store_true", help="print nothing; report through the exit code")
    args = parser.parse_args(argv)
    results = check_model_dir(args.model_dir)
    incomplete = failed(results)
    if not args.quiet:
        for result in results:
            print(result.format())
        print(f"{args.model_dir} is incomplete: see the ❌ above" if incomplete else f"{args.model_dir} is complete")
    return 1 if incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
