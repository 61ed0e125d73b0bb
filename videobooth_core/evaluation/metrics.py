"""The scores of one video against its image prompt and prompt.

* **CLIP-T**: max(0, mean over frames of 100 x cos(CLIP text embedding of the prompt, CLIP image embedding of the
  frame)) - torchmetrics' ``CLIPScore`` (clamped at 0 after the mean, as it does; a real CLIP never comes near 0);
* **CLIP-I**: the same between the prepared image prompt and each frame (x100, the paper's scale);
* **DINO**: mean over frames of cos(DINO CLS embedding of the image prompt, of the frame) (0..1; the paper prints
  it x100);
* **consistency**: VBench ``subject_consistency``: mean over frames i >= 1 of
  (max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2 on DINO features (stability, not likeness).

Frames and images are ``(n, H, W, 3)`` / ``(H, W, 3)`` uint8; each model's own image processor prepares them.

:meth:`Scorer.per_frame` gives each metric frame by frame (the drift readout, drift.py, uses it); a score is
the mean of its frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import EvaluationError
from .models import ClipForMetrics, DinoForMetrics

METRICS = ("clip_t", "clip_i", "dino", "consistency")
RANK_CHOICES = {"dino": "dino", "clip-i": "clip_i", "clip-t": "clip_t"}
"""``--rank-by`` values and the score each ranks by."""
FRAME_CHUNK = 16
"""Frames per model call (bounds memory on long videos)."""


def _features(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4.x and the projected ``pooler_output`` in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _as_uint8_frames(frames: torch.Tensor, what: str) -> torch.Tensor:
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise EvaluationError(f"{what} must be (frames, height, width, 3) RGB, got shape {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:  # [0, 1] floats (ComfyUI's IMAGE) to the uint8 levels the processors expect
        frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return frames.cpu()


def _images(frames: torch.Tensor) -> list:
    return [frame.numpy() for frame in frames]


def _unit_image_embeddings(
    frames: torch.Tensor, image_processor: Any, embed: Callable[[torch.Tensor], torch.Tensor], device: torch.device
) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, d) float32 unit embeddings, ``FRAME_CHUNK`` frames a model call: the model's own
    ``image_processor`` prepares them, ``embed`` maps (chunk, 3, h, w) pixels on ``device`` to (chunk, d)."""
    parts = []
    for start in range(0, frames.shape[0], FRAME_CHUNK):
        pixels = image_processor(images=_images(frames[start:start + FRAME_CHUNK]), return_tensors="pt")["pixel_values"]
        parts.append(embed(pixels.to(device)).float().cpu())
    embeddings = torch.cat(parts)
    return embeddings / embeddings.norm(dim=-1, keepdim=True)


class Scorer:
    """Scores videos with whichever metric models it was given (a metric whose model is absent is ``None``)."""

    def __init__(self, clip: ClipForMetrics | None = None, dino: DinoForMetrics | None = None) -> None:
        if clip is None and dino is None:
            raise EvaluationError("a Scorer needs at least one metric model: a full CLIP (CLIP-T, CLIP-I) or DINO "
                                  "(DINO, consistency)")
        self.clip, self.dino = clip, dino

    # -- embeddings: (n, d) float32, unit length ----------------------------------------------------------
    @torch.no_grad()
    def clip_image_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, d) unit CLIP image embeddings (projected)."""
        model = self._need("clip").model
        return _unit_image_embeddings(frames, self.clip.image_processor,
                                      lambda pixels: _features(model.get_image_features(pixel_values=pixels)),
                                      next(model.parameters()).device)

    @torch.no_grad()
    def clip_text_embedding(self, prompt: str) -> torch.Tensor:
        """The prompt -> (1, d) unit CLIP text embedding (projected; cut at the model's positions, as torchmetrics)."""
        model = self._need("clip").model
        device = next(model.parameters()).device
        tokens = self.clip.tokenizer([prompt], padding=True, truncation=True,
                                     max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        output = model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                         attention_mask=tokens["attention_mask"].to(device))
        embedding = _features(output).float().cpu()
        return embedding / embedding.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def dino_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, d) unit DINO CLS embeddings (after the final layer norm)."""
        model = self._need("dino").model
        return _unit_image_embeddings(frames, self.dino.image_processor,
                                      lambda pixels: model(pixel_values=pixels).last_hidden_state[:, 0],
                                      next(model.parameters()).device)

    def _need(self, which: str) -> Any:
        model = getattr(self, which)
        if model is None:
            what = "a full CLIP (--clip, or clip_eval/ in the models folder)" if which == "clip" else \
                "DINO ViT-S/16 (--dino, or dino/ in the models folder)"
            raise EvaluationError(f"this metric needs {what}, which was not loaded")
        return model

    # -- the scores ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def per_frame(self, frames: torch.Tensor, image_prompt: torch.Tensor | None = None, prompt: str | None = None,
                  metrics: Sequence[str] = METRICS) -> dict[str, torch.Tensor | None]:
        """Each metric frame by frame, from one embedding pass per model; a metric not asked for, or without its
        input or model, is ``None``.

        Args:
            frames: (n, H, W, 3) uint8 (or float in [0, 1]) frames of one video.
            image_prompt: (H, W, 3) the prepared image prompt (``PreparedImagePrompt.square`` as (H, W, 3)).
            prompt: the prompt with the subject word as written.
            metrics: which of :data:`METRICS` to compute.

        Returns:
            float32 CPU tensors: ``clip_t`` and ``clip_i`` (n,) 100 x cos, not clamped; ``dino`` (n,) cos in
            [-1, 1]; ``consistency`` (n - 1,) VBench's term of frames 1..n-1 (``None`` for a single frame).
            :meth:`score` is their mean (CLIP ones clamped at 0 after it, as torchmetrics).
        """
        frames = _as_uint8_frames(frames, "the video's frames")
        curves: dict[str, torch.Tensor | None] = dict.fromkeys(METRICS)
        has_image = image_prompt is not None
        want_clip_t, want_clip_i = "clip_t" in metrics and bool(prompt), "clip_i" in metrics and has_image
        want_dino, want_consistency = "dino" in metrics and has_image, "consistency" in metrics
        if self.clip is not None and (want_clip_t or want_clip_i):
            frame_clip = self.clip_image_embeddings(frames)
            if want_clip_t:
                curves["clip_t"] = 100 * frame_clip @ self.clip_text_embedding(prompt)[0]
            if want_clip_i:
                reference = self.clip_image_embeddings(_as_uint8_frames(image_prompt, "the image prompt"))
                curves["clip_i"] = 100 * frame_clip @ reference[0]
        if self.dino is not None and (want_dino or want_consistency):
            frame_dino = self.dino_embeddings(frames)
            if want_dino:
                reference = self.dino_embeddings(_as_uint8_frames(image_prompt, "the image prompt"))
                curves["dino"] = frame_dino @ reference[0]
            if want_consistency:
                curves["consistency"] = consistency_per_frame(frame_dino)
        return curves

    def score(self, frames: torch.Tensor, image_prompt: torch.Tensor | None = None,
              prompt: str | None = None) -> dict[str, float | None]:
        """{clip_t, clip_i, dino, consistency} of one video; a score without its input or model is ``None``.

        Args:
            frames: (n, H, W, 3) uint8 (or float in [0, 1]) frames of one video.
            image_prompt: (H, W, 3) the prepared image prompt (``PreparedImagePrompt.square`` as (H, W, 3)).
            prompt: the prompt with the subject word as written.
        """
        return video_scores(self.per_frame(frames, image_prompt, prompt))


def video_scores(curves: dict[str, torch.Tensor | None]) -> dict[str, float | None]:
    """The per-frame scores of :meth:`Scorer.per_frame` -> one score per metric: the mean over frames, CLIP-T and
    CLIP-I clamped at 0 after it (torchmetrics' ``CLIPScore``)."""
    scores: dict[str, float | None] = dict.fromkeys(METRICS)
    for key, curve in curves.items():
        if curve is not None:
            scores[key] = max(float(curve.mean()), 0.0) if key in ("clip_t", "clip_i") else float(curve.mean())
    return scores


def consistency_per_frame(features: torch.Tensor) -> torch.Tensor | None:
    """VBench's ``subject_consistency`` term of each frame i >= 1 of unit DINO features (n, d):
    (max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2 -> (n - 1,); ``None`` for a single frame."""
    if features.shape[0] < 2:
        return None
    previous = (features[1:] * features[:-1]).sum(-1).clamp(min=0)
    first = (features[1:] @ features[0]).clamp(min=0)
    return (previous + first) / 2


def rank_key(rank_by: str) -> str:
    """The score key of a ``--rank-by`` value (``dino``, ``clip-i``, ``clip-t``; the score keys also work)."""
    key = RANK_CHOICES.get(rank_by, rank_by)
    if key not in RANK_CHOICES.values():
        raise EvaluationError(f"unknown ranking metric {rank_by!r}; choose one of {', '.join(RANK_CHOICES)}")
    return key


def mean_scores(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Each metric averaged over the rows that have it (``None`` when none has)."""
    means: dict[str, float | None] = {}
    for key in METRICS:
        values = [row[key] for row in rows if row.get(key) is not None and not math.isnan(row[key])]
        means[key] = sum(values) / len(values) if values else None
    return means
