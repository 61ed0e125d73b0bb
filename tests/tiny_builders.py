"""Seeded tiny CLIP towers and VAE for the encoder tests (only tests build them; ``make-tiny`` writes its own).

Each builder draws its initial weights from its seed and then perturbs every parameter (norm scales and biases
too), so that a test sees every weight matter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import diffusers
import torch
import transformers

from videobooth_core.app.tiny import tiny_clip_text_config, tiny_clip_vision_config, tiny_vae_config


def _perturb_(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter (norm scales and biases too) with seeded noise so that all of them matter.

    Only the seeded builders below do this; ``make_tiny`` keeps the libraries' own initialisation of its
    towers and VAE (its files underlie a pinned end-to-end result)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.add_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.02)


def _build_seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    _perturb_(model, seed + 1)
    model.eval()
    model.requires_grad_(False)
    return model


def build_tiny_clip_text_encoder(
    seed: int = 0, config: transformers.CLIPTextConfig | None = None, attn_implementation: str = "eager"
) -> transformers.CLIPTextModel:
    """A seeded, randomly initialised ``CLIPTextModel`` (default :func:`tiny_clip_text_config`), eval mode."""
    cfg = config if config is not None else tiny_clip_text_config()
    return _build_seeded(
        lambda: transformers.CLIPTextModel._from_config(cfg, attn_implementation=attn_implementation), seed
    )


def build_tiny_clip_vision_encoder(
    seed: int = 0, config: transformers.CLIPVisionConfig | None = None, attn_implementation: str = "eager"
) -> transformers.CLIPVisionModel:
    """A seeded, randomly initialised ``CLIPVisionModel`` (default :func:`tiny_clip_vision_config`), eval mode."""
    cfg = config if config is not None else tiny_clip_vision_config()
    return _build_seeded(
        lambda: transformers.CLIPVisionModel._from_config(cfg, attn_implementation=attn_implementation), seed
    )


def build_tiny_vae(seed: int = 0, config: Mapping[str, Any] | None = None) -> diffusers.AutoencoderKL:
    """A seeded, randomly initialised ``AutoencoderKL`` (default :func:`tiny_vae_config`), eval mode."""
    cfg = dict(config if config is not None else tiny_vae_config())
    return _build_seeded(lambda: diffusers.AutoencoderKL.from_config(cfg), seed)
