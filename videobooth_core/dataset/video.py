"""The official training reader's frame sampling, and the videos the dataset tools accept.

Decoding and writing are :mod:`videobooth_core.video_io`'s (PyAV and Pillow); frames are ``(T, H, W, 3)`` uint8.
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np

from ..errors import DatasetError
from ..video_io import CONTAINER_SUFFIXES

VIDEO_SUFFIXES = CONTAINER_SUFFIXES + (".gif",)
"""Source videos ``dataset build`` takes from a folder."""
WINDOW = 64
"""The official ``TemporalRandomCrop`` size: 16 frames x frame interval 4."""
CLIP_FRAMES = 16


def sample_window(num_frames: int, rng: Optional[random.Random] = None, clip_frames: int = CLIP_FRAMES,
                  window: int = WINDOW) -> list[int]:
    """The official ``TemporalRandomCrop(64)`` + ``linspace`` frame choice.

    start is uniform in ``[0, max(0, T - window - 1)]`` (both ends included), ``end = min(start + window, T)``,
    and the ``clip_frames`` indices are ``linspace(start, end - 1, clip_frames)`` truncated to int (a video
    shorter than the window repeats frames). ``rng`` defaults to Python's global ``random``.
    """
    if num_frames < 1:
        raise DatasetError(f"a video needs at least one frame to sample from; got {num_frames}")
    rng = rng or random
    start = rng.randint(0, max(0, num_frames - window - 1))
    end = min(start + window, num_frames)
    return [int(i) for i in np.linspace(start, end - 1, clip_frames).astype(int)]
