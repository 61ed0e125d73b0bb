"""``dataset synthetic``: a tiny generated dataset (textured shapes moving over textured backgrounds, exact masks,
captions naming a class word), for tests, the trainer's tests and demos. Deterministic for a given seed.

``write_sources`` writes builder input (``videos/``, ``captions.jsonl``, ``masks/``); ``make_synthetic`` runs
``build_dataset`` on it with the exact masks, so the result is in exactly the layout a real build writes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import DatasetError
from ..video_io import write_mp4
from . import layout

LENGTHS = (24, 40, 90)
"""Frame counts cycled over the videos: shorter than the 64-frame window, and longer."""
SHAPES = ("ellipse", "rectangle", "diamond")
COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "yellow": (220, 200, 40), "green": (40, 160, 60)}
BACKGROUNDS = ("striped", "checkered", "gradient")


def _background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(60, 200, size=3).astype(np.float32)
    if kind == "striped":
        pattern = 40.0 * np.sin(x / rng.uniform(2.0, 5.0) + y / 7.0)
    elif kind == "checkered":
        pattern = 50.0 * (((x // 8) + (y // 8)) % 2) - 25.0
    else:
        pattern = 80.0 * (x / width - 0.5) + 30.0 * (y / height - 0.5)
    image = base[None, None, :] + pattern[..., None] + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, cx: float, cy: float, rx: float, ry: float, height: int, width: int) -> np.ndarray:
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    if shape == "ellipse":
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    elif shape == "rectangle":
        draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    else:
        draw.polygon([(cx, cy - ry), (cx + rx, cy), (cx, cy + ry), (cx - rx, cy)], fill=1)
    return np.asarray(image, dtype=bool)


def synthetic_video(index: int, seed: int = 0, height: int = 64, width: int = 96,
                    classes: Sequence[str] = layout.DEFAULT_CLASSES) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Video ``index``: frames (T, H, W, 3) uint8, frame-0 mask (H, W) bool, caption, subject word."""
    rng = np.random.default_rng([seed, index])
    frames_count = LENGTHS[index % len(LENGTHS)]
    word = classes[index % len(classes)]
    colour_name = list(COLOURS)[index % len(COLOURS)]
    background_kind = BACKGROUNDS[index % len(BACKGROUNDS)]
    shape = SHAPES[index % len(SHAPES)]
    background = _background(rng, background_kind, height, width)
    rx, ry = rng.uniform(0.12, 0.2) * width, rng.uniform(0.18, 0.3) * height
    start = np.array([rng.uniform(rx, width / 2), rng.uniform(ry, height - ry)])
    end = np.array([rng.uniform(width / 2, width - rx), rng.uniform(ry, height - ry)])
    colour = np.array(COLOURS[colour_name], dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    texture = colour[None, None, :] * (0.75 + 0.25 * np.sign(np.sin(xx / 3.0))[..., None])
    frames, first_mask = [], None
    for t in range(frames_count):
        cx, cy = start + (end - start) * t / max(frames_count - 1, 1)
        mask = _shape_mask(shape, cx, cy, rx, ry, height, width)
        frame = background.copy()
        frame[mask] = np.clip(texture[mask], 0, 255).astype(np.uint8)
        frames.append(frame)
        if first_mask is None:
            first_mask = mask
    caption = f"a {colour_name} {word} moving across a {background_kind} field"
    return np.stack(frames), first_mask, caption, word


def write_sources(folder: str | os.PathLike, videos: int, seed: int = 0, height: int = 64, width: int = 96) -> Path:
    """Write builder input to ``folder``: videos/synth_XXXX.mp4, masks/synth_XXXX.png (exact frame-0 masks),
    captions.jsonl (video, caption, word). Returns ``folder``."""
    if videos < 1:
        raise DatasetError(f"--videos must be >= 1; got {videos}")
    folder = Path(folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(videos):
        frames, mask, caption, word = synthetic_video(index, seed, height, width)
        name = f"synth_{index:04d}"
        write_mp4(folder / "videos" / f"{name}.mp4", frames)
        layout.write_mask_png(torch.from_numpy(mask), folder / "masks" / f"{name}.png")
        lines.append(json.dumps({"video": f"{name}.mp4", "caption": caption, "word": word}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def make_synthetic(out: str | os.PathLike, videos: int, seed: int = 0, height: int = 64, width: int = 96):
    """Write a synthetic dataset in our layout to ``out`` (through the builder, with the exact masks)."""
    from .build import BuildOptions, build_dataset

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".videobooth-synthetic-", dir=out.parent) as tmp:
        sources = write_sources(tmp, videos, seed, height, width)
        return build_dataset(sources / "videos", sources / "captions.jsonl", out,
                             BuildOptions(masks_dir=sources / "masks", progress=False))
