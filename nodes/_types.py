"""The values that travel on the pack's own sockets (custom ComfyUI types).

Socket type names are part of the public API (saved workflows store them): never rename one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..videobooth_core.conditioning.image_prompt import PreparedImagePrompt
from ._bridge import ManagedModel

MODEL = "VIDEOBOOTH_MODEL"
VAE = "VIDEOBOOTH_VAE"
CLIP = "VIDEOBOOTH_CLIP"
CLIP_VISION = "VIDEOBOOTH_CLIP_VISION"
IMAGE_PROMPT = "VIDEOBOOTH_IMAGE_PROMPT"
"""A ``videobooth_core.conditioning.image_prompt.PreparedImagePrompt``."""
IMAGE_EMBEDS = "VIDEOBOOTH_IMAGE_EMBEDS"
CONDITIONING = "VIDEOBOOTH_CONDITIONING"
EXEMPLAR = "VIDEOBOOTH_EXEMPLAR"


@dataclass(frozen=True)
class VideoBoothModel:
    """The 3D UNet and the mapper (which also holds the UNet's per-site K/V projections), moved together."""

    managed: ManagedModel
    dtype: torch.dtype
    unet_path: Path
    mapper_path: Path

    @property
    def unet(self) -> torch.nn.Module:
        return self.managed.module("unet")

    @property
    def mapper(self) -> torch.nn.Module:
        return self.managed.module("mapper")


@dataclass(frozen=True)
class VideoBoothVAE:
    managed: ManagedModel
    path: Path

    @property
    def vae(self) -> torch.nn.Module:
        return self.managed.module("vae")


@dataclass(frozen=True)
class VideoBoothCLIP:
    """The CLIP text encoder and its tokenizer."""

    managed: ManagedModel
    tokenizer: object
    path: Path
    tokenizer_path: Path

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.managed.module("text_encoder")


@dataclass(frozen=True)
class VideoBoothCLIPVision:
    managed: ManagedModel
    path: Path

    @property
    def vision_encoder(self) -> torch.nn.Module:
        return self.managed.module("vision_encoder")


@dataclass(frozen=True)
class ImageEmbeds:
    """The coarse image-prompt embedding: the mapper's word vectors (1, 5, text width) float32, CPU."""

    words: torch.Tensor


@dataclass(frozen=True)
class Conditioning:
    """Text states for guidance: ``cond`` and ``null`` (1, 77, text width) float32 on the CPU."""

    cond: torch.Tensor
    null: torch.Tensor
    prompt_used: str
    """The prompt as tokenised (lower-cased, subject word replaced by the placeholder when image-prompted)."""
    image_prompted: bool


@dataclass(frozen=True)
class Exemplar:
    """The fine image-prompt embedding's source and how it is injected.

    Either ``latent`` (a clean (1, 4, 1, h, w) latent at core scale, e.g. from ComfyUI's VAE Encode) or
    ``image_prompt`` + ``vae``: then the sampler encodes it (VAE posterior sample) with each video's seeded
    generator right after drawing the initial noise, the official order, so a seed gives the same video
    as the command line.
    """

    strength: float
    start: float
    end: float
    latent: torch.Tensor | None = None
    image_prompt: PreparedImagePrompt | None = None
    vae: VideoBoothVAE | None = None
