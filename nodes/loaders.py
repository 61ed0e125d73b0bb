"""Model loading nodes: the VideoBooth UNet + mapper, the VAE, the CLIP text and vision encoders, and the
conversion of the released pickles to safetensors.

Files are picked from ComfyUI's model folders (``videobooth`` - registered by this pack, ``vae``,
``clip_vision``, ``text_encoders``, each extendable in ``extra_model_paths.yaml``) and recognised by their
keys, never by their names. Loading goes through the core's loaders (ComfyUI's own VAE and CLIP loaders
assume full-size SD models). A loader keeps what it loaded while its file and settings stay the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..videobooth_core.loading.checkpoint import convert_released_weights, parse_dtype
from ..videobooth_core.errors import CheckpointError
from ..videobooth_core.loading.models_dir import EXPECTED_FILES, PREFERRED_STEMS
from ..videobooth_core.pipeline import load_unet_and_mapper
from ..videobooth_core.settings import CONVERT_PRECISION, DEFAULT_DEVICE
from ..videobooth_core.settings import PRECISIONS as CORE_PRECISIONS
from . import _bridge as bridge
from ._types import (
    CLIP,
    CLIP_VISION,
    MODEL,
    VAE,
    VideoBoothCLIP,
    VideoBoothCLIPVision,
    VideoBoothModel,
    VideoBoothVAE,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PRECISIONS = ["auto", *CORE_PRECISIONS]
"""auto: each loader's own choice (its tooltip says which); then the core's precisions (videobooth_core.settings)."""
DEVICES = ["auto", DEFAULT_DEVICE]
NO_FILE = "none"
AUTO_TOKENIZER = "auto"
COMFY_TOKENIZER = "ComfyUI sd1_tokenizer"
T = TypeVar("T")

_DEVICE_TOOLTIP = ("auto: ComfyUI's compute device (the GPU), with the model handed to ComfyUI's memory "
                   "management so other models can be unloaded to make room; cpu: keep it on the CPU.")


def precision_tooltip(auto_means: str) -> str:
    return f"Weight precision. auto: {auto_means}."


_SMALL_MODEL_PRECISION = precision_tooltip("fp32 (as the official code)")


def _preferred(names: list[str], kind: str) -> str | None:
    """A UI default only: the first listed file whose name suggests ``kind`` (loading checks the keys)."""
    for stem in PREFERRED_STEMS[kind]:
        for name in names:
            if stem in os.path.basename(name).lower():
                return name
    return names[0] if names else None


def file_input(folder: str, kind: str, tooltip: str, extra: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    names = bridge.list_models(folder)
    options: dict[str, Any] = {"tooltip": f"{tooltip} Files in {bridge.describe_locations(folder)}; "
                                           f"expected: {EXPECTED_FILES[kind]}."}
    default = _preferred(names, kind)
    if default is not None:
        options["default"] = default
    return names + list(extra), options


def load_checked(kinds: str | tuple[str, ...], folder: str, load: Callable[[], T]) -> T:
    """Run a core loader; a wrong, broken or unsafe file gets an error (of the same class) naming the folder and
    what belongs there (``kinds``: keys of EXPECTED_FILES)."""
    try:
        return load()
    except CheckpointError as error:
        where = bridge.describe_locations(folder)
        expected = " and ".join(EXPECTED_FILES[kind] for kind in ((kinds,) if isinstance(kinds, str) else kinds))
        raise type(error)(f"{error}\n{where[:1].upper()}{where[1:]} should hold {expected}.") from error


def placement(role: str, device: str, precision: str) -> tuple[torch.device, torch.device, torch.dtype]:
    """(compute device, offload device, dtype) of a model of ``role`` (``unet``, ``vae``, ``text``, ``vision``)
    from a loader's device and precision widgets (``auto`` precision: :func:`._bridge.auto_dtype`)."""
    load_device, offload_device = bridge.devices_for(role, device)
    dtype = bridge.auto_dtype(role, load_device) if precision == "auto" else parse_dtype(precision)
    return load_device, offload_device, dtype


class CachingLoader:
    """Keeps the last loaded value per node instance, keyed by the files' signatures and the settings."""

    def _cached(self, key: tuple, load: Callable[[], T]) -> T:
        cache = getattr(self, "_cache", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        self._cache = None  # drop the old models before loading new ones
        value = load()
        self._cache = (key, value)
        return value


class VideoBoothModelLoader(CachingLoader):
    DESCRIPTION = ("Loads the VideoBooth 3D UNet (watermark_remove_module.pt or its safetensors conversion) and the "
                   "image-feature mapper (mapper.pt or its conversion) from the models/videobooth folder. The kind "
                   "of each file is checked from its keys.")
    CATEGORY = "VideoBooth/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The VideoBooth UNet and mapper, for the image-prompt encoder and the sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "unet_name": file_input(bridge.VIDEOBOOTH_FOLDER, "videobooth_unet", "The VideoBooth 3D UNet."),
            "mapper_name": file_input(bridge.VIDEOBOOTH_FOLDER, "videobooth_mapper",
                                       "The VideoBooth image-feature mapper (it also holds the UNet's attention "
                                       "projections, so it is needed even for text-only videos)."),
            "precision": (PRECISIONS, {"default": "auto", "tooltip": precision_tooltip(
                "fp16 (or bf16) on a GPU that supports it, fp32 on the CPU")}),
            "device": (DEVICES, {"default": "auto", "tooltip": _DEVICE_TOOLTIP}),
        }}

    @classmethod
    def IS_CHANGED(cls, unet_name: str, mapper_name: str, precision: str, device: str) -> str:
        return bridge.file_signature(bridge.VIDEOBOOTH_FOLDER, unet_name, mapper_name)

    def load(self, unet_name: str, mapper_name: str, precision: str, device: str) -> tuple[VideoBoothModel]:
        folder = bridge.VIDEOBOOTH_FOLDER
        key = (bridge.file_signature(folder, unet_name, mapper_name), precision, device)
        return (self._cached(key, lambda: self._load(unet_name, mapper_name, precision, device)),)

    def _load(self, unet_name: str, mapper_name: str, precision: str, device: str) -> VideoBoothModel:
        pair = load_model_pair(unet_name, mapper_name, precision, device)
        managed = bridge.ManagedModel({"unet": pair.unet, "mapper": pair.mapper}, pair.load_device, pair.offload_device)
        return VideoBoothModel(managed, pair.dtype, pair.unet_path, pair.mapper_path)


@dataclass(frozen=True)
class ModelPair:
    """The joined UNet and mapper of two files in the videobooth folder, with their precision and devices."""

    unet: Any
    mapper: Any
    dtype: Any
    load_device: Any
    offload_device: Any
    unet_path: Path
    mapper_path: Path


def load_model_pair(unet_name: str, mapper_name: str, precision: str, device: str) -> ModelPair:
    """The UNet and mapper files of the model loaders (the pack's and the native one), loaded on the offload device
    in the chosen precision; a wrong, broken or unsafe file is an error naming the folder and what belongs there."""
    folder = bridge.VIDEOBOOTH_FOLDER
    unet_path, mapper_path = bridge.model_path(folder, unet_name), bridge.model_path(folder, mapper_name)
    load_device, offload_device, dtype = placement("unet", device, precision)
    # the mapper's projections are attached to the UNet, which checks that the two belong together
    unet, mapper = load_checked(("videobooth_unet", "videobooth_mapper"), folder,
                                lambda: load_unet_and_mapper(unet_path, mapper_path, dtype, offload_device))
    logger.info("VideoBooth: loaded %s and %s (%s, compute on %s)", unet_name, mapper_name, dtype, load_device)
    return ModelPair(unet, mapper, dtype, load_device, offload_device, unet_path, mapper_path)


class VideoBoothVAELoader(CachingLoader):
    DESCRIPTION = ("Loads the Stable Diffusion 1.x VAE VideoBooth uses (sd-vae-ft-ema) from the models/vae folder, "
                   "with the pack's own loader (also for small or converted VAEs ComfyUI's Load VAE rejects).")
    CATEGORY = "VideoBooth/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE, for the image prompt's fine embedding and for decoding the video.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae_name": file_input("vae", "vae", "The SD 1.x VAE (single LDM-format or diffusers-format file)."),
            "precision": (PRECISIONS, {"default": "auto", "tooltip": _SMALL_MODEL_PRECISION}),
            "device": (DEVICES, {"default": "auto", "tooltip": _DEVICE_TOOLTIP}),
        }}

    @classmethod
    def IS_CHANGED(cls, vae_name: str, precision: str, device: str) -> str:
        return bridge.file_signature("vae", vae_name)

    def load(self, vae_name: str, precision: str, device: str) -> tuple[VideoBoothVAE]:
        key = (bridge.file_signature("vae", vae_name), precision, device)
        return (self._cached(key, lambda: self._load(vae_name, precision, device)),)

    def _load(self, vae_name: str, precision: str, device: str) -> VideoBoothVAE:
        from ..videobooth_core.loading.vae import load_vae

        path = bridge.model_path("vae", vae_name)
        load_device, offload_device, dtype = placement("vae", device, precision)
        vae = load_checked("vae", "vae", lambda: load_vae(path, dtype=dtype, device=offload_device))
        levels = len(vae.config.block_out_channels)
        if vae.config.latent_channels != 4 or levels != 4:
            raise CheckpointError(
                f"{path} is a VAE with {vae.config.latent_channels} latent channels and a downscale of "
                f"{2 ** (levels - 1)}; VideoBooth needs the SD 1.x VAE (4 channels, downscale 8). "
                f"Put {EXPECTED_FILES['vae']} into {bridge.describe_locations('vae')}."
            )
        return VideoBoothVAE(bridge.ManagedModel({"vae": vae}, load_device, offload_device), path)


def _tokenizer_roots() -> list[Path]:
    return [Path(p) for p in bridge.folder_locations("text_encoders") if os.path.isdir(p)]


def _is_tokenizer_dir(path: Path) -> bool:
    return (path / "vocab.json").is_file() and (path / "merges.txt").is_file()


def _tokenizer_dirs(roots: list[Path], depth: int = 2) -> dict[str, Path]:
    """Folders (up to ``depth`` levels down) holding a CLIP tokenizer, by name relative to their root."""
    found: dict[str, Path] = {}
    for root in roots:
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            if len(here.relative_to(root).parts) >= depth:
                dirnames[:] = []
            dirnames.sort()
            if here != root and _is_tokenizer_dir(here):
                found.setdefault(here.relative_to(root).as_posix(), here)
    return found


def _choose_tokenizer(choice: str, text_encoder_path: Path) -> Path:
    """The tokenizer folder: the chosen one, else (auto) one beside the text encoder file, one in the
    text_encoders folders, ComfyUI's bundled SD 1.x tokenizer (the same CLIP ViT-L/14 vocabulary)."""
    comfy_tokenizer = bridge.comfy_sd1_tokenizer_dir()
    if choice == COMFY_TOKENIZER and comfy_tokenizer is not None:
        return comfy_tokenizer
    found = _tokenizer_dirs(_tokenizer_roots())
    if choice != AUTO_TOKENIZER:
        if choice in found:
            return found[choice]
        raise CheckpointError(f"the tokenizer folder '{choice}' is gone from "
                              f"{bridge.describe_locations('text_encoders')}; pick another (refresh the node list).")
    beside = _tokenizer_dirs([text_encoder_path.parent], depth=1)
    for candidate in (*beside.values(), *found.values(), comfy_tokenizer):
        if candidate is not None:
            return candidate
    raise CheckpointError(
        "no CLIP tokenizer found: copy the 'tokenizer' folder of openai/clip-vit-large-patch14 (vocab.json and "
        f"merges.txt) into {bridge.describe_locations('text_encoders')}, e.g. as clip_tokenizer/ "
        "(inside ComfyUI, its bundled comfy/sd1_tokenizer is used when no other is found)."
    )


class VideoBoothCLIPLoader(CachingLoader):
    DESCRIPTION = ("Loads the CLIP ViT-L/14 text encoder (e.g. clip_l.safetensors from models/text_encoders) and its "
                   "tokenizer, for VideoBooth's token-replacement text encoding.")
    CATEGORY = "VideoBooth/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (CLIP,)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("The text encoder and tokenizer, for VideoBooth Text Encode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        tokenizers = [AUTO_TOKENIZER, *_tokenizer_dirs(_tokenizer_roots())]
        if bridge.comfy_sd1_tokenizer_dir() is not None:
            tokenizers.append(COMFY_TOKENIZER)
        return {"required": {
            "clip_name": file_input("text_encoders", "clip_text", "The CLIP ViT-L/14 text encoder."),
            "tokenizer": (tokenizers, {"default": AUTO_TOKENIZER, "tooltip": (
                "The CLIP tokenizer folder (vocab.json + merges.txt). auto: a tokenizer folder beside the text "
                "encoder or in the text_encoders folders, else ComfyUI's bundled SD 1.x tokenizer.")}),
            "precision": (PRECISIONS, {"default": "auto", "tooltip": _SMALL_MODEL_PRECISION}),
            "device": (DEVICES, {"default": "auto", "tooltip": _DEVICE_TOOLTIP}),
        }}

    @classmethod
    def IS_CHANGED(cls, clip_name: str, tokenizer: str, precision: str, device: str) -> str:
        return bridge.file_signature("text_encoders", clip_name)

    def load(self, clip_name: str, tokenizer: str, precision: str, device: str) -> tuple[VideoBoothCLIP]:
        key = (bridge.file_signature("text_encoders", clip_name), tokenizer, precision, device)
        return (self._cached(key, lambda: self._load(clip_name, tokenizer, precision, device)),)

    def _load(self, clip_name: str, tokenizer: str, precision: str, device: str) -> VideoBoothCLIP:
        from ..videobooth_core.loading.clip import load_clip_text_encoder
        from ..videobooth_core.conditioning.tokenizer import load_clip_tokenizer

        path = bridge.model_path("text_encoders", clip_name)
        tokenizer_path = _choose_tokenizer(tokenizer, path)
        load_device, offload_device, dtype = placement("text", device, precision)
        text_encoder = load_checked("clip_text", "text_encoders",
                                     lambda: load_clip_text_encoder(path, dtype=dtype, device=offload_device))
        loaded_tokenizer = load_clip_tokenizer(tokenizer_path)
        if len(loaded_tokenizer) > text_encoder.config.vocab_size:
            raise CheckpointError(
                f"the tokenizer in {tokenizer_path} has {len(loaded_tokenizer)} tokens but the text encoder "
                f"{clip_name} only {text_encoder.config.vocab_size}; pick the tokenizer made for this text encoder."
            )
        managed = bridge.ManagedModel({"text_encoder": text_encoder}, load_device, offload_device)
        return VideoBoothCLIP(managed, loaded_tokenizer, path, tokenizer_path)


class VideoBoothCLIPVisionLoader(CachingLoader):
    DESCRIPTION = ("Loads the CLIP ViT-L/14 vision encoder (e.g. from models/clip_vision) that feeds VideoBooth's "
                   "image-feature mapper (ViT-H/bigG towers do not fit the mapper).")
    CATEGORY = "VideoBooth/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (CLIP_VISION,)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The vision encoder, for VideoBooth Image Prompt Encode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "clip_name": file_input("clip_vision", "clip_vision", "The CLIP ViT-L/14 vision encoder."),
            "precision": (PRECISIONS, {"default": "auto", "tooltip": _SMALL_MODEL_PRECISION}),
            "device": (DEVICES, {"default": "auto", "tooltip": _DEVICE_TOOLTIP}),
        }}

    @classmethod
    def IS_CHANGED(cls, clip_name: str, precision: str, device: str) -> str:
        return bridge.file_signature("clip_vision", clip_name)

    def load(self, clip_name: str, precision: str, device: str) -> tuple[VideoBoothCLIPVision]:
        key = (bridge.file_signature("clip_vision", clip_name), precision, device)
        return (self._cached(key, lambda: self._load(clip_name, precision, device)),)

    def _load(self, clip_name: str, precision: str, device: str) -> VideoBoothCLIPVision:
        from ..videobooth_core.loading.clip import load_clip_vision_encoder

        path = bridge.model_path("clip_vision", clip_name)
        load_device, offload_device, dtype = placement("vision", device, precision)
        vision = load_checked("clip_vision", "clip_vision",
                               lambda: load_clip_vision_encoder(path, dtype=dtype, device=offload_device))
        if vision.config.num_hidden_layers < 16:
            raise CheckpointError(
                f"{path} is a CLIP vision tower with {vision.config.num_hidden_layers} layers; VideoBooth's mapper "
                f"reads layer 16, so it needs {EXPECTED_FILES['clip_vision']}."
            )
        managed = bridge.ManagedModel({"vision_encoder": vision}, load_device, offload_device)
        return VideoBoothCLIPVision(managed, path)


class VideoBoothConvertWeights:
    DESCRIPTION = ("Converts the released VideoBooth pickles (watermark_remove_module.pt, mapper.pt) in "
                   "models/videobooth to videobooth_unet.safetensors and videobooth_mapper.safetensors beside them: "
                   "safe to load, faster, and half the size in fp16. Same as `python -m videobooth_core convert`. "
                   "Refresh the node lists (R) afterwards.")
    CATEGORY = "VideoBooth/loaders"
    FUNCTION = "convert"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("summary",)
    OUTPUT_TOOLTIPS = ("What was written or skipped.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        folder = bridge.VIDEOBOOTH_FOLDER
        unet = file_input(folder, "videobooth_unet", "The released UNet pickle to convert, or none.", (NO_FILE,))
        mapper = file_input(folder, "videobooth_mapper", "The released mapper pickle to convert, or none.", (NO_FILE,))
        return {
            "required": {
                "unet_name": unet,
                "mapper_name": mapper,
                "precision": (list(CORE_PRECISIONS), {"default": CONVERT_PRECISION, "tooltip": (
                    "Precision of the converted weights: fp16 halves the size; fp32 keeps the released values "
                    "exactly.")}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": (
                    "Replace existing converted files; when off, a file that already exists is skipped.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def convert(self, unet_name: str, mapper_name: str, precision: str, overwrite: bool,
                unique_id: str | None = None) -> dict:
        folder = bridge.VIDEOBOOTH_FOLDER
        chosen = (("unet", unet_name), ("mapper", mapper_name))
        sources = {label: bridge.model_path(folder, name) for label, name in chosen if name != NO_FILE}
        if not sources:
            raise CheckpointError("nothing to convert: choose the UNet and/or the mapper file.")
        lines = []
        for label, source in sources.items():
            target = source.parent / f"videobooth_{label}.safetensors"
            if source.resolve() == target.resolve():
                lines.append(f"{label}: {source.name} is already the converted file; skipped")
                continue
            if target.exists() and not overwrite:
                lines.append(f"{label}: {target} exists; skipped (turn on overwrite to replace it)")
                continue
            progress = bridge.Progress(1, unique_id)

            def report(_label: str, done: int, total: int, progress: bridge.Progress = progress) -> None:
                progress.total = total
                progress.update(done)
                bridge.check_interrupt()

            kind = "videobooth_unet" if label == "unet" else "videobooth_mapper"
            unet, mapper = (source, None) if label == "unet" else (None, source)
            written = load_checked(kind, folder, partial(convert_released_weights, unet, mapper, source.parent,
                                                          precision, report))
            for path in written:
                size = path.stat().st_size
                shown = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
                lines.append(f"{label}: wrote {path} ({shown}, {precision})")
        summary = "\n".join(lines)
        logger.info("VideoBooth conversion:\n%s", summary)
        return {"ui": {"text": [summary]}, "result": (summary,)}


NODE_CLASS_MAPPINGS = {
    "VideoBoothModelLoader": VideoBoothModelLoader,
    "VideoBoothVAELoader": VideoBoothVAELoader,
    "VideoBoothCLIPLoader": VideoBoothCLIPLoader,
    "VideoBoothCLIPVisionLoader": VideoBoothCLIPVisionLoader,
    "VideoBoothConvertWeights": VideoBoothConvertWeights,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VideoBoothModelLoader": "VideoBooth Model Loader",
    "VideoBoothVAELoader": "VideoBooth VAE Loader",
    "VideoBoothCLIPLoader": "VideoBooth CLIP Text Encoder Loader",
    "VideoBoothCLIPVisionLoader": "VideoBooth CLIP Vision Loader",
    "VideoBoothConvertWeights": "VideoBooth Convert Weights",
}
