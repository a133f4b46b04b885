"""Write small synthetic demo videos (moving coloured shapes, real MP4 files) with an annotations.csv of summaries.

python scripts/make_demo_data.py --output-dir internvl3_data/raw [--num-videos 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl.data.demo import ANNOTATIONS_FILE, make_demo_videos  # noqa: E402
from internvl.data.prepare import DEFAULT_INPUT  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_INPUT, help="where to write (default: %(default)s)")
    parser.add_argument("--num-videos", type=int, default=16, help="number of clips (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=24, help="frames per clip (default: %(default)s)")
    parser.add_argument(
        "--size", type=int, default=96, help="frame width and height in pixels, even (default: %(default)s)"
    )
    parser.add_argument("--fps", type=int, default=12, help="frame rate (default: %(default)s)")
    args = parser.parse_args()
    try:
        output_dir = make_demo_videos(
            args.output_dir,
            num_videos=args.num_videos,
            seed=args.seed,
            frames=args.frames,
            size=args.size,
            fps=args.fps,
        )
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        sys.exit(f"error: cannot write the demo videos to {args.output_dir}: {error}")
    print(f"wrote {args.num_videos} demo videos and {ANNOTATIONS_FILE} to {output_dir}")


if __name__ == "__main__":
    main()
