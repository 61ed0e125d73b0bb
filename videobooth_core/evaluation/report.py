"""What ``evaluate`` writes into its output folder:

    scores.csv     one row per video (id, video, seed, prompt, the four scores), then a ``mean`` row
    scores.json    {"videos": [...], "mean": {...}, "models": {...}, "paper_scale": {...}}; each video's ``drift``
                   (with an image prompt): its per-frame likeness and the figures (see drift.py), else null
    thumbs/<id>.png   the image prompt and a few frames of each video, its id written on it
    sheet.png      every video's row of thumbnails with its scores (PIL only)
    report.html    the same rows as a page, with the charts
    chart_<metric>.png   one bar per video (named on its axis and in the PNG's metadata); needs matplotlib
    compare.csv, compare.md, chart_compare.png   with ``--reference``: the means per configuration and the
                   reference's, latent MSE included (compare.py)
    drift.png      the per-frame likeness curve of every video with an image prompt; needs matplotlib
"""

from __future__ import annotations

import csv
import html
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_path, write_json_atomic
from .drift import Drift, drift_figure
from .metrics import METRICS

logger = logging.getLogger(__name__)

THUMB = 96
"""Thumbnail side in pixels."""
FRAMES_SHOWN = 4
LABELS = {"clip_t": "CLIP-T (x100)", "clip_i": "CLIP-I (x100)", "dino": "DINO (cosine)",
          "consistency": "subject consistency (VBench)"}


def _fmt(value: float | None, column: str | None = None) -> str:
    """A score with 4 decimals; a latent MSE (any magnitude) with 6 significant digits."""
    if value is None:
        return ""
    return f"{value:.6g}" if column in ("latent_mse", "latent_rel_mse") else f"{value:.4f}"


def _drift_text(drift: dict[str, Any]) -> str:
    """A row's ``drift`` record -> its one-line summary."""
    return Drift(drift["metric"], tuple(drift["per_frame"])).summary()


def thumbnail_strip(video_id: str, frames: torch.Tensor, image_prompt: torch.Tensor | None):
    """A PIL image: the image prompt (if any) and FRAMES_SHOWN evenly spread frames, with ``video_id`` on top."""
    from PIL import Image, ImageDraw

    picks = torch.linspace(0, frames.shape[0] - 1, min(FRAMES_SHOWN, frames.shape[0])).round().long()
    tiles = ([image_prompt] if image_prompt is not None else []) + [frames[int(i)] for i in picks]
    strip = Image.new("RGB", (THUMB * len(tiles), THUMB + 16), "white")
    for index, tile in enumerate(tiles):
        strip.paste(Image.fromarray(tile.numpy()).resize((THUMB, THUMB)), (index * THUMB, 16))
    draw = ImageDraw.Draw(strip)
    draw.text((2, 2), f"{video_id}" + ("  (image prompt | frames)" if image_prompt is not None else "  (frames)"),
              fill="black")
    return strip


def write_scores(out: Path, rows: list[dict[str, Any]], mean: dict[str, float | None], models: dict[str, str],
                 reference: dict[str, Any] | None = None) -> None:
    """scores.csv and scores.json (see the module docstring); with ``reference`` (``evaluate --reference``, see
    compare.py) the CSV gains the columns config, latent_mse and latent_rel_mse and the JSON a ``reference`` key."""
    figures = [*METRICS, *(("latent_mse", "latent_rel_mse") if reference else ())]
    columns = ["id", "video", "seed", "prompt", *(("config",) if reference else ()), *figures]
    with atomic_path(out / "scores.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c) if c not in figures else _fmt(row.get(c), c) for c in columns])
        writer.writerow(["mean", *[""] * (len(columns) - len(figures) - 1), *(_fmt(mean.get(m), m) for m in figures)])
    paper = {"clip_t": mean["clip_t"], "clip_i": mean["clip_i"],
             "dino": None if mean["dino"] is None else 100 * mean["dino"]}
    write_json_atomic(out / "scores.json", {"videos": rows, "mean": mean, "models": models,
                                            "paper_scale": paper,
                                            "paper_videobooth": {"clip_t": 30.10, "clip_i": 74.80, "dino": 65.10},
                                            **(reference or {})})


def write_sheet(out: Path, rows: list[dict[str, Any]], strips: dict[str, Any]) -> Path:
    """sheet.png: every video's thumbnail strip with its scores beside it."""
    from PIL import Image, ImageDraw

    width = max(s.width for s in strips.values()) + 260
    height = sum(s.height + 8 for s in strips.values()) + 8
    sheet = Image.new("RGB", (width, height), "white")
    draw, y = ImageDraw.Draw(sheet), 8
    for row in rows:
        strip = strips[row["id"]]
        sheet.paste(strip, (8, y))
        text = "\n".join(f"{m}: {_fmt(row.get(m)) or '-'}" for m in METRICS)
        draw.multiline_text((strip.width + 16, y + 18), text, fill="black")
        y += strip.height + 8
    with atomic_path(out / "sheet.png") as tmp:
        sheet.save(tmp, format="PNG")
    return out / "sheet.png"


def write_charts(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """chart_<metric>.png per computed metric, one bar per video named on the axis; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("charts skipped: they need matplotlib (`pip install videobooth[eval]`)")
        return []
    written = []
    for metric in METRICS:
        values = [(row["id"], row[metric]) for row in rows if row.get(metric) is not None]
        if not values:
            continue
        names = [name for name, _ in values]
        figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * len(values) + 2), 3.2), dpi=100)
        axes.bar(range(len(values)), [v for _, v in values], color="#4c72b0")
        axes.set_xticks(range(len(values)), names, rotation=45 if len(values) > 4 else 0, ha="right", fontsize=8)
        axes.set_title(LABELS[metric])
        mean = sum(v for _, v in values) / len(values)
        axes.axhline(mean, color="#dd8452", linestyle="--", label=f"mean {mean:.3f}")
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = out / f"chart_{metric}.png"
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", metadata={"Title": LABELS[metric], "Description": "videos: " +
                                                         ", ".join(names)})
        plt.close(figure)
        written.append(path)
    return written


def write_drift_chart(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    """drift.png: the per-frame likeness curve of every row with a ``drift`` (videos named in the legend and in the
    PNG's metadata); None when no row has one or without matplotlib."""
    drifts = {row["id"]: Drift(row["drift"]["metric"], tuple(row["drift"]["per_frame"])) for row in rows
              if row.get("drift")}
    if not drifts:
        return None
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("the drift chart skipped: it needs matplotlib (`pip install videobooth[eval]`)")
        return None
    figure = drift_figure(drifts)
    path = out / "drift.png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Title": "drift: likeness to the image prompt per frame",
                                                     "Description": "videos: " + ", ".join(drifts)})
    plt.close(figure)
    return path


def write_html(out: Path, rows: list[dict[str, Any]], mean: dict[str, float | None], charts: list[Path]) -> Path:
    """report.html: a table of the videos (thumbnails and scores), the means, the charts."""
    head = "".join(f"<th>{html.escape(LABELS[m])}</th>" for m in METRICS) + "<th>drift</th>"
    body = []
    for row in rows:
        name = html.escape(row["id"])
        cells = "".join(f"<td>{_fmt(row.get(m)) or '-'}</td>" for m in METRICS)
        drift = row.get("drift")
        cells += f"<td><small>{html.escape(_drift_text(drift)) if drift else '-'}</small></td>"
        body.append(f"<tr><td>{name}<br><small>{html.escape(str(row.get('prompt') or ''))}</small></td>"
                    f"<td><img src=\"thumbs/{name}.png\" alt=\"{name}\" title=\"{name}\"></td>{cells}</tr>")
    means = "".join(f"<td><b>{_fmt(mean[m]) or '-'}</b></td>" for m in METRICS)
    images = "".join(f"<img src=\"{c.name}\" alt=\"{c.stem}\">" for c in charts)
    page = (f"<!doctype html><meta charset=\"utf-8\"><title>VideoBooth evaluation</title>"
            "<style>body{font-family:sans-serif}td,th{padding:4px 8px;border-bottom:1px solid #ddd}</style>"
            f"<h1>VideoBooth evaluation ({len(rows)} videos)</h1><table><tr><th>video</th><th>image prompt | frames"
            f"</th>{head}</tr>{''.join(body)}<tr><td><b>mean</b></td><td></td>{means}<td></td></tr></table>{images}")
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "report.html"
