"""Drift: how the likeness of each frame to the image prompt changes across a video.

Long videos (sliding context windows, extensions) can lose the subject over time; the video's DINO or CLIP-I score,
a mean over frames, hides that. The drift readout keeps the per-frame values and sums them up in figures a user
reads at a glance::

    DINO likeness over 64 frames: first 0.812, last 0.701 (-0.111), lowest 0.690 at frame 57,
    trend -0.028 per 16 frames

The curve is DINO (cosine of ViT-S/16 CLS embeddings, 0..1) when DINO is loaded - the paper's and DreamBooth's
subject-fidelity metric, less swayed by background and style than CLIP - else CLIP-I (100 x cosine of CLIP image
embeddings). Its mean is the video's ``dino`` / ``clip_i`` score (CLIP-I before torchmetrics' clamp at 0). The
embeddings, their preprocessing and the metric models are :class:`~.metrics.Scorer`'s; nothing is computed twice.

The trend is the least-squares slope of likeness over frame index, times :data:`TREND_FRAMES` (one VideoBooth
window, 2 s at 8 fps): steadier than last - first, which two odd frames can swing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EvaluationError, explain
from .metrics import Scorer

DRIFT_METRICS = ("dino", "clip_i")
"""The likeness metrics a drift curve can use, preferred first."""
METRIC_CHOICES = {"auto": None, "dino": "dino", "clip-i": "clip_i"}
"""Metric choices (node combo) -> score key; ``auto`` is DINO when loaded, else CLIP-I."""
TREND_FRAMES = 16
"""The trend is given per this many frames (one VideoBooth window: 2 s at 8 fps)."""
NAMES = {"dino": "DINO", "clip_i": "CLIP-I"}
AXIS_LABELS = {"dino": "DINO likeness to the image prompt (cosine)",
               "clip_i": "CLIP-I likeness to the image prompt (x100)"}
DIGITS = {"dino": 3, "clip_i": 2}
MIN_SPAN = {"dino": 0.1, "clip_i": 5.0}
"""The plot's y axis spans at least this much, so a steady video does not look like a drifting one."""


@dataclass(frozen=True)
class Drift:
    """The per-frame likeness of one video to its image prompt and its summary figures.

    ``per_frame`` holds one value per frame, frame 0 first: DINO cosine (0..1) or CLIP-I (x100, not clamped).
    """

    metric: str
    per_frame: tuple[float, ...]

    @classmethod
    def from_curve(cls, curve: torch.Tensor, metric: str) -> Drift:
        """(n,) per-frame likeness (from :meth:`Scorer.per_frame`) -> its Drift."""
        if metric not in DRIFT_METRICS:
            raise EvaluationError(explain("unknown drift metric", metric, f"use one of {', '.join(DRIFT_METRICS)}"))
        if curve.ndim != 1 or curve.numel() == 0:
            raise EvaluationError(explain("a drift curve needs one value per frame, got shape", tuple(curve.shape),
                                          "pass the (frames,) likeness of a video of at least one frame"))
        return cls(metric, tuple(float(v) for v in curve.double()))

    @property
    def frames(self) -> int:
        return len(self.per_frame)

    @property
    def first(self) -> float:
        return self.per_frame[0]

    @property
    def last(self) -> float:
        return self.per_frame[-1]

    @property
    def change(self) -> float:
        """last - first (negative: the subject drifted away)."""
        return self.last - self.first

    @property
    def lowest_frame(self) -> int:
        """The frame least like the image prompt (the earliest, on ties)."""
        return min(range(self.frames), key=lambda i: self.per_frame[i])

    @property
    def lowest(self) -> float:
        return self.per_frame[self.lowest_frame]

    @property
    def mean(self) -> float:
        """The video's score (``dino``, or ``clip_i`` before its clamp at 0)."""
        return sum(self.per_frame) / self.frames

    @property
    def trend(self) -> float | None:
        """Least-squares slope of likeness over frames x :data:`TREND_FRAMES`; ``None`` for a single frame."""
        import numpy as np

        if self.frames < 2:
            return None
        return float(np.polyfit(np.arange(self.frames), np.asarray(self.per_frame), 1)[0]) * TREND_FRAMES

    def as_dict(self) -> dict[str, Any]:
        """What ``scores.json`` records: the metric, every frame's value and the figures."""
        return {"metric": self.metric, "per_frame": list(self.per_frame), "first": self.first, "last": self.last,
                "change": self.change, "lowest": self.lowest, "lowest_frame": self.lowest_frame, "mean": self.mean,
                f"trend_per_{TREND_FRAMES}_frames": self.trend}

    def summary(self) -> str:
        """One line: first, last (change), lowest and its frame, trend per 16 frames."""
        digits = DIGITS[self.metric]
        trend = "" if self.trend is None else f", trend {self.trend:+.{digits}f} per {TREND_FRAMES} frames"
        return (f"{NAMES[self.metric]} likeness over {self.frames} frame{'s' if self.frames > 1 else ''}: "
                f"first {self.first:.{digits}f}, last {self.last:.{digits}f} ({self.change:+.{digits}f}), "
                f"lowest {self.lowest:.{digits}f} at frame {self.lowest_frame}{trend}")


def drift_metric(scorer: Scorer, choice: str = "auto") -> str:
    """The score key of the drift curve: ``auto`` -> ``dino`` when DINO is loaded, else ``clip_i``;
    ``dino`` / ``clip-i`` ask for one (its model must be loaded)."""
    if choice not in METRIC_CHOICES:
        raise EvaluationError(explain("unknown drift metric", choice, f"choose one of {', '.join(METRIC_CHOICES)}"))
    metric = METRIC_CHOICES[choice] or ("dino" if scorer.dino is not None else "clip_i")
    scorer._need("dino" if metric == "dino" else "clip")
    return metric


def measure_drift(scorer: Scorer, frames: torch.Tensor, image_prompt: torch.Tensor, choice: str = "auto") -> Drift:
    """The drift of one video.

    Args:
        scorer: the metric models.
        frames: (n, H, W, 3) uint8 (or float in [0, 1]) frames of one video.
        image_prompt: (H, W, 3) the prepared image prompt (``PreparedImagePrompt.square`` as (H, W, 3)).
        choice: ``auto``, ``dino`` or ``clip-i`` (see :func:`drift_metric`).

    Returns:
        A :class:`Drift` whose ``per_frame`` has n values.
    """
    if image_prompt is None:
        raise EvaluationError("the drift compares each frame with the image prompt, and there is none; give the "
                              "subject image")
    metric = drift_metric(scorer, choice)
    curve = scorer.per_frame(frames, image_prompt, metrics=(metric,))[metric]
    return Drift.from_curve(curve, metric)


# -- the plot ------------------------------------------------------------------------------------------------
def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; EvaluationError naming the install command without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvaluationError("the drift plot needs matplotlib, which is not installed; `pip install matplotlib` "
                              "(or the pack's eval extra: `pip install .[eval]`)") from None
    return plt


def drift_figure(drifts: Mapping[str, Drift], title: str | None = None) -> Any:
    """A matplotlib figure: one likeness curve per video (frame on x), its lowest frame marked, a grid line every
    :data:`TREND_FRAMES` frames. All curves must share one metric. Needs matplotlib (raises EvaluationError)."""
    if not drifts:
        raise EvaluationError("no drift curve to plot; give at least one video with an image prompt")
    metrics = {d.metric for d in drifts.values()}
    if len(metrics) > 1:
        raise EvaluationError(explain("drift curves of different metrics cannot share an axis", sorted(metrics),
                                      "measure every video with the same metric"))
    plt = pyplot()
    (metric,) = metrics
    longest = max(d.frames for d in drifts.values())
    figure, axes = plt.subplots(figsize=(max(5.0, min(12.0, 3 + longest / 8)), 3.4), dpi=100)
    for name, drift in drifts.items():
        (line,) = axes.plot(range(drift.frames), drift.per_frame, marker="." if drift.frames <= 32 else None,
                            linewidth=1.4, label=name)
        axes.plot([drift.lowest_frame], [drift.lowest], "o", color=line.get_color(), markersize=5)
    axes.set_xlabel("frame")
    axes.set_ylabel(AXIS_LABELS[metric], fontsize=8)
    axes.set_xlim(-0.5, longest - 0.5)
    low = min(d.lowest for d in drifts.values())
    high = max(max(d.per_frame) for d in drifts.values())
    margin = max(MIN_SPAN[metric] - (high - low), 0) / 2 + 0.05 * (high - low)
    axes.set_ylim(low - margin, high + margin)
    axes.set_xticks(range(0, longest, TREND_FRAMES) if longest > TREND_FRAMES else range(longest))
    axes.grid(True, axis="x", alpha=0.4)
    axes.set_title(title or f"{NAMES[metric]} likeness per frame (dot: lowest)", fontsize=10)
    if len(drifts) <= 12:
        axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def drift_plot(drifts: Mapping[str, Drift], title: str | None = None) -> torch.Tensor:
    """:func:`drift_figure` rendered -> (H, W, 3) uint8 RGB."""
    import numpy as np

    plt = pyplot()
    figure = drift_figure(drifts, title)
    try:
        figure.canvas.draw()
        rgba = np.asarray(figure.canvas.buffer_rgba())
    finally:
        plt.close(figure)
    return torch.from_numpy(rgba[..., :3].copy())


def drift_with_plot(scorer: Scorer, frames: torch.Tensor, image_prompt: torch.Tensor,
                    choice: str = "auto") -> tuple[Drift, torch.Tensor]:
    """:func:`measure_drift` and its :func:`drift_plot` ((H, W, 3) uint8), matplotlib and the metric model checked
    before the models run."""
    pyplot()
    drift = measure_drift(scorer, frames, image_prompt, choice)
    return drift, drift_plot({"video": drift})
