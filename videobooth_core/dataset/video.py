"""Video decoding and writing through PyAV (its wheels ship FFmpeg's libraries: no system ffmpeg is needed),
and the official training reader's frame sampling.

Frames are ``(T, H, W, 3)`` uint8 RGB. Frame counts are counted by decoding (a container's own frame count is
missing or wrong for many files), so the count and the indices always agree with what decoding yields.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..errors import DatasetError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
WINDOW = 64
"""The official ``TemporalRandomCrop`` size: 16 frames x frame interval 4."""
CLIP_FRAMES = 16


@dataclass(frozen=True)
class VideoInfo:
    """What decoding a video yields: number of frames, width, height and frames per second."""

    frames: int
    width: int
    height: int
    fps: float


def _av():
    try:
        import av
    except ImportError:
        raise DatasetError("reading videos needs PyAV: `pip install av` (its wheels ship their own FFmpeg)") from None
    return av


def _open(path: str | os.PathLike):
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"video file not found: '{path}'; check the path")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the video '{path}' ({exc}); use a valid video file (mp4, mkv, webm, ...)") from exc
    if not container.streams.video:
        container.close()
        raise DatasetError(f"'{path}' has no video stream; use a video file")
    return container


def _decoded(path: str | os.PathLike) -> Iterable[np.ndarray]:
    """Yield every frame of the first video stream as (H, W, 3) uint8 RGB; decoding errors become DatasetError."""
    av = _av()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise DatasetError(f"the video '{path}' is broken ({exc}); re-encode or remove it") from exc
    finally:
        container.close()


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Decode the whole video once to count its frames (and read its size and frame rate)."""
    container = _open(path)
    try:
        rate = container.streams.video[0].average_rate
        fps = float(rate) if rate else 0.0
    finally:
        container.close()
    count, shape = 0, None
    for frame in _decoded(path):
        count += 1
        shape = frame.shape
    if count == 0 or shape is None:
        raise DatasetError(f"the video '{path}' has no decodable frame; re-encode or remove it")
    return VideoInfo(frames=count, width=int(shape[1]), height=int(shape[0]), fps=fps)


def read_frames(path: str | os.PathLike, indices: Sequence[int]) -> torch.Tensor:
    """Decode the frames at ``indices`` (any order, repeats allowed) -> (len(indices), H, W, 3) uint8.

    Decodes sequentially up to the largest index and keeps only the wanted frames (videos are short clips);
    an index past the end raises DatasetError.
    """
    if len(indices) == 0:
        raise DatasetError("read_frames needs at least one frame index")
    wanted = set(int(i) for i in indices)
    if min(wanted) < 0:
        raise DatasetError(f"frame indices must be >= 0; got {min(wanted)}")
    kept: dict[int, np.ndarray] = {}
    last = max(wanted)
    for number, frame in enumerate(_decoded(path)):
        if number in wanted:
            kept[number] = frame
        if number >= last:
            break
    if last not in kept:
        raise DatasetError(f"the video '{path}' has fewer than {last + 1} decodable frames; frame {last} was asked "
                           "for (rebuild the entry or re-encode the video)")
    return torch.from_numpy(np.stack([kept[int(i)] for i in indices]))


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


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, crf: int = 18) -> None:
    """Write (T, H, W, 3) uint8 RGB frames as H.264 (yuv420p) in the container named by the suffix (.mp4, .mkv).

    Odd sizes are refused (yuv420p needs even width and height). Deterministic: the same frames give the same
    bytes (single-threaded encoder, no timestamps from the clock).
    """
    av = _av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise DatasetError(f"frames must be (T, H, W, 3) uint8; got {frames.shape} {frames.dtype}")
    height, width = int(frames.shape[1]), int(frames.shape[2])
    if height % 2 or width % 2:
        raise DatasetError(f"H.264 needs even frame sizes; got {width}x{height}: crop or pad by one pixel")
    from fractions import Fraction

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
