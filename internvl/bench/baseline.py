"""The plain QLoRA loop the recipe is compared with (``plain_qlora_baseline.py``, kept outside the repository), at the
recipe's micro-batch shape only.

    python -m internvl.bench.baseline PLAIN_SCRIPT OUT.json TOKENS [--batch 4]

The plain script measures NF4 and bf16 LoRA at three fixed shapes (several minutes: each one builds the 7B model
again). This runs the same script with its shape loop narrowed to NF4 at ``batch x TOKENS`` (the recipe's
micro-batch), the one figure the benchmark tables divide by; it stops if the script's loop is not the one expected.
"""

from __future__ import annotations

import argparse
import runpy
import sys
import tempfile
from pathlib import Path

QUANT_LOOP = "for quant in (True, False):"
SHAPES = "((1, 4096), (4, 4096), (2, 8192))"


def narrowed_source(source: str, *, batch: int, tokens: int) -> str:
    """The plain script's source measuring NF4 at ``batch x tokens`` only."""
    for expected in (QUANT_LOOP, SHAPES):
        if source.count(expected) != 1:
            raise ValueError(
                f"the plain loop script does not contain {expected!r} exactly once: it is not the version this "
                "runner knows; run it unmodified instead (BASELINE_FULL=1 in scripts/gpu_benchmark_suite.sh)"
            )
    return source.replace(QUANT_LOOP, "for quant in (True,):").replace(SHAPES, f"(({batch}, {tokens}),)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", type=Path, help="plain_qlora_baseline.py")
    parser.add_argument("output", help="the JSON the plain script writes")
    parser.add_argument("tokens", type=int, help="tokens per sample (the recipe's)")
    parser.add_argument("--batch", type=int, default=4, help="samples per step (default: %(default)s)")
    args = parser.parse_args(argv)
    source = narrowed_source(args.script.read_text(encoding="utf-8"), batch=args.batch, tokens=args.tokens)
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / args.script.name
        script.write_text(source, encoding="utf-8")
        sys.argv = [str(script), args.output]
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
