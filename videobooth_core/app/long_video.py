"""Reading the start of a video for the command line and batch jobs: ``--start-image IMG`` (image-to-video) and
``--extend VIDEO`` (continue a video from its last frames). The frames become the request's ``start_frames``;
the core holds them at every step (:mod:`videobooth_core.sampling.known_frames`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .. import video_io
from ..errors import SamplingError, VideoError, explain
from ..settings import flag_names
from ..video_io import READ_SUFFIXES


def start_frames_from(start_image: str | Path | None, extend: str | Path | None, extend_frames: int,
                      names: Callable[[str], str] = flag_names) -> torch.Tensor | None:
    """The (n, H, W, 3) uint8 frames a video starts with: the start image (n = 1), the last ``extend_frames``
    frames of the video to extend, or None. Both at once is an error (an extension starts with its video).
    ``names``: how the caller's road names ``start_image`` and ``extend`` (the flags by default)."""
    if start_image is not None and extend is not None:
        raise SamplingError(f"{names('start_image')} and {names('extend')} both set the video's first frames; give "
                            "one (an extension starts with the last frames of the video it continues)")
    if start_image is not None:
        from ..conditioning.image_prompt import load_image

        _exists(start_image, names("start_image"))
        return load_image(start_image)[None]
    if extend is not None:
        return read_last_frames(extend, extend_frames, names("extend"))
    return None


def read_last_frames(path: str | Path, count: int, name: str = "--extend") -> torch.Tensor:
    """The last ``count`` frames (n, H, W, 3) uint8 of a video: any video :mod:`videobooth_core.video_io` reads
    (.mp4 and other containers, an animated .gif or .webp, a folder of frames sorted by name, a single image).
    ``name``: the input's name in messages."""
    path = _exists(path, name)
    if path.is_file() and path.suffix.lower() not in READ_SUFFIXES:
        raise SamplingError(explain(f"{name} reads .mp4, .gif, .webp, images or a folder of frames; got", path.name,
                                    "convert the video to .mp4 or PNG frames"))
    try:
        return video_io.read_last_frames(path, count)
    except VideoError as error:
        raise SamplingError(f"{name}: {error}") from error


def _exists(path: str | Path, flag: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise SamplingError(explain(f"{flag}: no such file", str(path), "check the path"))
    return path
