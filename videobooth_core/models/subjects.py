"""Several subjects in frame 0's cross-frame attention (the fine image prompt, generalised).

One subject is the official computation: frame 0's queries attend to [image-prompt tokens ; frame-0 tokens] and
the result ``u`` replaces frame 0's values ``v0`` (blended ``v0 + s * (u - v0)`` for a strength ``s != 1``).

With several subjects each one's update is computed *separately*, exactly as the trained model computes it for
one exemplar (frame 0 against [subject i's tokens ; frame-0 tokens]), and the updates are added:

    v0' = v0 + sum_i s_i * m_i * (u_i - v0)

``s_i`` is the subject's strength and ``m_i`` an optional region weight per token (the share of each token's
cell that the subject's box covers, see :func:`region_token_weights`). A subject with strength 0 is skipped
entirely, and when a single subject with no region is left the official arithmetic is used, so removing a
subject by its strength gives exactly the result without it. (Why not one softmax over every subject's tokens:
see the README, *Several subjects*.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Region = tuple[float, float, float, float]
"""(x1, y1, x2, y2) as fractions of the video frame (0 = left/top, 1 = right/bottom), x1 < x2, y1 < y2."""
FULL_FRAME: Region = (0.0, 0.0, 1.0, 1.0)


def region_token_weights(region: Region | None, height: int, width: int, device: torch.device | str,
                         dtype: torch.dtype) -> torch.Tensor | None:
    """Per-token weights of ``region`` on a (height, width) token grid: the fraction of each token's cell that the
    box covers (1 inside, 0 outside, partial on the edges), i.e. the box's indicator area-averaged to the grid,
    so every attention site (latent size, /2, /4, /8) sees the same box.

    Returns:
        (1, height * width, 1) in ``dtype`` (broadcast over frames-0 batch and channels), or None for no region.
    """
    if region is None or tuple(region) == FULL_FRAME:
        return None
    x1, y1, x2, y2 = (float(v) for v in region)

    def coverage(low: float, high: float, cells: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float64) / cells
        return ((torch.minimum(edges[1:], torch.tensor(high)) - torch.maximum(edges[:-1], torch.tensor(low)))
                .clamp(min=0.0) * cells).clamp(max=1.0)

    weights = coverage(y1, y2, height)[:, None] * coverage(x1, x2, width)[None, :]
    return weights.reshape(1, height * width, 1).to(device=device, dtype=dtype)


def active_subjects(strengths: Sequence[float]) -> list[int]:
    """Indices of the subjects that contribute (strength not 0): the others are never computed."""
    return [i for i, strength in enumerate(strengths) if float(strength) != 0.0]


def combine_subject_updates(
    attn: Any,
    first_query: torch.Tensor,
    first_key: torch.Tensor,
    first_value: torch.Tensor,
    image_prompt_states: Sequence[torch.Tensor],
    strengths: Sequence[float],
    region_weights: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Frame 0's values after every subject's update (module docstring).

    Args:
        attn: the ``attn1`` :class:`~.attention.Attention` (its ``image_prompt_key_value`` and ``attend``).
        first_query: (b, n, c) frame 0's queries; first_key / first_value: (b, n, c) frame 0's keys and values.
        image_prompt_states: per subject (b, m, c) image-prompt tokens at this site.
        strengths: per subject; 0 skips the subject.
        region_weights: per subject (1, n, 1) token weights or None (everywhere); None for no regions at all.

    Returns:
        (b, n, c) updated frame-0 values.
    """
    weights = list(region_weights) if region_weights is not None else [None] * len(image_prompt_states)
    active = active_subjects(strengths)
    projection = attn.image_prompt_key_value

    def update(i: int) -> torch.Tensor:
        states = image_prompt_states[i]
        return attn.attend(first_query, torch.cat([projection.key(states), first_key], dim=1),
                           torch.cat([projection.value(states), first_value], dim=1))

    if len(active) == 1 and weights[active[0]] is None:  # one subject left: the official arithmetic, bit for bit
        strength = float(strengths[active[0]])
        updated = update(active[0])
        return updated if strength == 1.0 else first_value + strength * (updated - first_value)
    total = None
    for i in active:
        change = float(strengths[i]) * (update(i) - first_value)
        if weights[i] is not None:
            change = change * weights[i]
        total = change if total is None else total + change
    return first_value if total is None else first_value + total
