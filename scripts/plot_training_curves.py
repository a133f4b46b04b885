"""Plot the training and evaluation loss of a training run as a PNG.

    python scripts/plot_training_curves.py work_dirs/internvl3_8b_lora [--output loss.png]

Reads trainer_state.json (or training_log.txt while training runs); writes OUTPUT_DIR/loss_curves.png by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl.tools.plots import load_loss_history, plot_training_curves  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="training output folder")
    parser.add_argument("--output", type=Path, help="PNG path (default: OUTPUT_DIR/loss_curves.png)")
    args = parser.parse_args()
    try:
        history = load_loss_history(args.output_dir)
        path = plot_training_curves(args.output_dir, args.output)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"{len(history.train)} train and {len(history.eval)} eval loss points from {history.source} -> {path}")


if __name__ == "__main__":
    main()
