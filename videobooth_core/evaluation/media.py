"""Reading what is evaluated: videos in every form the pack writes, and the evaluation sets.

Evaluation set (``--set FILE.jsonl``), one JSON object per line, paths relative to the file::

    {"video": "dog.mp4", "prompt": "a dog running on the beach", "word": "dog", "image": "dog.png", "mask": "dog_mask.png"}

``video`` (required): .mp4/.mov/.mkv/.webm..., .gif/.webp or a folder of PNG frames (read by
:mod:`videobooth_core.video_io`); ``prompt`` (required for CLIP-T); ``image`` (required for CLIP-I and DINO; a
cut-out PNG's alpha is its mask); ``mask``, ``bbox`` [x1, y1, x2, y2], ``word`` and ``id`` (default: the video's
name) are optional; with ``evaluate --reference`` (compare.py) also ``seed``, ``config`` (the configuration the
video belongs to in the comparison table, e.g. ``lcm 4 steps``) and ``latents`` (a .safetensors of the video's
latents, for the latent MSE). A batch-jobs output is
read from its ``manifest.json`` (``--manifest``): every finished item with its prompt, word, image and mask, and
its ``latents`` file when the jobs ran with ``save_latents``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import video_io
from ..errors import EvaluationError, VideoError


@dataclass(frozen=True)
class EvalItem:
    """One video to score and what it is compared with."""

    id: str
    video: Path
    prompt: str | None = None
    word: str | None = None
    image: Path | None = None
    mask: Path | None = None
    bbox: tuple[float, float, float, float] | None = None
    seed: int | None = None
    config: str | None = None
    latents: Path | None = None


def read_video(path: str | Path) -> torch.Tensor:
    """Every frame of a video, a .gif/.webp animation or a folder of PNG frames -> (n, H, W, 3) uint8
    (:func:`videobooth_core.video_io.read_video`; relative paths are relative to the set file)."""
    try:
        return video_io.read_video(path)
    except VideoError as error:
        raise EvaluationError(str(error)) from error


def prepared_image_prompt(item: EvalItem) -> torch.Tensor | None:
    """The image prompt as the model sees it (masked, cropped, white-padded square) -> (S, S, 3) uint8."""
    if item.image is None:
        return None
    from ..conditioning.image_prompt import load_subject, prepare_image_prompt

    image, mask = load_subject(item.image, item.mask)
    return prepare_image_prompt(image, mask, item.bbox).square.permute(1, 2, 0).contiguous()


def _path(value: object, base: Path, key: str, where: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise EvaluationError(f"{where}: {key!r} must be a path, got {json.dumps(value)}")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _item(obj: dict, base: Path, where: str, default_id: str | None = None) -> EvalItem:
    if not isinstance(obj, dict):
        raise EvaluationError(f"{where}: expected a JSON object like {{\"video\": ..., \"prompt\": ..., \"image\": ...}}")
    video = _path(obj.get("video"), base, "video", where)
    if video is None:
        raise EvaluationError(f"{where}: 'video' is required (a video file or a folder of PNG frames)")
    bbox = obj.get("bbox")
    if bbox is not None and (not isinstance(bbox, list) or len(bbox) != 4):
        raise EvaluationError(f"{where}: 'bbox' must be [x1, y1, x2, y2], got {json.dumps(bbox)}")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise EvaluationError(f"{where}: 'prompt' must be a string, got {json.dumps(prompt)}")
    config = obj.get("config")
    if config is not None and (not isinstance(config, str) or not config):
        raise EvaluationError(f"{where}: 'config' must be a name like \"lcm 4 steps\", got {json.dumps(config)}")
    return EvalItem(id=str(obj.get("id") or default_id or video.stem), video=video, prompt=prompt,
                    word=obj.get("word"), image=_path(obj.get("image"), base, "image", where),
                    mask=_path(obj.get("mask"), base, "mask", where), bbox=tuple(bbox) if bbox else None,
                    seed=obj.get("seed"), config=config, latents=_path(obj.get("latents"), base, "latents", where))


def read_set(path: str | Path) -> list[EvalItem]:
    """The items of an evaluation set (JSONL, see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise EvaluationError(f"cannot read the evaluation set {path} ({error.strerror}); check the path") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except ValueError as error:
            raise EvaluationError(f"{path}:{number}: not JSON ({error}); one object per line") from None
        items.append(_item(obj, path.parent, f"{path}:{number}"))
    if not items:
        raise EvaluationError(f"the evaluation set {path} has no items; one JSON object per line")
    return items


def read_manifest(path: str | Path) -> list[EvalItem]:
    """The finished items of a batch-jobs output's ``manifest.json`` (outputs relative to its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvaluationError(f"cannot read the manifest {path} ({error}); give the manifest.json of a "
                              "`generate --jobs` output folder") from None
    items = []
    for entry in manifest.get("items", []):
        settings = entry.get("settings", {})
        steps, sampler = settings.get("steps"), settings.get("sampler")
        config = f"{sampler} {steps} steps" if sampler and steps else None  # the comparison's configuration
        obj = {"id": entry.get("id"), "video": entry.get("output"), "seed": entry.get("seed"), "config": config,
               "latents": entry.get("latents"),  # written with save_latents (generate --save-latents)
               **{k: settings.get(k) for k in ("prompt", "word", "image", "mask", "bbox")}}
        items.append(_item(obj, path.parent, f"{path} item {entry.get('id')!r}"))
    if not items:
        raise EvaluationError(f"the manifest {path} lists no finished item; run the jobs first")
    return items
