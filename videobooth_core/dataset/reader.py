"""Training samples from our layout (``OurDataset``) or the official VideoBooth subset (``OfficialSubset``).

A sample (a dict) holds:

* ``video``: (3, 16, 256, 256) float32 in [-1, 1] (channels, frames, height, width: the project's (c f h w)),
  the official reader's frames: a 64-frame window at a random start, 16 indices evenly spaced (``sample_window``),
  random horizontal flip (p 0.5, ``flip=False`` turns it off), center crop on the short side, bilinear resize
  (align_corners False, no antialias), (x - 0.5) / 0.5;
* ``frame_indices``: (16,) int64; ``flip``: bool, whether the clip was flipped; ``box``: (4,) float32 detector box
  (x1, y1, x2, y2) of the chosen subject; with ``read_clip=False`` the same draws are made but only frame 0 is
  decoded and ``video`` is None (the trainer's ``--cache`` holds the clip's VAE posteriors);
* ``image_prompt_clip``: (3, 224, 224) float32, CLIP-normalised, and ``image_prompt_vae``: (3, 256, 256) float32 in
  [-1, 1]: ``prepare_image_prompt`` (the inference preprocessing itself) on frame 0 of the WHOLE video, its mask
  and its box (never shrunk); ``image_prompt_clip_augmented``: the official training augmentation of the CLIP input
  (h-flip 0.5, RandomAffine +-30 deg, translate (0, 0.1), scale 0.8-1.2, fill white, nearest);
* ``caption`` (str), ``word`` (str, the subject word = the mask label), ``id`` (str);
* stage 2, as the official stage-2 dataset: the box is shrunk first (``box_shrunk``, (4,) float32: exactly one
  side, picked uniformly, moves in by U(1 %, 20 %) of the box, ``shrink_box``) and BOTH augmented prompts are cut
  with it: ``image_prompt_clip_augmented`` as above and ``image_prompt_vae_augmented``: (3, 256, 256) in [-1, 1],
  its own h-flip 0.5 and RandomAffine +-30 deg, translate (0.1, 0.1), scale 0.8-1.2, fill white (frame 0 of the
  stage-2 video tensor in the official trainer).

Randomness: with ``seed=None`` each sample draws from torch's global generator (seeded per DataLoader worker);
with an integer seed, sample ``i`` is the same every time it is read.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import DatasetError
from ..video_io import read_frames
from . import layout
from .video import CLIP_FRAMES, WINDOW, sample_window

logger = logging.getLogger(__name__)

SIZE = 256


@dataclass(frozen=True)
class Record:
    """Where one training video lives: its file, its Grounded-SAM mask folder, caption, optional word/frames."""

    id: str
    video: Path
    mask_dir: Path
    caption: str
    word: Optional[str] = None
    frames: Optional[int] = None


def video_transform(frames: torch.Tensor, flip: bool, size: int = SIZE) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, size, size) float32 in [-1, 1], the official training transform order:
    /255, optional horizontal flip, center crop on the short side, bilinear resize (align_corners False)."""
    clip = frames.permute(0, 3, 1, 2).float() / 255.0
    if flip:
        clip = clip.flip(-1)
    height, width = int(clip.shape[-2]), int(clip.shape[-1])
    side = min(height, width)
    top = int(round((height - side) / 2.0)) if height > side else 0
    left = int(round((width - side) / 2.0)) if width > side else 0
    clip = clip[..., top : top + side, left : left + side]
    clip = F.interpolate(clip, size=(size, size), mode="bilinear", align_corners=False)
    return ((clip - 0.5) / 0.5).permute(1, 0, 2, 3).contiguous()


def shrink_box(box: Sequence[float], rng: random.Random, low: float = 0.01,
               high: float = 0.2) -> tuple[float, float, float, float]:
    """Stage-2 bbox augmentation, as the official stage-2 dataset: exactly one side moves inwards, every time.

    One uniform draw picks the side (top, bottom, left, right: probability 0.25 each), a second the amount,
    U(low, high) of the box's height (top/bottom) or width (left/right)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = x2 - x1, y2 - y1
    side = rng.random()
    amount = rng.uniform(low, high)
    if side < 0.25:
        y1 += height * amount
    elif side < 0.5:
        y2 -= height * amount
    elif side < 0.75:
        x1 += width * amount
    else:
        x2 -= width * amount
    return x1, y1, x2, y2


def random_affine(levels: torch.Tensor, rng: random.Random, translate: tuple[float, float],
                  degrees: float = 30.0, scale: tuple[float, float] = (0.8, 1.2)) -> torch.Tensor:
    """Horizontal flip (p 0.5) then torchvision-style RandomAffine on a (3, S, S) uint8 image, nearest sampling,
    white fill; returns (3, S, S) uint8. Parameters as torchvision's ``get_params``: angle U(-deg, deg), shifts
    round(U(-t * S, t * S)) pixels, scale U(lo, hi), no shear."""
    image = levels.float()
    if rng.random() < 0.5:
        image = image.flip(-1)
    size = int(image.shape[-1])
    angle = math.radians(rng.uniform(-degrees, degrees))
    shift_x = round(rng.uniform(-translate[0] * size, translate[0] * size))
    shift_y = round(rng.uniform(-translate[1] * size, translate[1] * size))
    factor = rng.uniform(*scale)
    cos, sin = math.cos(angle) / factor, math.sin(angle) / factor
    # Inverse map (output -> input) in normalised coordinates: undo the shift, then the rotation and scale.
    tx, ty = 2.0 * shift_x / size, 2.0 * shift_y / size
    theta = torch.tensor([[cos, sin, -(cos * tx + sin * ty)], [-sin, cos, -(-sin * tx + cos * ty)]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, 3, size, size], align_corners=False)
    # grid_sample pads with zeros: sample (image - 255) so that outside pixels come back white.
    out = F.grid_sample(image[None] - 255.0, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0] + 255.0
    return out.round().clamp(0, 255).to(torch.uint8)


class VideoBoothDataset(torch.utils.data.Dataset):
    """Training samples (see the module docstring) from a list of ``Record`` s. ``stage`` 1 or 2."""

    def __init__(self, records: Sequence[Record], stage: int = 1, flip: bool = True, seed: Optional[int] = None,
                 clip_frames: int = CLIP_FRAMES, window: int = WINDOW, size: int = SIZE,
                 read_clip: bool = True) -> None:
        if stage not in (1, 2):
            raise DatasetError(f"stage must be 1 (coarse) or 2 (fine); got {stage!r}")
        if not records:
            raise DatasetError("the dataset has no usable video; check its folder with `dataset check`")
        self.records, self.stage, self.flip, self.seed = list(records), stage, flip, seed
        self.clip_frames, self.window, self.size = clip_frames, window, size
        # False: the same sample (same random draws) without decoding the clip: ``video`` is None and the trainer
        # takes the frames' VAE posteriors from its cache by ``frame_indices`` and ``flip``
        self.read_clip = read_clip

    def __len__(self) -> int:
        return len(self.records)

    def _rng(self, index: int) -> random.Random:
        if self.seed is None:
            return random.Random(int(torch.randint(0, 2**62, (1,))))
        return random.Random(self.seed * 1_000_003 + index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from ..conditioning.image_prompt import load_mask, prepare_image_prompt
        from ..video_io import video_info

        record = self.records[index]
        rng = self._rng(index)
        items = layout.subject_items(layout.read_json(record.mask_dir / "mask.json", "mask.json"),
                                     record.mask_dir / "mask.json")
        item = items[rng.randrange(len(items))]  # the official loader picks one segment at random
        mask = load_mask(record.mask_dir / f"mask_{item['value']}.png")
        total = record.frames if record.frames is not None else video_info(record.video).frames
        indices = sample_window(total, rng, self.clip_frames, self.window)
        # the image prompt comes from frame 0 of the whole video
        frames = read_frames(record.video, [0] + indices if self.read_clip else [0])
        first, clip = frames[0], frames[1:]
        box = [float(v) for v in item["box"]]
        prompt = prepare_image_prompt(first, mask, box)
        flip = self.flip and rng.random() < 0.5
        sample: dict[str, Any] = {
            "id": record.id,
            "video": video_transform(clip, flip, self.size) if self.read_clip else None,
            "flip": flip,
            "frame_indices": torch.tensor(indices, dtype=torch.long),
            "box": torch.tensor(box, dtype=torch.float32),
            "image_prompt_clip": prompt.clip_pixels[0],
            "image_prompt_vae": prompt.vae_pixels[0],
            "caption": record.caption,
            "word": (record.word or str(item.get("label", ""))).lower(),
        }
        augment = prompt
        if self.stage == 2:
            # the official stage-2 dataset cuts the masked first frame with the shrunk box BEFORE both
            # augmentations: the CLIP prompt (224) and the VAE prompt (256) come from the same shrunk crop
            shrunk = shrink_box(box, rng)
            if int(shrunk[2]) <= int(shrunk[0]) or int(shrunk[3]) <= int(shrunk[1]):
                shrunk = tuple(box)  # a box under two pixels cannot shrink
            augment = prepare_image_prompt(first, mask, shrunk)
            sample["box_shrunk"] = torch.tensor(shrunk, dtype=torch.float32)
        clip_levels = torch.round((augment.clip_pixels[0] * _clip_std() + _clip_mean()) * 255.0).clamp(0, 255)
        augmented = random_affine(clip_levels.to(torch.uint8), rng, translate=(0.0, 0.1))
        sample["image_prompt_clip_augmented"] = (augmented.float() / 255.0 - _clip_mean()) / _clip_std()
        if self.stage == 2:  # its own flip and affine draw
            vae_levels = torch.round((augment.vae_pixels[0] + 1.0) * 127.5)
            augmented = random_affine(vae_levels.to(torch.uint8), rng, translate=(0.1, 0.1))
            sample["image_prompt_vae_augmented"] = augmented.float() / 127.5 - 1.0
        return sample


def _clip_mean() -> torch.Tensor:
    from ..conditioning.image_prompt import CLIP_MEAN

    return torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)


def _clip_std() -> torch.Tensor:
    from ..conditioning.image_prompt import CLIP_STD

    return torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)


def our_records(root: str | os.PathLike) -> list[Record]:
    """The records of one of our datasets (entries in id order)."""
    records = []
    for folder in layout.list_entries(root):
        entry = layout.read_json(folder / "entry.json", "entry.json")
        records.append(Record(id=str(entry["id"]), video=folder / entry["video"], mask_dir=folder,
                              caption=str(entry["caption"]), word=entry.get("word"), frames=entry.get("frames")))
    return records


def OurDataset(root: str | os.PathLike, **kwargs: Any) -> VideoBoothDataset:
    """Training samples from a dataset written by ``dataset build``/``dataset synthetic``."""
    return VideoBoothDataset(our_records(root), **kwargs)


OFFICIAL_COLUMNS = ("videoid", "page_dir", "name")


def official_records(csv_dir: str | os.PathLike, videos: str | os.PathLike, masks: str | os.PathLike,
                     video_template: str = "{page_dir}/{videoid}.mp4",
                     mask_template: str = "{page_dir}/{videoid}") -> list[Record]:
    """Records of the official VideoBooth subset: every ``*.csv`` of ``csv_dir`` (one per class; columns
    ``videoid``, ``page_dir``, ``name`` = caption, by header name, else positions 3, 4, 6 as the official loader),
    videos at ``videos/<video_template>`` and Grounded-SAM folders (mask.json + mask_<value>.png) at
    ``masks/<mask_template>``. Rows whose video or mask.json is missing are left out (counted in the log)."""
    csv_dir, videos, masks = Path(csv_dir), Path(videos), Path(masks)
    files = sorted(csv_dir.glob("*.csv")) if csv_dir.is_dir() else []
    if not files:
        raise DatasetError(f"no per-class .csv file in '{csv_dir}'; give the folder of the VideoBooth subset's CSVs")
    records, missing = [], 0
    for path in files:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
        if not rows:
            continue
        header = [h.strip() for h in rows[0]]
        if all(c in header for c in OFFICIAL_COLUMNS):
            columns, body = [header.index(c) for c in OFFICIAL_COLUMNS], rows[1:]
        else:
            columns, body = [3, 4, 6], rows[1:]
        for row in body:
            if len(row) <= max(columns):
                continue
            values = dict(zip(OFFICIAL_COLUMNS, (row[c].strip() for c in columns)))
            video = videos / video_template.format(**values)
            mask_dir = masks / mask_template.format(**values)
            if not video.is_file() or not (mask_dir / "mask.json").is_file():
                missing += 1
                continue
            records.append(Record(id=values["videoid"], video=video, mask_dir=mask_dir, caption=values["name"]))
    if missing:
        logger.warning("official subset: %d rows left out (video or mask.json missing)", missing)
    return records


def OfficialSubset(csv_dir: str | os.PathLike, videos: str | os.PathLike, masks: str | os.PathLike,
                   video_template: str = "{page_dir}/{videoid}.mp4", mask_template: str = "{page_dir}/{videoid}",
                   **kwargs: Any) -> VideoBoothDataset:
    """Training samples from the official VideoBooth subset (see ``official_records``)."""
    return VideoBoothDataset(official_records(csv_dir, videos, masks, video_template, mask_template), **kwargs)
