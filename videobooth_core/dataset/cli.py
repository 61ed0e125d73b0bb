"""``python -m videobooth_core dataset {build,check,preview,synthetic}``: the parser and the commands.

Registered by ``app/cli.py`` (``add_dataset_parser`` + ``cmd_dataset``). Bad input: exit 2 with one line;
``check`` exits 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import DatasetError
from ..files import check_output_folder, check_target
from ..settings import check_number


def add_dataset_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``dataset`` command and its sub-commands to the main parser's sub-parsers."""
    from .build import MIN_FRAMES
    from .layout import DEFAULT_CLASSES
    from .segment import BOX_THRESHOLD, TEXT_THRESHOLD

    data = sub.add_parser("dataset", help="build, check, preview training datasets (or write a synthetic one)")
    actions = data.add_subparsers(dest="dataset_command", required=True)

    build = actions.add_parser("build", help="videos + captions -> a VideoBooth dataset (subject segmented in frame 0)")
    build.add_argument("--videos", required=True, help="folder of the videos (mp4, mkv, webm, mov, ...)")
    build.add_argument("--captions", required=True,
                       help="CSV (header video,caption[,word]) or JSONL ({\"video\", \"caption\", \"word\"?} per line)")
    build.add_argument("--out", required=True, help="dataset folder (an earlier build's folder resumes it)")
    build.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                       help="comma-separated subject words looked for in captions without a word "
                            "(default: the paper's nine classes)")
    build.add_argument("--masks", help="folder of user masks, <video stem>.png (nonzero = subject), instead of "
                                       "Grounding DINO + SAM")
    build.add_argument("--models", default=os.environ.get("VIDEOBOOTH_MODELS", "models"),
                       help="models folder searched for the Grounding DINO and SAM folders (default: $VIDEOBOOTH_MODELS "
                            "or ./models)")
    build.add_argument("--grounding-dino", help="IDEA-Research/grounding-dino-tiny folder (default: found under --models)")
    build.add_argument("--sam", help="facebook/sam-vit-base folder (default: found under --models)")
    build.add_argument("--box-threshold", type=float, default=BOX_THRESHOLD, help="Grounding DINO box score threshold")
    build.add_argument("--text-threshold", type=float, default=TEXT_THRESHOLD, help="Grounding DINO text threshold")
    build.add_argument("--min-frames", type=int, default=MIN_FRAMES, help="shorter videos are skipped")
    build.add_argument("--workers", type=int, default=1, help="videos processed at once (threads)")
    build.add_argument("--device", default="cpu", help="device of the segmentation models")

    check = actions.add_parser("check", help="counts per class, frame counts, broken/missing files, bad masks")
    check.add_argument("dataset", help="dataset folder")
    check.add_argument("--no-decode", action="store_true", help="do not decode the videos (faster)")

    preview = actions.add_parser("preview", help="contact sheet of first frames, masks and image prompts")
    preview.add_argument("dataset", help="dataset folder")
    preview.add_argument("--out", required=True, help="output .png")
    preview.add_argument("--limit", type=int, default=16, help="entries shown (the first ones by id)")
    preview.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")

    synth = actions.add_parser("synthetic", help="write a tiny synthetic dataset (moving textured shapes)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--videos", type=int, default=8, help="number of videos")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--sources", action="store_true",
                       help="write builder input instead (videos/, captions.jsonl, masks/) to try `dataset build`")


def cmd_dataset(args: argparse.Namespace) -> int:
    """Run a ``dataset`` sub-command."""
    return {"build": _build, "check": _check, "preview": _preview, "synthetic": _synthetic}[args.dataset_command](args)


def _build(args: argparse.Namespace) -> int:
    from .build import MIN_FRAMES, BuildOptions, build_dataset
    from .segment import BOX_THRESHOLD, TEXT_THRESHOLD

    classes = tuple(c.strip().lower() for c in args.classes.split(",") if c.strip())
    if not classes:
        raise DatasetError(f"--classes {args.classes!r} names no class; give comma-separated words, e.g. dog,cat")
    for flag, value, default in (("--box-threshold", args.box_threshold, BOX_THRESHOLD),
                                 ("--text-threshold", args.text_threshold, TEXT_THRESHOLD)):
        check_number(flag, value, default, minimum=0.0, maximum=1.0)
    check_number("--min-frames", args.min_frames, MIN_FRAMES, whole=True, minimum=1)
    check_number("--workers", args.workers, 1, whole=True, minimum=1, maximum=256)
    check_output_folder(args.out)  # writable, not a file: before the segmentation models load
    factory = None
    if not args.masks:
        from .segment import GroundedSam, find_model_folder

        dino = find_model_folder(args.models, "grounding_dino", args.grounding_dino)  # fail before any work
        sam = find_model_folder(args.models, "sam", args.sam)

        def factory():
            return GroundedSam(dino, sam, args.device, args.box_threshold, args.text_threshold)

    options = BuildOptions(classes=classes, masks_dir=Path(args.masks) if args.masks else None,
                           min_frames=args.min_frames, workers=args.workers, segmenter_factory=factory)
    report = build_dataset(args.videos, args.captions, args.out, options)
    print(report.summary())
    if not report.built and not report.already_done:  # exit 0 means a dataset that training can use
        raise DatasetError(f"no entry was built: every video of {args.videos!r} was skipped (reasons above); fix "
                           "the captions, words, masks or --min-frames and rerun")
    print(f"dataset: {args.out} (check it with `python -m videobooth_core dataset check {args.out}`)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import check_dataset

    report = check_dataset(args.dataset, decode=not args.no_decode)
    print(report.summary())
    return 1 if report.problems else 0


def _preview(args: argparse.Namespace) -> int:
    from .check import preview_sheet

    if Path(args.out).suffix.lower() != ".png":
        raise DatasetError(f"--out {args.out!r} must be a .png file")
    check_number("--limit", args.limit, 16, whole=True, minimum=1)
    check_target(args.out, overwrite=args.overwrite)  # the rule of every output: nothing of the user's replaced
    print(f"wrote {preview_sheet(args.dataset, args.out, args.limit)}")
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic, write_sources

    check_number("--videos", args.videos, 8, whole=True, minimum=1, maximum=10_000)
    check_output_folder(args.out)
    if args.sources:
        out = write_sources(args.out, args.videos, args.seed)
        print(f"wrote {args.videos} synthetic videos, masks and captions.jsonl to {out}")
        return 0
    report = make_synthetic(args.out, args.videos, args.seed)
    print(report.summary())
    print(f"wrote a synthetic dataset to {args.out}")
    return 0
