"""``python -m videobooth_core evaluate`` and the ``generate --best-of N --rank-by METRIC`` flags.

Registered by ``app/cli.py`` (``add_evaluate_parser`` + ``cmd_evaluate``; ``add_best_of_args`` +
``run_best_of``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import EvaluationError, VideoBoothError
from ..files import check_output_folder
from .metrics import RANK_CHOICES

EVALUATE_EXAMPLES = """examples:
  # a batch-jobs output folder (its manifest.json), models found in ./models (clip_eval/ or text_encoders/, dino/)
  python -m videobooth_core evaluate --manifest videos/manifest.json --models models --out eval

  # your own set: one {"video", "prompt", "word", "image", "mask"} object per line, paths relative to the file
  python -m videobooth_core evaluate --set eval_set.jsonl --models models --out eval

  # a distilled student's videos against the teacher's of the same seed, prompt and image prompt: the scores of
  # both and the latent MSE (lines with "latents") per "config", in compare.csv, compare.md, chart_compare.png
  python -m videobooth_core evaluate --set student.jsonl --reference teacher.jsonl --models models --out eval
"""


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command to the main parser's sub-parsers."""
    ev = sub.add_parser("evaluate", help="score videos: CLIP-T, CLIP-I, DINO, consistency (+ an HTML/PNG report)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EVALUATE_EXAMPLES,
                        description="Score videos as the paper does (CLIP-T, CLIP-I on the x100 scale, DINO ViT-S/16) "
                                    "plus VBench's subject consistency, and each video's drift (likeness to the "
                                    "image prompt frame by frame: DINO, else CLIP-I); writes scores.csv, scores.json, "
                                    "report.html, sheet.png, a chart per metric and drift.png into --out; with --reference also "
                                    "compare.csv, compare.md and chart_compare.png.")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="manifest.json of a `generate --jobs` output (or its folder)")
    source.add_argument("--set", dest="eval_set", help="a .jsonl evaluation set (see README: Evaluation)")
    ev.add_argument("--reference", help="a reference set (.jsonl, or a jobs manifest.json or its folder), e.g. the "
                                        "teacher's videos: each video is compared with the one of the same seed, "
                                        "prompt and image prompt (scores + latent MSE per configuration)")
    ev.add_argument("--out", required=True, help="output folder (created; its score and report files are replaced)")
    _add_model_args(ev)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=os.environ.get("VIDEOBOOTH_MODELS", "models"),
                   help="models folder searched for the metric models (default: $VIDEOBOOTH_MODELS or ./models)")
    p.add_argument("--clip", help="a full CLIP folder or .safetensors for CLIP-T/CLIP-I (default: found in the models "
                                  "folder's clip_eval/, text_encoders/, clip_vision/)")
    p.add_argument("--dino", help="DINO ViT-S/16 folder or .safetensors (default: found in the models folder's dino/)")


def add_best_of_args(p: argparse.ArgumentParser) -> None:
    """``--best-of`` and ``--rank-by`` on ``generate``."""
    group = p.add_argument_group("best of N (scores N seeds with a metric model, keeps the best; with --jobs "
                                 "--best-of and --rank-by are every line's default, keys best_of and rank_by)")
    group.add_argument("--best-of", type=int, default=1,
                       help="generate N videos with seeds seed..seed+N-1 and keep the best (default: 1, off)")
    group.add_argument("--rank-by", choices=tuple(RANK_CHOICES), default="dino",
                       help="the metric that ranks them: dino, clip-i (likeness to the image prompt) or clip-t "
                            "(text alignment) (default: dino)")
    group.add_argument("--clip", help="a full CLIP for clip-i/clip-t (default: found in --models)")
    group.add_argument("--dino", help="DINO ViT-S/16 for dino (default: found in --models' dino/)")


def find_metric_models(args: argparse.Namespace, need: tuple[str, ...]) -> None:
    """The metric models in ``need`` (``clip``, ``dino``) found, or their given paths present, before any model
    loads (best of N ranks with them after the generation): CheckpointError naming the one missing."""
    from ..loading.inputs import check_readable
    from .models import find_clip, find_dino

    for which, find in (("clip", find_clip), ("dino", find_dino)):
        if which not in need:
            continue
        given = getattr(args, which, None)
        if given:
            check_readable(given, f"--{which}", f"give the {which.upper()} folder or .safetensors", folder_ok=True)
        else:
            find(args.models)


def load_scorer(args: argparse.Namespace, need: tuple[str, ...] = ("clip", "dino"), device: str = "cpu",
                strict: bool = False):
    """A Scorer with the requested models: explicit paths win, else found in ``args.models``. For the
    ``evaluate`` command a model that is not found is skipped (its metrics stay empty) unless none is found;
    with ``strict`` (or a single model asked for) a model not found is an error."""
    from ..errors import CheckpointError
    from .metrics import Scorer
    from .models import find_clip, find_dino, load_clip_for_metrics, load_dino_for_metrics

    loaded: dict[str, Any] = {}
    problems = []
    for which, find, load in (("clip", find_clip, load_clip_for_metrics), ("dino", find_dino, load_dino_for_metrics)):
        if which not in need:
            continue
        try:
            path = getattr(args, which, None) or find(args.models)
        except CheckpointError as error:
            problems.append(error)
            continue
        loaded[which] = load(path, device)
    if not loaded or ((strict or len(need) == 1) and problems):
        raise problems[0]
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return Scorer(**loaded)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .media import read_manifest, read_set
    from .metrics import mean_scores
    from .report import write_charts, write_drift_chart, write_html, write_scores, write_sheet

    items = read_manifest(args.manifest) if args.manifest else read_set(args.eval_set)
    out = Path(args.out)
    check_output_folder(out)  # writable and not a file, before any metric model loads
    _check_items(items)
    references, latent = None, {}
    if args.reference:  # matched and their latent MSEs computed before any metric model loads
        from .compare import latent_columns, match_references

        where = Path(args.reference)
        references = read_manifest(where) if where.is_dir() or where.suffix == ".json" else read_set(where)
        _check_items(references)
        latent = latent_columns(items, match_references(items, references, str(where)))
    scorer = load_scorer(args)
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    strips: dict[str, Any] = {}
    rows = _score(items, scorer, strips, out)
    if references is not None:  # the comparison's columns; without --reference the rows stay as they were
        for row, item in zip(rows, items):
            row.update(config=item.config or "all", **latent[item.id])
    mean = mean_scores(rows)
    models = {"clip": scorer.clip.source if scorer.clip else None, "dino": scorer.dino.source if scorer.dino else None}
    extra = None
    if references is not None:
        from .compare import LATENT_COLUMNS, compare_table, write_compare

        print(f"the reference set {args.reference}:", flush=True)
        reference_rows = _score(references, scorer, None, out)
        table = compare_table(rows, reference_rows)
        write_compare(out, table, args.reference)
        mean.update({c: _mean_of(rows, c) for c in LATENT_COLUMNS})
        extra = {"reference": {"set": str(args.reference), "videos": reference_rows, "comparison": table}}
        for row in table:
            print("compare: " + json.dumps(row), flush=True)
    write_scores(out, rows, mean, models, extra)
    write_sheet(out, rows, strips)
    charts = write_charts(out, rows)
    drift_chart = write_drift_chart(out, rows)
    compare_chart = [out / "chart_compare.png"] if (out / "chart_compare.png").is_file() and extra else []
    write_html(out, rows, mean, charts + ([drift_chart] if drift_chart else []) + compare_chart)
    print("mean: " + json.dumps(mean))
    return 0


def _mean_of(rows: list[dict[str, Any]], column: str) -> float | None:
    values = [row[column] for row in rows if row.get(column) is not None]
    return sum(values) / len(values) if values else None


def _check_items(items: list) -> None:
    """Every video present and readable, every score that will stay empty said now (before models load)."""
    for item in items:
        check_video(item.video)
        if item.prompt is None:
            print(f"warning: {item.id}: no 'prompt', so its clip_t stays empty (give each line a \"prompt\")",
                  file=sys.stderr)
        if item.image is None:
            print(f"warning: {item.id}: no 'image', so its clip_i, dino and drift stay empty (give each line an "
                  "\"image\")", file=sys.stderr)


def _score(items: list, scorer: Any, strips: dict[str, Any] | None, out: Path) -> list[dict[str, Any]]:
    """Each item's row (scores, drift); with ``strips`` its thumbnail strip kept there and saved in out/thumbs."""
    from .drift import Drift, drift_metric
    from .media import prepared_image_prompt, read_video
    from .metrics import video_scores
    from .report import thumbnail_strip

    likeness = drift_metric(scorer)  # the drift curve: DINO when loaded, else CLIP-I
    rows = []
    for item in items:
        frames = read_video(item.video)
        reference = prepared_image_prompt(item)
        curves = scorer.per_frame(frames, reference, item.prompt)  # one pass gives the scores and the drift
        drift = None if curves[likeness] is None else Drift.from_curve(curves[likeness], likeness)
        rows.append({"id": item.id, "video": str(item.video), "seed": item.seed, "prompt": item.prompt,
                     "frames": int(frames.shape[0]), **video_scores(curves),
                     "drift": None if drift is None else drift.as_dict()})
        if strips is not None:
            strips[item.id] = thumbnail_strip(item.id, frames, reference)
            strips[item.id].save(out / "thumbs" / f"{item.id}.png")
        print(json.dumps({k: rows[-1][k] for k in ("id", "clip_t", "clip_i", "dino", "consistency")}), flush=True)
        if drift is not None:
            print(f"  drift: {drift.summary()}", flush=True)
    return rows


def check_video(path: Path) -> None:
    """A video to score checked cheaply before any metric model loads: it exists and its header can be read (a
    folder: it holds PNG frames). EvaluationError naming the file otherwise."""
    from ..video_io import read_frames

    if path.is_dir():
        if not any(p.suffix.lower() == ".png" for p in path.iterdir()):
            raise EvaluationError(f"the folder {path} holds no PNG frames; give a video file or a folder of frames")
        return
    if not path.is_file():
        raise EvaluationError(f"video not found: {path}; check the path (relative paths are relative to the set file)")
    try:
        read_frames(path, [0])  # the header and one frame: the whole video is decoded once, when it is scored
    except VideoBoothError as error:  # the decoder's reason, already one line naming the file
        raise EvaluationError(str(error)) from None
    except OSError as error:
        raise EvaluationError(f"cannot read the video {path} ({error}); give a complete .mp4/.gif/.webp or a folder "
                              "of PNG frames") from None


def run_best_of(args: argparse.Namespace, pipe: Any, request: Any, callback: Any = None):
    """``generate --best-of N``: the N candidates ranked (best first); prints each seed and its scores."""
    from .best_of import generate_best_of
    from .metrics import rank_key

    need = ("dino",) if rank_key(args.rank_by) == "dino" else ("clip",)
    scorer = load_scorer(args, need, device=getattr(args, "device", "cpu"))
    ranked = generate_best_of(pipe, request, args.best_of, args.rank_by, scorer, callback)
    for place, candidate in enumerate(ranked, 1):
        scores = {k: (None if v is None else round(v, 4)) for k, v in candidate.scores.items()}
        print(json.dumps({"rank": place, "seed": candidate.seed, **scores}), file=sys.stderr)
    return ranked
