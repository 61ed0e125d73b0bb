"""Reading the start of a video for the command line and batch jobs: ``--start-image IMG`` (image-to-video) and
``--extend VIDEO`` (continue a video from its last frames). The frames become the request's ``start_frames``;
the core holds them at every step (:mod:`videobooth_core.sampling.known_frames`)."""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import numpy as np
import torch

from ..errors import SamplingError, explain

VIDEO_READ_SUFFIXES = (".mp4", ".gif", ".webp", ".png", ".jpg", ".jpeg")


def start_frames_from(start_image: str | Path | None, extend: str | Path | None, extend_frames: int) -> torch.Tensor | None:
    """The (n, H, W, 3) uint8 frames a video starts with: the start image (n = 1), the last ``extend_frames``
    frames of the video to extend, or None. Both at once is an error (an extension starts with its video)."""
    if start_image is not None and extend is not None:
        raise SamplingError("--start-image and --extend both set the video's first frames; give one (an extension "
                            "starts with the last frames of the video it continues)")
    if start_image is not None:
        from ..conditioning.image_prompt import load_image

        _exists(start_image, "--start-image")
        return load_image(start_image)[None]
    if extend is not None:
        return read_last_frames(extend, extend_frames)
    return None


def read_last_frames(path: str | Path, count: int) -> torch.Tensor:
    """The last ``count`` frames (n, H, W, 3) uint8 of a video: .mp4 (ffmpeg of the imageio-ffmpeg wheel), an
    animated .gif or .webp, a folder of frames (sorted by name), or a single image."""
    path = _exists(path, "--extend")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise SamplingError(explain("--extend: the folder holds no .png or .jpg frames", path,
                                        "give a video file or a folder of frames"))
        from ..conditioning.image_prompt import load_image

        return torch.stack([load_image(p) for p in files[-count:]])
    suffix = path.suffix.lower()
    if suffix not in VIDEO_READ_SUFFIXES:
        raise SamplingError(explain("--extend reads .mp4, .gif, .webp, images or a folder of frames; got", path.name,
                                    "convert the video to .mp4 or PNG frames"))
    try:
        if suffix == ".mp4":
            frames = _read_mp4(path, count)
        else:
            from PIL import Image, ImageSequence

            with Image.open(path) as image:  # only the last frames are kept: a long video never fills memory
                frames = deque((np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)),
                               maxlen=count)
    except OSError as error:  # a corrupt file: one line; ffmpeg's banner and report go to the log only
        logging.getLogger(__name__).info("--extend %s: %s", path, error)
        raise SamplingError(explain("--extend: cannot read the video (corrupt or not a video)", str(path),
                                    "give a complete .mp4, .gif or .webp, or a folder of frames (-v logs the "
                                    "decoder's message)")) from None
    if not frames:
        raise SamplingError(explain("--extend: no frames could be read from", path, "check the file"))
    return torch.from_numpy(np.stack(list(frames))).contiguous()


def _read_mp4(path: Path, count: int) -> deque[np.ndarray]:
    try:
        import imageio_ffmpeg
    except ImportError:
        raise SamplingError("reading .mp4 needs the imageio-ffmpeg package: `pip install imageio-ffmpeg` "
                            "(or give the frames as .gif, .webp or a folder of PNGs)") from None
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return deque((np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3) for frame in reader), maxlen=count)


def _exists(path: str | Path, flag: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise SamplingError(explain(f"{flag}: no such file", str(path), "check the path"))
    return path
