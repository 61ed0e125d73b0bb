"""``evaluate --reference REF``: videos compared with a reference set of the same seeds, prompts and image prompts
(a distilled student's few-step videos against the teacher's recommended-sampler videos, issue 27).

Each video is matched to the reference video of the same **seed, prompt and image prompt** (image, mask, box); a
video without one is an error before any metric model loads. Besides the four scores of both sets, each video gets
its **latent MSE** to its reference: mean over every element of (latents - reference latents)^2 in float64, and
the relative MSE (that over the reference's mean square), the figures ``benchmarks/distill_proof.py`` reports.

Latents come from the ``latents`` file a set line (or a jobs manifest's item) names (a ``.safetensors`` holding one
tensor ``latents``, (1, 4, f, h, w) or (4, f, h, w), raw SD latents as ``result.latents`` of ``generate``;
``generate --save-latents`` writes one beside the video, :func:`save_latents` any tensor: both
:mod:`videobooth_core.latents_file`). They are the sampler's own result; the decoded frames are NOT re-encoded with
the VAE: a VAE round trip of uint8 frames adds its own error (and needs the VAE loaded), so it would measure the VAE
as much as the sampler. A video or reference without latents keeps an empty latent MSE (a warning says so).

Results, per configuration (a set line's ``config``; default ``all``): the mean of each score and of the latent
MSEs, the reference set first, in ``compare.csv``, ``compare.md`` and ``chart_compare.png`` (one panel per column).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import EvaluationError
from ..files import atomic_path
from ..latents_file import LATENTS_KEY, save_latents  # noqa: F401  (the writer of the files read here)
from .media import EvalItem
from .metrics import METRICS

logger = logging.getLogger(__name__)

LATENT_COLUMNS = ("latent_mse", "latent_rel_mse")
COLUMNS = (*METRICS, *LATENT_COLUMNS)
REFERENCE_CONFIG = "reference"
"""The reference set's row in the comparison table."""
LATENT_LABELS = {"latent_mse": "latent MSE to the reference", "latent_rel_mse": "latent MSE / reference mean square"}


def match_key(item: EvalItem) -> tuple:
    """What makes a video the counterpart of a reference video: seed, prompt and image prompt (image, mask, box;
    resolved paths, so two sets naming one file differently still match)."""
    def resolved(path: Path | None) -> str | None:
        return None if path is None else str(path.resolve())

    return item.seed, item.prompt, resolved(item.image), resolved(item.mask), item.bbox


def _describe(item: EvalItem) -> str:
    return (f"seed {item.seed}, prompt {item.prompt!r}, image {item.image.name if item.image else None}"
            + (f", mask {item.mask.name}" if item.mask else ""))


def match_references(items: Sequence[EvalItem], references: Sequence[EvalItem], where: str) -> dict[str, EvalItem]:
    """Each item's reference (by :func:`match_key`) -> {item id: reference item}.

    Raises:
        EvaluationError: a reference key given twice, or an item without a reference (the first one, named).
    """
    by_key: dict[tuple, EvalItem] = {}
    for reference in references:
        key = match_key(reference)
        if key in by_key:
            raise EvaluationError(f"the reference set {where} has two videos for {_describe(reference)} "
                                  f"({by_key[key].id!r} and {reference.id!r}); keep one per seed, prompt and image")
        by_key[key] = reference
    matched = {}
    for item in items:
        reference = by_key.get(match_key(item))
        if reference is None:
            raise EvaluationError(f"{item.id}: no video in the reference set {where} has its {_describe(item)}; "
                                  "generate the reference for it or leave the video out of the set")
        matched[item.id] = reference
    return matched


def read_latents(path: Path) -> torch.Tensor:
    """A ``latents`` file -> (4, f, h, w) float64 (a leading batch of 1 dropped). EvaluationError naming the file
    when it cannot be read or holds no ``latents`` tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise EvaluationError(f"latents file {path}: give a .safetensors holding a tensor 'latents' (pickles are not "
                              "read)")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise EvaluationError(f"cannot read the latents file {path} ({error}); give the .safetensors written with "
                              "the video") from None
    if LATENTS_KEY not in tensors:
        raise EvaluationError(f"the latents file {path} holds no tensor 'latents' (it has {sorted(tensors)[:4]}); "
                              "write it with videobooth_core.latents_file.save_latents (or generate --save-latents)")
    latents = tensors[LATENTS_KEY]
    return (latents[0] if latents.ndim == 5 and latents.shape[0] == 1 else latents).double()


def latent_mse(latents: torch.Tensor, reference: torch.Tensor, what: str = "the latents") -> tuple[float, float]:
    """(MSE, relative MSE) of ``latents`` to ``reference`` (same shape, any): mean of (a - b)^2 in float64, and
    that over mean(reference^2) (NaN for an all-zero reference). EvaluationError when the shapes differ."""
    if latents.shape != reference.shape:
        raise EvaluationError(f"{what}: shape {tuple(latents.shape)} differs from its reference's "
                              f"{tuple(reference.shape)}; compare videos of the same frames and size")
    latents, reference = latents.double(), reference.double()
    mse = float(((latents - reference) ** 2).mean())
    scale = float((reference ** 2).mean())
    return mse, (mse / scale if scale > 0 else math.nan)


def latent_columns(items: Sequence[EvalItem], matched: dict[str, EvalItem]) -> dict[str, dict[str, float | None]]:
    """{item id: {latent_mse, latent_rel_mse}} (``None`` where the item or its reference has no ``latents``, with
    a warning). Reads only the latents files: run before any metric model loads, so a bad file stops it early."""
    columns: dict[str, dict[str, float | None]] = {}
    cache: dict[Path, torch.Tensor] = {}

    def load(path: Path) -> torch.Tensor:
        if path not in cache:
            cache[path] = read_latents(path)
        return cache[path]

    for item in items:
        reference = matched[item.id]
        if item.latents is None or reference.latents is None:
            which = "it" if item.latents is None else f"its reference {reference.id!r}"
            logger.warning("%s: %s has no 'latents' file, so its latent MSE stays empty (give each line a "
                           "\"latents\" .safetensors)", item.id, which)
            columns[item.id] = dict.fromkeys(LATENT_COLUMNS)
            continue
        mse, relative = latent_mse(load(item.latents), load(reference.latents), f"{item.id}'s latents")
        columns[item.id] = {"latent_mse": mse, "latent_rel_mse": relative}
    return columns


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def compare_table(rows: Sequence[dict[str, Any]], reference_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (a row's ``config``, else ``all``), the reference first: ``config``, ``videos`` and the mean of each of
    :data:`COLUMNS` over that configuration's rows (the reference's latent MSEs are 0 by definition)."""
    table = [{"config": REFERENCE_CONFIG, "videos": len(reference_rows),
              **{c: _mean([r.get(c) for r in reference_rows]) for c in METRICS},
              **dict.fromkeys(LATENT_COLUMNS, 0.0)}]
    configs = list(dict.fromkeys(row.get("config") or "all" for row in rows))
    for config in configs:
        mine = [row for row in rows if (row.get("config") or "all") == config]
        table.append({"config": config, "videos": len(mine), **{c: _mean([r.get(c) for r in mine]) for c in COLUMNS}})
    return table


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def write_compare(out: Path, table: list[dict[str, Any]], reference: str) -> list[Path]:
    """compare.csv, compare.md and chart_compare.png (without matplotlib: no chart, a warning) -> the paths."""
    header = ["config", "videos", *COLUMNS]
    with atomic_path(out / "compare.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in table:
            writer.writerow([row["config"], row["videos"], *(_cell(row[c]) for c in COLUMNS)])
    lines = [f"Compared with the reference set {reference} (same seed, prompt and image prompt); means per "
             "configuration.", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join([str(row["config"]), str(row["videos"]), *(_cell(row[c]) or "-" for c in COLUMNS)])
              + " |" for row in table]
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    written = [out / "compare.csv", out / "compare.md"]
    chart = _write_chart(out, table)
    return written + ([chart] if chart else [])


def _write_chart(out: Path, table: list[dict[str, Any]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("the comparison chart skipped: it needs matplotlib (`pip install videobooth[eval]`)")
        return None
    from .report import LABELS

    shown = [c for c in COLUMNS if any(row[c] is not None for row in table)]
    names = [row["config"] for row in table]
    figure, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), dpi=100, squeeze=False)
    for axis, column in zip(axes[0], shown):
        values = [row[column] if row[column] is not None else 0.0 for row in table]
        axis.bar(range(len(names)), values, color=["#dd8452"] + ["#4c72b0"] * (len(names) - 1))
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axis.set_title({**LABELS, **LATENT_LABELS}[column], fontsize=9)
    figure.tight_layout()
    path = out / "chart_compare.png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Title": "comparison with the reference set",
                                                     "Description": "configurations: " + ", ".join(names)})
    plt.close(figure)
    return path
