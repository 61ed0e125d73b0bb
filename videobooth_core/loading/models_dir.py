"""Finding the model files in a models folder laid out like ComfyUI's (and like ``make-tiny``'s output).

    <models>/videobooth/     watermark_remove_module.pt + mapper.pt (or their .safetensors conversions)
    <models>/vae/            the SD-1.x VAE (sd-vae-ft-ema): one .safetensors file or a diffusers folder
    <models>/clip_vision/    CLIP ViT-L/14 vision tower: one .safetensors file or a Hugging Face folder
    <models>/text_encoders/  CLIP ViT-L/14 text encoder: one .safetensors file or a Hugging Face folder,
                             and the CLIP tokenizer (a folder with vocab.json + merges.txt)

A full CLIP (both towers, e.g. the openai/clip-vit-large-patch14 folder) fills the text and the vision role
(:data:`kinds.ROLE_KINDS`), so one copy of it in ``text_encoders/`` or ``clip_vision/`` serves both: a role with
no file of its own in its folder takes the full CLIP of the other folder.

Files are recognised by their keys, never by their names; when several files of one kind are present, a
file whose name contains a preferred stem wins, then the first in name order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .kinds import detect_kind, fills_role
from .weight_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_safetensors_header, read_state_dict
from ..errors import CheckpointError, explain

logger = logging.getLogger(__name__)

FOLDERS = {
    "videobooth_unet": "videobooth",
    "videobooth_mapper": "videobooth",
    "vae": "vae",
    "clip_vision": "clip_vision",
    "clip_text": "text_encoders",
}
FULL_CLIP_FOLDERS = ("text_encoders", "clip_vision")
"""Where a full CLIP may stand; it serves the text and the vision role from either."""
EXPECTED_FILES = {
    "videobooth_unet": "watermark_remove_module.pt (8.9 GB, released) or videobooth_unet.safetensors (converted)",
    "videobooth_mapper": "mapper.pt (781 MB, released) or videobooth_mapper.safetensors (converted)",
    "vae": "the sd-vae-ft-ema VAE: vae-ft-ema-560000-ema-pruned.safetensors or a diffusers sd-vae-ft-ema folder",
    "clip_vision": "CLIP ViT-L/14 vision: e.g. clip_vision_l.safetensors / model.safetensors of openai/clip-vit-large-patch14",
    "clip_text": "CLIP ViT-L/14 text encoder: e.g. clip_l.safetensors or the openai/clip-vit-large-patch14 folder",
}
PREFERRED_STEMS = {
    "videobooth_unet": ("videobooth_unet", "watermark_remove_module"),
    "videobooth_mapper": ("videobooth_mapper", "mapper"),
    "vae": ("ft-ema", "ft_ema", "videobooth"),
    "clip_vision": ("clip-vit-large", "clip_vision_l", "vit-l", "videobooth"),
    "clip_text": ("clip_l", "clip-vit-large", "videobooth"),
}


def _keys_of(path: Path) -> dict[str, object]:
    """Top-level keys (and, for the official wrappers, the wrapped dict) without loading tensors."""
    if path.is_dir():
        for name in ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                     "diffusion_pytorch_model.bin"):
            if (path / name).is_file():
                return _keys_of(path / name)
        return {}
    suffix = path.suffix.lower()
    try:  # an unreadable candidate is reported when it is actually loaded
        if suffix in SAFETENSORS_SUFFIXES:
            return dict.fromkeys(read_safetensors_header(path).entries)
        if suffix in PICKLE_SUFFIXES:
            return read_state_dict(path)
    except CheckpointError:
        return {}
    return {}


def kind_of(path: Path) -> str:
    """The kind of a weight file or model folder (see :func:`kinds.detect_kind`), ``unknown`` if none."""
    kind = detect_kind(_keys_of(path))
    return {"wrapped_videobooth_unet": "videobooth_unet", "wrapped_videobooth_mapper": "videobooth_mapper"}.get(kind, kind)


def _candidates(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            found.append(entry)
        elif entry.is_dir():
            found.append(entry)
    return found


def find_model_file(models_dir: Path, kind: str) -> Path:
    """The file (or folder) for the role ``kind`` in its subfolder of ``models_dir`` (a file of that kind, or one
    that fills the role: a full CLIP for ``clip_text`` / ``clip_vision``, also from the other CLIP folder);
    CheckpointError if none."""
    folder = Path(models_dir) / FOLDERS[kind]
    matches = [p for p in _candidates(folder) if fills_role(kind_of(p), kind)]
    if not matches and FOLDERS[kind] in FULL_CLIP_FOLDERS:
        others = [Path(models_dir) / f for f in FULL_CLIP_FOLDERS if f != FOLDERS[kind]]
        matches = [p for other in others for p in _candidates(other) if kind_of(p) == "clip_full"]
    if not matches:
        for candidate in _candidates(folder):
            # a file that should be this kind but cannot be read: report the broken file, not "not found"
            if candidate.is_file() and any(stem in candidate.name.lower() for stem in PREFERRED_STEMS[kind]) \
                    and not _keys_of(candidate):
                read_state_dict(candidate)
        listing = ", ".join(p.name for p in _candidates(folder)) or "nothing"
        raise CheckpointError(
            f"no {kind.replace('_', ' ')} weights found in {folder} (it holds: {listing}); put there "
            f"{EXPECTED_FILES[kind]}. `python -m videobooth_core make-tiny --out DIR` writes a complete tiny set."
        )
    for stem in PREFERRED_STEMS[kind]:
        for match in matches:
            if stem in match.name.lower():
                return match
    if len(matches) > 1:
        logger.info("several %s files in %s; using %s", kind, folder, matches[0].name)
    return matches[0]


def find_tokenizer_dir(models_dir: Path, text_encoder_path: Path | None = None) -> Path:
    """A folder holding the CLIP tokenizer (vocab.json + merges.txt): the text encoder's own folder, or any
    folder (up to two levels deep) under ``text_encoders/`` or ``clip_vision/`` or ``tokenizer/``."""
    candidates: list[Path] = []
    if text_encoder_path is not None and text_encoder_path.is_dir():
        candidates += [text_encoder_path, text_encoder_path / "tokenizer", text_encoder_path.parent / "tokenizer"]
    for sub in ("text_encoders", "clip_vision", "tokenizer", "tokenizers"):
        root = Path(models_dir) / sub
        if root.is_dir():
            candidates.append(root)
            for dirpath, dirnames, _ in os.walk(root):
                depth = len(Path(dirpath).relative_to(root).parts)
                if depth >= 2:
                    dirnames[:] = []
                candidates += [Path(dirpath) / d for d in sorted(dirnames)]
    for candidate in candidates:
        if (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file():
            return candidate
    raise CheckpointError(
        f"no CLIP tokenizer found under {models_dir}: copy the `tokenizer` folder of openai/clip-vit-large-patch14 "
        f"(vocab.json and merges.txt) to {Path(models_dir) / 'text_encoders' / 'clip_tokenizer'}"
    )


def check_models_dir(models_dir: str | os.PathLike) -> Path:
    """``models_dir`` as a Path if it is a folder; CheckpointError naming it otherwise (checked first, so that a
    mistyped --models is named as such, not as the first file missing from it)."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise CheckpointError(explain("models folder not found", models_dir,
                                      "pass the folder that holds videobooth/, vae/, clip_vision/ and "
                                      "text_encoders/ (`python -m videobooth_core make-tiny --out DIR` writes one)"))
    return models_dir


@dataclass(frozen=True)
class ModelFiles:
    """Where each model of a VideoBooth set lives."""

    unet: Path
    mapper: Path
    vae: Path
    clip_vision: Path
    clip_text: Path
    tokenizer: Path

    @classmethod
    def from_models_dir(cls, models_dir: str | os.PathLike, **overrides: str | os.PathLike | None) -> "ModelFiles":
        """Find every file in ``models_dir``; keyword overrides (unet=..., vae=...) take precedence."""
        models_dir = check_models_dir(models_dir)
        found = {}
        for field, kind in (("unet", "videobooth_unet"), ("mapper", "videobooth_mapper"), ("vae", "vae"),
                            ("clip_vision", "clip_vision"), ("clip_text", "clip_text")):
            override = overrides.get(field)
            found[field] = Path(override) if override else find_model_file(models_dir, kind)
        tokenizer = overrides.get("tokenizer")
        found["tokenizer"] = Path(tokenizer) if tokenizer else find_tokenizer_dir(models_dir, found["clip_text"])
        return cls(**found)
