"""Best-of-N generation: the same request with N seeds (seed, seed + 1, ...), each video scored, ranked by one
metric. Each candidate is an ordinary generation, so its seed alone reproduces its video.

    ranked = generate_best_of(pipe, request, n=4, rank_by="dino", scorer=scorer)
    ranked[0].result.frames, ranked[0].seed, ranked[0].scores
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EvaluationError
from ..settings import MAX_BEST_OF, MAX_SEED
from .metrics import RANK_CHOICES, Scorer, rank_key


@dataclass
class Candidate:
    """One of the N videos: its seed, its scores and the generation result."""

    seed: int
    scores: dict[str, float | None]
    result: Any


def candidate_seeds(seed: int, n: int) -> list[int]:
    """The N seeds tried: seed, seed + 1, ... (wrapping at 2**64, like the ComfyUI sampler's batch)."""
    if not isinstance(n, int) or n < 1:
        raise EvaluationError(f"best-of needs a whole number of candidates of at least 1, got {n!r}")
    return [(seed + i) % (MAX_SEED + 1) for i in range(n)]


def check_best_of(n: Any, rank_by: Any, has_image: bool) -> tuple[int, str]:
    """``(n, rank_by)`` checked before any model loads: ``n`` a whole number >= 1, ``rank_by`` one of
    :data:`RANK_CHOICES`, and with ``n > 1`` an image prompt for the metrics that compare with it."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BEST_OF:
        raise EvaluationError(f"best-of needs a whole number of candidates, at least 1 and at most {MAX_BEST_OF} "
                              f"(each is a whole generation), got {n!r}; e.g. 4")
    if not isinstance(rank_by, str) or rank_by not in RANK_CHOICES:
        raise EvaluationError(f"unknown ranking metric {rank_by!r}; choose one of {', '.join(RANK_CHOICES)}")
    if n > 1 and RANK_CHOICES[rank_by] != "clip_t" and not has_image:
        raise EvaluationError(f"ranking by {rank_by} compares the video with the image prompt, and there is none; "
                              "give an image and its word, or rank by clip-t")
    return n, rank_by


def rank(scores: list[dict[str, float | None]], rank_by: str) -> list[int]:
    """Indices of ``scores`` from best to worst by ``rank_by`` (ties keep the earlier seed first)."""
    key = rank_key(rank_by)
    if any(s.get(key) is None for s in scores):
        raise EvaluationError(f"cannot rank by {rank_by!r}: it was not computed (it needs "
                              f"{'a prompt' if key == 'clip_t' else 'an image prompt'} and its metric model)")
    return sorted(range(len(scores)), key=lambda i: -scores[i][key])


def generate_best_of(pipe: Any, request: Any, n: int, rank_by: str, scorer: Scorer,
                     callback: Any = None) -> list[Candidate]:
    """Generate ``request`` with N seeds and return the candidates ranked best first by ``rank_by``
    (``dino``, ``clip-i`` or ``clip-t``), each with its seed, scores and :class:`GenerationResult`."""
    check_best_of(n, rank_by, request.image is not None)
    reference = None
    if request.image is not None:  # the photo as the generation prepares it (once per request)
        from ..conditioning.subjects import prepare_photo

        prepared = prepare_photo(request, request.image, request.mask, request.bbox)
        reference = prepared.square.permute(1, 2, 0)
    candidates = []
    for seed in candidate_seeds(request.seed, n):
        result = pipe.generate(dataclasses.replace(request, seed=seed), callback=callback)
        scores = scorer.score(result.frames, reference, request.prompt)
        candidates.append(Candidate(seed, scores, result))
    order = rank([c.scores for c in candidates], rank_by)
    return [candidates[i] for i in order]


def split_videos(frames: torch.Tensor, frames_per_video: int) -> list[torch.Tensor]:
    """(videos * frames, H, W, 3) -> one (frames, H, W, 3) tensor per video (ComfyUI's batch layout)."""
    if frames_per_video < 1 or frames.shape[0] % frames_per_video:
        raise EvaluationError(f"{frames.shape[0]} frames do not split into videos of {frames_per_video} frames; set "
                              "frames per video to the sampler's frames")
    return list(frames.split(frames_per_video))
