"""Cached encoder outputs (``train --cache DIR``): the frozen VAE runs once per clip instead of once per step.

What is cached, per clip (``DIR/<entry id>.safetensors``): the VAE posterior *parameters* (mean and std, float,
unscaled) of every frame of the video after the reader's deterministic transform (center crop, resize), without
and with the horizontal flip: ``mean``/``std`` and ``mean_flipped``/``std_flipped``, each (frames, 4, h, w). A
training step still draws everything random as the uncached run does (the reader's window, flip, segment and
image-prompt augmentations; the trainer's timestep, dropout and noise) and *samples* the posterior per step,
``mean + std * randn`` with the same generator, so training stays exact: frames are encoded in groups of the
clip's length, as the uncached path encodes a clip (the VAE's kernels round per batch size), and the loss equals
the uncached one (tested bit for bit on the CPU).

What stays live: the image prompt's CLIP features and VAE latent, because the official recipe augments the image
prompt at random every step (RandomAffine, flip, stage-2 box shrink); caching them would freeze a single
augmentation. They are one image per clip against the clip's 16 frames through the VAE. Token ids and the
mid-grey exemplar's posterior (stage-2 condition dropout) are computed once per run, cached or not.

Size: 2 x 2 x 4 x (size/8)^2 float32 per frame with flips (32 KiB at 256 x 256: ~20 MB for a 600-frame clip).
``DIR/index.json`` records the size, clip length and VAE file; others are refused (use another folder).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import explain
from ..files import atomic_path
from .config import TrainingError

logger = logging.getLogger(__name__)

CACHE_FORMAT = "videobooth-training-cache"
CACHE_VERSION = 1


def vae_identity(vae_file: str | Path) -> str:
    """The VAE file's name and size: a cache built with another VAE is refused."""
    path = Path(vae_file)
    return f"{path.name}:{path.stat().st_size}" if path.is_file() else path.name


class EncoderCache:
    """A cache folder for one frame size and VAE; :meth:`build` fills it, :meth:`posterior` reads it."""

    def __init__(self, folder: str | Path, size: int, frames: int, vae_file: str | Path) -> None:
        self.folder, self.size, self.frames = Path(folder), int(size), int(frames)
        self.key = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "size": self.size, "frames": self.frames,
                    "vae": vae_identity(vae_file)}
        self._open: dict[str, Any] = {}

    def _entry_file(self, ident: str) -> Path:
        return self.folder / f"{ident}.safetensors"

    def check_index(self) -> None:
        """Refuse a folder built for another size or VAE (naming both), before anything is read from it."""
        index = self.folder / "index.json"
        if not index.is_file():
            return
        found = json.loads(index.read_text(encoding="utf-8"))
        if {k: found.get(k) for k in self.key} != self.key:
            raise TrainingError(explain("the --cache folder was built for another frame size, clip length or VAE",
                                        str(self.folder),
                                        f"use another --cache folder (it holds {found.get('size')} px, "
                                        f"{found.get('frames')} frames, VAE {found.get('vae')}; this run needs "
                                        f"{self.size} px, {self.frames} frames, VAE {self.key['vae']})"))

    def build(self, records: list[Any], vae: Any, flip: bool) -> int:
        """Encode the clips not cached yet; returns how many were encoded."""
        from safetensors.torch import save_file

        from ..dataset.reader import video_transform
        from ..video_io import read_frames, video_info

        self.check_index()
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / "index.json") as tmp:
            tmp.write_text(json.dumps(self.key, indent=1), encoding="utf-8")
        param = next(vae.parameters())
        chunk_frames, built = self.frames, 0
        for record in records:
            target = self._entry_file(record.id)
            if target.is_file():
                continue
            total = record.frames if record.frames is not None else video_info(record.video).frames
            parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "mean_flipped": [], "std_flipped": []}
            # groups of exactly ``chunk_frames`` frames (the last one overlapping the one before), as the uncached
            # path encodes a clip: the VAE's kernels round differently per batch size, not per batch content
            for start in range(0, total, chunk_frames):
                low = max(0, min(start, total - chunk_frames))
                frames = read_frames(record.video, list(range(low, min(total, low + chunk_frames))))
                for flipped in (False, True) if flip else (False,):
                    pixels = video_transform(frames, flipped, self.size).permute(1, 0, 2, 3)  # (t, 3, S, S)
                    with torch.no_grad():
                        dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
                    suffix = "_flipped" if flipped else ""
                    parts["mean" + suffix].append(dist.mean[start - low:].cpu())
                    parts["std" + suffix].append(dist.std[start - low:].cpu())
            tensors = {name: torch.cat(values).contiguous() for name, values in parts.items() if values}
            with atomic_path(target) as tmp:
                save_file(tensors, str(tmp), metadata={"frames": str(total)})
            built += 1
        return built

    def posterior(self, ident: str, indices: torch.Tensor, flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (len(indices), 4, h, w), of the clip's frames ``indices`` (flipped or not)."""
        from safetensors import safe_open

        handle = self._open.get(ident)
        if handle is None:
            path = self._entry_file(ident)
            if not path.is_file():
                raise TrainingError(explain("the --cache folder has no entry for clip", ident,
                                            "let the trainer build it (same --cache, --data and --size)"))
            handle = self._open[ident] = safe_open(str(path), framework="pt")
        suffix = "_flipped" if flipped else ""
        if flipped and "mean_flipped" not in handle.keys():
            raise TrainingError(explain("the --cache folder was built without flips; clip", ident,
                                        "rebuild it into another folder without --no-flip"))
        picked = [int(i) for i in indices]
        mean, std = handle.get_slice("mean" + suffix), handle.get_slice("std" + suffix)
        return (torch.cat([mean[i:i + 1] for i in picked]), torch.cat([std[i:i + 1] for i in picked]))
