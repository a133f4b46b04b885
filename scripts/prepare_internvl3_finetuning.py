"""Turn videos and reference summaries into official InternVL fine-tuning data (meta.json + train/val JSONL).

    python scripts/prepare_internvl3_finetuning.py --input annotations.csv --output-dir internvl3_data
    python scripts/prepare_internvl3_finetuning.py            # reads internvl3_data/raw/

See docs/DATA.md for the input formats and what is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl.data.dataset import SampleOptions  # noqa: E402
from internvl.data.prepare import (  # noqa: E402
    DEFAULT_INPUT,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_PROMPT,
    META_FILE,
    REJECTS_FILE,
    PrepareError,
    prepare_dataset,
    printable,
)
from internvl.data.video import VIDEO_BACKENDS  # noqa: E402

NO_INPUT_HELP = f"""\
No input data found in {DEFAULT_INPUT}/.
Provide your videos and their reference summaries in one of these ways:
  - put the videos in {DEFAULT_INPUT}/ with a same-name .txt summary beside each (clip01.mp4 + clip01.txt),
  - or put them there with an annotations.csv holding the columns video,summary (paths relative to that folder),
  - or pass --input PATH: a CSV, JSON list or JSONL file with a video path and a summary per record
    (column names video and summary; --video-key / --summary-key for other names), or such a folder.
To try the pipeline on synthetic clips first:
  python scripts/make_demo_data.py --output-dir {DEFAULT_INPUT}
  python scripts/prepare_internvl3_finetuning.py"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, help=f"annotation file or folder (default: {DEFAULT_INPUT}/)")
    parser.add_argument(
        "--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where to write (default: %(default)s)"
    )
    parser.add_argument(
        "--video-root",
        type=Path,
        help="folder that relative video paths start from (default: the annotation file's folder)",
    )
    parser.add_argument("--video-key", help="annotation field holding the video path (default: video, or an alias)")
    parser.add_argument("--summary-key", help="annotation field holding the summary (default: summary, or an alias)")
    parser.add_argument(
        "--val-ratio",
        type=float,
        default=0.1,
        help="share of videos for evaluation (default: %(default)s); 0: no evaluation split, and no _val entry in "
        "meta.json",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: %(default)s)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="instruction after <video> (default: %(default)r)")
    parser.add_argument("--system-prompt", help="system message written as the first turn (default: the template's)")
    parser.add_argument("--strict", action="store_true", help="fail on any bad record instead of skipping it")
    parser.add_argument(
        "--extract-frames",
        action="store_true",
        help="decode each video once and store frames as an image folder, read instead of the video",
    )
    parser.add_argument(
        "--num-frames",
        type=int,
        default=32,
        help="frames per video with --extract-frames (default: %(default)s, the training max_num_frame)",
    )
    parser.add_argument(
        "--absolute-root",
        action="store_true",
        help="write absolute paths in meta.json (default: paths as given, relative to the working directory unless "
        "absolute, as the official trainer reads them)",
    )
    parser.add_argument(
        "--portable",
        action="store_true",
        help="write paths in meta.json relative to the output folder, marked so, for a data folder that can move "
        "(the official trainer must then be started in that folder)",
    )
    parser.add_argument(
        "--video-backend", choices=VIDEO_BACKENDS, default="pyav", help="decoder (default: %(default)s)"
    )
    parser.add_argument(
        "--max-seq-length",
        type=int,
        default=SampleOptions.max_seq_length,
        help="training's --max_seq_length: summaries too long to fit a sample of this many tokens are warned about "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--min-num-frame",
        type=int,
        default=SampleOptions.min_num_frame,
        help="training's --min_num_frame, the fewest frames a sample holds next to the summary (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    input_path = args.input
    if input_path is None:
        input_path = DEFAULT_INPUT
        if not input_path.is_dir() or not any(input_path.iterdir()):
            print(NO_INPUT_HELP, file=sys.stderr)
            return 2
    try:
        report = prepare_dataset(
            input_path,
            args.output_dir,
            video_key=args.video_key,
            summary_key=args.summary_key,
            video_root=args.video_root,
            val_ratio=args.val_ratio,
            seed=args.seed,
            prompt=args.prompt,
            system_prompt=args.system_prompt,
            strict=args.strict,
            extract=args.extract_frames,
            num_frames=args.num_frames,
            absolute_root=args.absolute_root,
            portable=args.portable,
            video_backend=args.video_backend,
            max_seq_length=args.max_seq_length,
            min_num_frame=args.min_num_frame,
            progress=not args.no_progress,
        )
    except PrepareError as error:
        for rejection in error.rejected:
            print(f"rejected {rejection}", file=sys.stderr)
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return 1
    except OSError as error:  # reading the input: the file and the cause, not a traceback
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        meta = args.output_dir / META_FILE
        print(f"interrupted: {meta} names a complete set, the previous one unless the new one was out", file=sys.stderr)
        return 130
    for rejection in report.rejected:
        print(f"rejected {rejection}")
    if report.rejected:
        print(f"(also listed in {report.version_dir / REJECTS_FILE})")
    for long_summary in report.long_summaries:
        print(f"warning {long_summary}")
    print("\n".join(report.summary_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
