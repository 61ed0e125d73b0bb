"""The metric models, found in a models folder like the others and loaded offline with their own processors.

    <models>/clip_eval/      a full CLIP (both towers and their projections) chosen for the metrics, optional:
    <models>/text_encoders/  ... else the full CLIP folder the pipeline may already use there (e.g. the
    <models>/clip_vision/        openai/clip-vit-large-patch14 folder is a full CLIPModel)
    <models>/dino/           DINO ViT-S/16: the facebook/dino-vits16 folder, or one .safetensors file

Which CLIP: the VideoBooth paper (Table 1) does not name the CLIP of its CLIP-T / CLIP-I. We default to
``openai/clip-vit-large-patch14``: VideoBooth's own image and text encoder, and the default of torchmetrics'
``CLIPScore``, whose x100 scale the paper's numbers use. DreamBooth-style evaluations often use ViT-B/32; put
another full CLIP in ``clip_eval/`` (or pass ``--clip``) to use it. The CLIP-T / CLIP-I numbers depend on it.

A full CLIP is a transformers folder whose ``config.json`` has ``model_type: clip``, or one safetensors file
holding ``text_model.*``, ``vision_model.*``, ``text_projection.weight`` and ``visual_projection.weight`` (its
config in the ``videobooth_config`` metadata, else inferred from the shapes).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..loading.kinds import fills_role
from ..loading.models_dir import kind_of
from ..loading.weight_files import CONFIG_METADATA_KEY, SAFETENSORS_SUFFIXES, read_config_metadata, read_state_dict

logger = logging.getLogger(__name__)

CLIP_FOLDERS = ("clip_eval", "text_encoders", "clip_vision")
"""Searched in this order for a full CLIP: the one chosen for the metrics first, then the pipeline's folders."""
DINO_FOLDER = "dino"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vits16"
DINO_VITS16 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                   patch_size=16, image_size=224, qkv_bias=True)
"""The ViT-S/16 architecture, for a single file without config metadata."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ClipForMetrics:
    """A full ``transformers.CLIPModel`` with its tokenizer and image processor, and where it came from."""

    model: Any
    tokenizer: Any
    image_processor: Any
    source: str


@dataclass
class DinoForMetrics:
    """A ``transformers.ViTModel`` (DINO) with its image processor, and where it came from."""

    model: Any
    image_processor: Any
    source: str


# -- finding -------------------------------------------------------------------------------------------------
def _config_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def is_full_clip(path: Path) -> bool:
    """True for a full CLIP (both towers and their projections, told from the keys by the one kind detector): a
    transformers folder (``model_type: clip``, which its loader needs) or a single safetensors file."""
    if path.is_dir() and _config_type(path) != "clip":
        return False
    if path.is_file() and path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return False
    return fills_role(kind_of(path), "clip_eval")


def find_clip(models_dir: str | Path) -> Path:
    """The full CLIP for the metrics: the first in :data:`CLIP_FOLDERS` of ``models_dir`` (name order inside).

    Raises:
        CheckpointError: none there, naming the folders searched and what to put there.
    """
    for folder in CLIP_FOLDERS:
        root = Path(models_dir) / folder
        if root.is_dir():
            for entry in sorted(root.iterdir()):
                if not entry.name.startswith(".") and is_full_clip(entry):
                    return entry
    raise CheckpointError(
        f"no full CLIP (both towers with their projections) found in {', '.join(CLIP_FOLDERS)} under {models_dir}; "
        f"the metrics CLIP-T and CLIP-I need one: put the {DEFAULT_CLIP} folder (config.json, model.safetensors, "
        f"tokenizer and preprocessor files) in {Path(models_dir) / 'clip_eval'}, or pass --clip PATH")


def find_dino(models_dir: str | Path) -> Path:
    """The DINO model in ``<models_dir>/dino/``: a ViT folder (``model_type: vit``) or one .safetensors file."""
    root = Path(models_dir) / DINO_FOLDER
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.name.startswith("."):
                continue
            if (entry.is_dir() and _config_type(entry) in ("vit", "dino")) or \
                    (entry.is_file() and entry.suffix.lower() in SAFETENSORS_SUFFIXES):
                return entry
        if _config_type(root) == "vit":  # the folder's content copied straight into dino/
            return root
    raise CheckpointError(
        f"no DINO model found in {root}; the DINO and consistency metrics need DINO ViT-S/16: put the "
        f"{DEFAULT_DINO} folder (config.json, model.safetensors, preprocessor_config.json) or its model.safetensors "
        f"there, or pass --dino PATH")


# -- loading -------------------------------------------------------------------------------------------------
def _tensors(path: Path, strip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    state = read_state_dict(path)
    for prefix in strip:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, ignore: tuple[str, ...]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(ignore)]
    unexpected = [k for k in unexpected if not k.endswith(ignore)]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the model it describes: missing {missing[:3]}, unexpected {unexpected[:3]}; use "
            "the model's original files (or a file with its config in the 'videobooth_config' metadata)")


def load_clip_for_metrics(path: str | Path, device: str | torch.device = "cpu") -> ClipForMetrics:
    """A full CLIP from a transformers folder or one safetensors file, float32, eval mode.

    The tokenizer and the image processor come from the folder (``preprocessor_config.json``); a single file or a
    folder without them gets the OpenAI CLIP image processor's defaults (224 px, bicubic resize of the short side,
    centre crop, CLIP mean/std) and the CLIP tokenizer found beside it (``vocab.json`` + ``merges.txt``)."""
    import transformers

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"CLIP for the metrics not found: {path}; pass a full CLIP folder or .safetensors file")
    if not is_full_clip(path):
        raise CheckpointError(
            f"{path} is not a full CLIP (both towers with text_projection and visual_projection); the metrics compare "
            f"text and image embeddings in CLIP's joint space, which needs both: use e.g. the {DEFAULT_CLIP} folder")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        model = transformers.CLIPModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    else:
        config = read_config_metadata(path)
        state = _tensors(path)
        if config is None:
            from ..loading.clip import infer_clip_text_config, infer_clip_vision_config

            text = {k[len("text_model."):]: v for k, v in state.items() if k.startswith("text_model.")}
            vision = {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}
            config = {"text_config": infer_clip_text_config(text, state["text_projection.weight"], source=str(path)),
                      "vision_config": infer_clip_vision_config(vision, state["visual_projection.weight"],
                                                                source=str(path)),
                      "projection_dim": int(state["text_projection.weight"].shape[0])}
        model = transformers.CLIPModel(transformers.CLIPConfig(**config))
        _load_strict(model, state, path, ("position_ids",))
    tokenizer_dir = folder if (folder / "vocab.json").is_file() else None
    if tokenizer_dir is None:
        from ..loading.models_dir import find_tokenizer_dir

        tokenizer_dir = find_tokenizer_dir(folder.parent)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if (folder / "preprocessor_config.json").is_file():
        processor = transformers.CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    else:
        size = model.config.vision_config.image_size
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                    crop_size={"height": size, "width": size})
    model = model.to(device).eval().requires_grad_(False)
    return ClipForMetrics(model, tokenizer, processor, str(path))


def load_dino_for_metrics(path: str | Path, device: str | torch.device = "cpu") -> DinoForMetrics:
    """DINO (``transformers.ViTModel`` without the pooler) from a folder or one safetensors file, float32, eval.

    The image processor is the folder's ``preprocessor_config.json``, else that of ``facebook/dino-vits16``
    (resize to 224 x 224, bilinear, ImageNet mean/std)."""
    import transformers

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"DINO model not found: {path}; pass the {DEFAULT_DINO} folder or its model.safetensors")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        model = transformers.ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True,
                                                      torch_dtype=torch.float32)
    else:
        state = _tensors(path, strip=("vit.", "model."))
        config = read_config_metadata(path)
        if config is None:
            if "embeddings.cls_token" not in state:
                raise CheckpointError(f"{path} is not a ViT (no 'embeddings.cls_token'); use the {DEFAULT_DINO} "
                                      "model.safetensors")
            width = int(state["embeddings.cls_token"].shape[-1])
            if width != DINO_VITS16["hidden_size"]:
                raise CheckpointError(
                    f"{path} has width {width}, not ViT-S/16's 384, and no '{CONFIG_METADATA_KEY}' metadata; use the "
                    "model's folder (with its config.json) instead of the bare file")
            config = DINO_VITS16
        model = transformers.ViTModel(transformers.ViTConfig(**config), add_pooling_layer=False)
        _load_strict(model, state, path, ("position_ids",) + tuple(k for k in state if k.startswith("pooler.")))
    if (folder / "preprocessor_config.json").is_file():
        processor = transformers.ViTImageProcessor.from_pretrained(folder, local_files_only=True)
    else:
        size = model.config.image_size
        processor = transformers.ViTImageProcessor(size={"height": size, "width": size}, image_mean=IMAGENET_MEAN,
                                                   image_std=IMAGENET_STD)
    model = model.to(device).eval().requires_grad_(False)
    return DinoForMetrics(model, processor, str(path))
