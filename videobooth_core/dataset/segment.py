"""Finding and segmenting the subject in a frame: Grounding DINO (text -> boxes) then SAM (box -> mask), both from
``transformers`` and read from local folders (Grounded-SAM, as the paper's data pipeline, without its repo).

Download once (any machine with internet), e.g.::

    huggingface-cli download IDEA-Research/grounding-dino-tiny --local-dir models/grounding-dino/grounding-dino-tiny
    huggingface-cli download facebook/sam-vit-base --local-dir models/sam/sam-vit-base
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch

from ..errors import DatasetError

logger = logging.getLogger(__name__)

BOX_THRESHOLD = 0.3
TEXT_THRESHOLD = 0.25
"""Grounded-SAM's demo thresholds (box score, text-token score)."""
MODEL_TYPES = {"grounding_dino": ("grounding-dino", "IDEA-Research/grounding-dino-tiny"),
               "sam": ("sam", "facebook/sam-vit-base")}


@dataclass(frozen=True)
class Detection:
    """One segmented subject: label, detector score, box (x1, y1, x2, y2) pixel floats, mask (H, W) bool."""

    label: str
    logit: float
    box: tuple[float, float, float, float]
    mask: torch.Tensor


class Segmenter(Protocol):
    def __call__(self, frame: torch.Tensor, word: str) -> Optional[Detection]:
        """The best detection of ``word`` in a (H, W, 3) uint8 frame, or None when nothing is found."""


def find_model_folder(models: Optional[str | os.PathLike], kind: str, given: Optional[str | os.PathLike]) -> Path:
    """The folder of a ``transformers`` model of ``kind`` ("grounding_dino" or "sam"): ``given``, else the first
    folder under ``models`` (searched two levels deep, name order) whose config.json has that ``model_type``."""
    model_type, repo = MODEL_TYPES[kind]
    if given:
        path = Path(given)
        if not (path / "config.json").is_file():
            raise DatasetError(f"'{path}' is not a transformers model folder (no config.json); download {repo} into it")
        return path
    if models and Path(models).is_dir():
        root = Path(models)
        for config in sorted(list(root.glob("*/config.json")) + list(root.glob("*/*/config.json"))):
            try:
                found = json.loads(config.read_text(encoding="utf-8")).get("model_type")
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if found == model_type:
                return config.parent
    raise DatasetError(f"no {repo} model found under the models folder {str(models)!r}; download it once with "
                       f"`huggingface-cli download {repo} --local-dir models/{model_type}/{repo.split('/')[1]}` "
                       f"or give its folder with --{kind.replace('_', '-')}, or pass --masks")


class GroundedSam:
    """Grounding DINO + SAM, loaded once, used from several threads (one forward pass at a time per model)."""

    def __init__(self, dino_dir: Path, sam_dir: Path, device: str = "cpu", box_threshold: float = BOX_THRESHOLD,
                 text_threshold: float = TEXT_THRESHOLD) -> None:
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor, SamModel, SamProcessor

        try:
            self.dino_processor = GroundingDinoProcessor.from_pretrained(dino_dir)
            self.dino = GroundingDinoForObjectDetection.from_pretrained(dino_dir).to(device).eval()
            self.sam_processor = SamProcessor.from_pretrained(sam_dir)
            self.sam = SamModel.from_pretrained(sam_dir).to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise DatasetError(f"cannot load Grounding DINO from '{dino_dir}' or SAM from '{sam_dir}' ({exc}); "
                               "download IDEA-Research/grounding-dino-tiny and facebook/sam-vit-base again") from exc
        self.device, self.box_threshold, self.text_threshold = device, box_threshold, text_threshold
        self._lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, frame: torch.Tensor, word: str) -> Optional[Detection]:
        from PIL import Image

        image = Image.fromarray(frame.numpy())
        height, width = int(frame.shape[0]), int(frame.shape[1])
        with self._lock:  # the models are shared by the worker threads; their forward is not re-entrant-safe
            inputs = self.dino_processor(images=image, text=word.lower() + ".", return_tensors="pt").to(self.device)
            outputs = self.dino(**inputs)
            found = self.dino_processor.post_process_grounded_object_detection(
                outputs, inputs.input_ids, threshold=self.box_threshold, text_threshold=self.text_threshold,
                target_sizes=[(height, width)])[0]
            if found["scores"].numel() == 0:
                return None
            best = int(torch.argmax(found["scores"]))
            # Detector boxes may overhang the frame by a fraction of a pixel: clamp so the crop stays inside.
            x1, y1, x2, y2 = (float(v) for v in found["boxes"][best].cpu())
            box = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))
            if int(box[2]) <= int(box[0]) or int(box[3]) <= int(box[1]):
                return None
            sam_inputs = self.sam_processor(images=image, input_boxes=[[list(box)]], return_tensors="pt").to(self.device)
            sam_out = self.sam(**sam_inputs, multimask_output=False)
            masks = self.sam_processor.image_processor.post_process_masks(
                sam_out.pred_masks.cpu(), sam_inputs["original_sizes"].cpu(), sam_inputs["reshaped_input_sizes"].cpu())
        mask = masks[0][0, 0].bool()
        return Detection(label=word.lower(), logit=float(found["scores"][best]), box=box, mask=mask)
