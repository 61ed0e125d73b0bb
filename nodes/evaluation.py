"""Measuring videos in ComfyUI: the metric models, VideoBooth Score, VideoBooth Drift (likeness per frame), and
best of N (rank a sampler batch).

The metric models live in ComfyUI's ``models/clip_eval`` (a full CLIP folder) and ``models/dino`` (DINO ViT-S/16),
registered here; a file picked in a sub-folder loads that whole transformers folder. Needs only transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..videobooth_core.evaluation.best_of import candidate_seeds, rank, split_videos
from ..videobooth_core.evaluation.drift import METRIC_CHOICES, drift_with_plot
from ..videobooth_core.evaluation.metrics import METRICS, RANK_CHOICES, Scorer
from ..videobooth_core.evaluation.models import load_clip_for_metrics, load_dino_for_metrics
from ..videobooth_core.settings import widget
from . import _bridge as bridge
from .image_prompt import INVERT_MASK_DEFAULT, INVERT_MASK_TOOLTIP

SCORER = "VIDEOBOOTH_SCORER"
METRIC_FOLDERS = ("clip_eval", "dino")
NONE = "none"


def register_metric_folders() -> None:
    """Register ``models/clip_eval`` and ``models/dino`` with ComfyUI (no-op outside it)."""
    fp = bridge.folder_paths
    if fp is None:
        return
    for folder in METRIC_FOLDERS:
        fp.add_model_folder_path(folder, os.path.join(fp.models_dir, folder))
        fp.folder_names_and_paths[folder][1].update(fp.supported_pt_extensions)


def _model_location(folder: str, name: str) -> Path:
    """The picked file, or its folder when a transformers folder (config.json beside it) holds it."""
    path = bridge.model_path(folder, name)
    return path.parent if (path.parent / "config.json").is_file() else path


class VideoBoothMetricModels:
    DESCRIPTION = ("Loads the metric models of VideoBooth Score and Best of N: a full CLIP (both towers; the paper's "
                   "CLIP-T and CLIP-I) from models/clip_eval and DINO ViT-S/16 (DINO score and subject consistency) "
                   "from models/dino. Either may be 'none'; its scores are then left out.")
    CATEGORY = "VideoBooth/evaluation"
    FUNCTION = "load"
    RETURN_TYPES = (SCORER,)
    RETURN_NAMES = ("metric_models",)
    OUTPUT_TOOLTIPS = ("The loaded metric models, for VideoBooth Score and VideoBooth Best of N.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "clip_name": (bridge.list_models("clip_eval") + [NONE], {"tooltip": (
                "A file of a full CLIP folder in models/clip_eval (e.g. openai/clip-vit-large-patch14, VideoBooth's "
                "own CLIP and torchmetrics' default; the paper does not name its CLIP), or none.")}),
            "dino_name": (bridge.list_models("dino") + [NONE], {"tooltip": (
                "facebook/dino-vits16 (its folder's model.safetensors, or the file alone) in models/dino, or none.")}),
        }}

    def load(self, clip_name: str, dino_name: str) -> tuple[Scorer]:
        clip = None if clip_name == NONE else load_clip_for_metrics(_model_location("clip_eval", clip_name))
        dino = None if dino_name == NONE else load_dino_for_metrics(_model_location("dino", dino_name))
        return (Scorer(clip, dino),)


def _reference(image_prompt: torch.Tensor, mask: torch.Tensor | None, invert_mask: bool) -> torch.Tensor:
    """The prepared image prompt (masked, cropped, white-padded square) as (S, S, 3) uint8, the subject read from
    the mask as VideoBooth Image Prompt reads it."""
    from ..videobooth_core.conditioning.image_prompt import prepare_image_prompt

    image = bridge.first_image(image_prompt)
    subject = None if mask is None else bridge.subject_mask(mask, tuple(image.shape[:2]), invert_mask)
    return prepare_image_prompt(image, subject).square.permute(1, 2, 0)


def _text(scores: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if v is not None)


_COMMON = {
    "metric_models": (SCORER, {"tooltip": "From VideoBooth Metric Models."}),
    "image_prompt": ("IMAGE", {"tooltip": "The subject photo given to VideoBooth (its first image is used)."}),
    "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": (
        "The prompt with the subject word as written (for CLIP-T); empty leaves CLIP-T out.")}),
}
# appended after the older widgets: a workflow saved before invert_mask existed loads it with the default, which is
# what these nodes always did (inverted)
_MASK = {"mask": ("MASK", {"tooltip": (
    "The photo's mask, read as VideoBooth Image Prompt reads it (set invert_mask the same way there). Leave "
    "unconnected for the whole photo.")}),
    "invert_mask": ("BOOLEAN", {"default": INVERT_MASK_DEFAULT, "tooltip": INVERT_MASK_TOOLTIP})}


class VideoBoothScore:
    DESCRIPTION = ("Scores a video as the VideoBooth paper does: CLIP-T (text alignment) and CLIP-I (likeness to the "
                   "image prompt) on the x100 scale, DINO (cosine, 0..1) and VBench's subject consistency.")
    CATEGORY = "VideoBooth/evaluation"
    FUNCTION = "score"
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("clip_t", "clip_i", "dino", "consistency", "text")
    OUTPUT_TOOLTIPS = ("CLIP-T x100 (-1: not computed).", "CLIP-I x100 (-1: not computed).",
                       "DINO cosine (-1: not computed).", "Subject consistency (-1: not computed).",
                       "The scores in one line.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"frames": ("IMAGE", {"tooltip": "The video's frames (one video)."}), **_COMMON},
                "optional": dict(_MASK)}

    def score(self, frames: torch.Tensor, metric_models: Scorer, image_prompt: torch.Tensor, prompt: str,
              mask: torch.Tensor | None = None, invert_mask: bool = INVERT_MASK_DEFAULT) -> tuple:
        scores = metric_models.score(frames, _reference(image_prompt, mask, invert_mask), prompt or None)
        return (*(-1.0 if scores[k] is None else scores[k] for k in METRICS), _text(scores))


class VideoBoothBestOfN:
    DESCRIPTION = ("Best of N: ranks the videos of a VideoBooth Sampler batch (seeds seed, seed+1, ...) by a metric "
                   "and returns the best one (or all, best first) with the seeds; a seed alone, batch 1, gives the "
                   "same video again.")
    CATEGORY = "VideoBooth/evaluation"
    FUNCTION = "pick"
    RETURN_TYPES = ("IMAGE", "INT", "STRING")
    RETURN_NAMES = ("frames", "best_seed", "ranking")
    OUTPUT_TOOLTIPS = ("The best video's frames, or every video best first.", "The seed of the best video.",
                       "Each video's seed and scores, best first.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "frames": ("IMAGE", {"tooltip": "The decoded batch of the sampler (all frames of video 0 first)."}),
            **_COMMON,
            "frames_per_video": ("INT", {**widget("frames"), "tooltip": "The sampler's frames (splits the batch)."}),
            # no control_after_generate (the frontend adds one to any "seed"): randomising it would part it from
            # the sampler's seed
            "seed": ("INT", {**widget("seed"), "control_after_generate": False, "tooltip": (
                "The sampler's seed: video i of its batch used seed + i (reported, not used to sample).")}),
            "rank_by": (list(RANK_CHOICES), {"default": "dino", "tooltip": (
                "dino / clip-i: likeness to the image prompt; clip-t: agreement with the prompt.")}),
            "output": (["best", "all ranked"], {"default": "best", "tooltip": (
                "best: the best video only; all ranked: every video, best first.")}),
        }, "optional": dict(_MASK)}

    def pick(self, frames: torch.Tensor, metric_models: Scorer, image_prompt: torch.Tensor, prompt: str,
             frames_per_video: int, seed: int, rank_by: str, output: str, mask: torch.Tensor | None = None,
             invert_mask: bool = INVERT_MASK_DEFAULT) -> tuple:
        videos = split_videos(frames, frames_per_video)
        reference = _reference(image_prompt, mask, invert_mask)
        scores = [metric_models.score(video, reference, prompt or None) for video in videos]
        order = rank(scores, rank_by)
        seeds = candidate_seeds(seed, len(videos))  # the Sampler's batch seeds: seed, seed + 1, ... (wrapping)
        ranking = "\n".join(f"{place}. seed {seeds[i]}: {_text(scores[i])}" for place, i in enumerate(order, 1))
        chosen = torch.cat([videos[i] for i in order]) if output == "all ranked" else videos[order[0]]
        return (chosen, seeds[order[0]], ranking)


class VideoBoothDrift:
    DESCRIPTION = ("Drift: how like the image prompt each frame of a video is, frame by frame (DINO when loaded, else "
                   "CLIP-I), as a plot and in figures (first, last, lowest frame, trend per 16 frames). Shows whether "
                   "a long video loses its subject over time. The plot needs matplotlib.")
    CATEGORY = "VideoBooth/evaluation"
    FUNCTION = "drift"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("plot", "text")
    OUTPUT_TOOLTIPS = ("The likeness curve (frame on x; the dot marks the lowest frame), for Preview Image.",
                       "The figures in one line, then every frame's value.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "frames": ("IMAGE", {"tooltip": "The video's frames (one video, e.g. a long one from the sampler)."}),
            "metric_models": _COMMON["metric_models"],
            "image_prompt": _COMMON["image_prompt"],
            "metric": (list(METRIC_CHOICES), {"default": "auto", "tooltip": (
                "auto: DINO when loaded (subject fidelity, as the paper), else CLIP-I; or ask for one (its model must "
                "be loaded in VideoBooth Metric Models).")}),
        }, "optional": dict(_MASK)}

    def drift(self, frames: torch.Tensor, metric_models: Scorer, image_prompt: torch.Tensor, metric: str,
              mask: torch.Tensor | None = None, invert_mask: bool = INVERT_MASK_DEFAULT) -> tuple:
        drift, plot = drift_with_plot(metric_models, frames, _reference(image_prompt, mask, invert_mask), metric)
        values = ", ".join(f"{v:.4f}" for v in drift.per_frame)
        return (bridge.image_to_comfy(plot[None].float() / 255), f"{drift.summary()}\nper frame: {values}")


NODE_CLASS_MAPPINGS = {"VideoBoothMetricModels": VideoBoothMetricModels, "VideoBoothScore": VideoBoothScore,
                       "VideoBoothBestOfN": VideoBoothBestOfN, "VideoBoothDrift": VideoBoothDrift}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VideoBoothMetricModels": "VideoBooth Metric Models (CLIP, DINO)",
    "VideoBoothScore": "VideoBooth Score",
    "VideoBoothBestOfN": "VideoBooth Best of N (rank a batch)",
    "VideoBoothDrift": "VideoBooth Drift (likeness per frame)",
}
