"""``cf evaluate``: metrics of one or more folders of generated mp4s, side by side.

    cf evaluate runs/cf_student runs/longlive --out eval/ --prompts prompts.json
        --dino weights/dinov2-base --clip weights/clip-vit-b32 --timestamps 10,20,30,40,50,60

Writes ``metrics.json``, ``metrics.csv`` and ``<metric>_vs_time.png`` (one line per folder) into ``--out``.
Without ``--dino`` / ``--clip`` only the pixel and ground-truth metrics run (metrics.json says so under "notes").
VBench subject / background consistency are reported per video (``models.<folder>.videos.<stem>.scalars``) and per
folder (``models.<folder>.summary``: frame-weighted, like VBench); background consistency runs the ``--clip`` model
with VBench's own preprocessing (bicubic resize without antialias, no clamp), CLIP-F / CLIP-T with the antialiased one.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from cf.evaluation.metrics import DEFAULT_TIMESTAMPS


def parse_timestamps(text: str) -> tuple[float, ...]:
    """``"10,20,30"`` -> ``(10.0, 20.0, 30.0)``."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"timestamps must be comma-separated seconds, e.g. 10,20,30: {err}")
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"timestamps must be non-negative seconds, got {text!r}")
    return values


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate`` sub-command."""
    parser = subparsers.add_parser(
        "evaluate", help="long-video metrics of folders of mp4s (one folder per model)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="folders of *.mp4 (same-stem .txt prompts and .json ground truth "
                                                   "are picked up)")
    parser.add_argument("--out", required=True, help="output folder for metrics.json, metrics.csv and PNGs")
    parser.add_argument("--prompts", default=None,
                        help="prompts file: JSON {stem: prompt} or lines 'stem<TAB>prompt' (same-stem .txt wins)")
    parser.add_argument("--dino", default=None, help="local DINOv2 folder (e.g. facebook/dinov2-base)")
    parser.add_argument("--vbench-dino", default=None,
                        help="local DINO folder for VBench subject consistency (default: the --dino model)")
    parser.add_argument("--clip", default=None, help="local CLIP folder (e.g. openai/clip-vit-base-patch32)")
    parser.add_argument("--timestamps", type=parse_timestamps, default=DEFAULT_TIMESTAMPS,
                        help="window centres in seconds (default 10,20,30,40,50,60)")
    parser.add_argument("--window", type=float, default=0.5, help="window half-width in seconds (default 0.5)")
    parser.add_argument("--min-coverage", type=float, default=0.5,
                        help="fraction of a window that must lie inside the video, else 'missing' (default 0.5)")
    parser.add_argument("--fps", type=float, default=None, help="override the videos' frame rate")
    parser.add_argument("--reference-s", type=float, default=1.0,
                        help="seconds at the start used as reference by the ground-truth-free pixel metrics")
    parser.add_argument("--background-s", type=float, default=4.0,
                        help="seconds at the start whose per-pixel median is the background image (pixel metrics)")
    parser.add_argument("--pixel-max-side", type=int, default=128,
                        help="downscale frames to this longer side for pixel metrics (default 128)")
    parser.add_argument("--flashback-min-rise", type=float, default=0.1,
                        help="flashback: minimum sudden rise of similarity to the first frame (cosine units)")
    parser.add_argument("--flashback-min-decline", type=float, default=0.1,
                        help="flashback: minimum decline before the rise (cosine units)")
    parser.add_argument("--flashback-max-rise-s", type=float, default=1.0,
                        help="flashback: the rise must happen within this many seconds")
    parser.add_argument("--flashback-smoothing-s", type=float, default=0.5,
                        help="flashback: moving-average window of the similarity curve (seconds)")
    parser.add_argument("--max-videos", type=int, default=None, help="evaluate at most this many videos per folder")
    parser.add_argument("--device", default="cpu", help="torch device for the feature models")
    parser.add_argument("--batch-size", type=int, default=32, help="frames per feature-model batch")
    parser.add_argument("--dino-image-size", type=int, default=224)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> dict:
    """Run the evaluation described by parsed arguments; prints the folder summaries."""
    from cf.evaluation.report import EvaluationConfig, evaluate_folders

    config = EvaluationConfig(
        timestamps=tuple(args.timestamps), half_width=args.window, min_coverage=args.min_coverage, fps=args.fps,
        reference_s=args.reference_s, background_s=args.background_s, pixel_max_side=args.pixel_max_side,
        flashback_smoothing_s=args.flashback_smoothing_s, flashback_min_decline=args.flashback_min_decline,
        flashback_min_rise=args.flashback_min_rise, flashback_max_rise_s=args.flashback_max_rise_s,
        max_videos=args.max_videos)
    report = evaluate_folders(args.folders, args.out, prompts_file=args.prompts, dino=args.dino,
                              vbench_dino=args.vbench_dino, clip=args.clip, config=config, device=args.device,
                              batch_size=args.batch_size, dino_image_size=args.dino_image_size)
    for note in report["notes"]:
        print(f"note: {note}")
    for model, data in report["models"].items():
        print(f"{model}: {json.dumps(data['summary'], indent=None)}")
    print(f"wrote {', '.join(report['files'])}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m cf.evaluation.cli ...`` (same as ``cf evaluate ...``)."""
    parser = argparse.ArgumentParser(prog="cf")
    register(parser.add_subparsers(dest="command", required=True))
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] != "evaluate":
        arguments = ["evaluate", *arguments]
    args = parser.parse_args(arguments)
    args.func(args)


if __name__ == "__main__":
    main()
