"""``make-tiny``: a complete VideoBooth model set with tiny random weights, in the real file formats.

The files have the released names and layouts (``watermark_remove_module.pt`` with ``ema_unet``, ``mapper.pt``
with ``ema``, a single-file LDM VAE, single-file CLIP towers, a BPE tokenizer folder) and sit in ComfyUI's
model folder names, so the folder works as ``--models`` for the command line and as a ComfyUI models folder.
The UNet keeps the released model's 8 heads and 32 groups, so no config has to travel with the pickles.
Weights are random: the outputs are noise-like videos, useful only to exercise the whole pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..models.config import MapperConfig, UNetConfig
from ..models.mapper import Mapper
from ..models.unet_3d import UNet3DModel

logger = logging.getLogger(__name__)

TINY_UNET = UNetConfig(
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    num_attention_heads=8,
    norm_num_groups=32,
    cross_attention_dim=32,
    watermark_block_out_channels=(32, 64, 64),
)
TINY_MAPPER_HIDDEN = 64

UNET_FILE = "videobooth/watermark_remove_module.pt"
MAPPER_FILE = "videobooth/mapper.pt"
VAE_FILE = "vae/videobooth_tiny_vae.safetensors"
CLIP_VISION_FILE = "clip_vision/videobooth_tiny_clip_vision.safetensors"
CLIP_TEXT_FILE = "text_encoders/videobooth_tiny_clip_text.safetensors"
TOKENIZER_DIR = "text_encoders/videobooth_tiny_tokenizer"
MARKER_FILE = "VIDEOBOOTH_TINY_RANDOM_WEIGHTS.txt"


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a small random value (including those the official code zero-initialises,
    so every module influences the output)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias") or param.ndim == 1:
                if "norm" in name and name.endswith("weight"):
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def tiny_unet_and_mapper(vision_width: int, text_width: int, seed: int = 0) -> tuple[UNet3DModel, Mapper]:
    """A tiny random UNet and its mapper (per-site projections for every attention site)."""
    generator = torch.Generator().manual_seed(seed)
    unet = UNet3DModel(TINY_UNET if TINY_UNET.cross_attention_dim == text_width else
                       UNetConfig(**{**TINY_UNET.__dict__, "cross_attention_dim": text_width}))
    _randomise(unet, generator)
    sites = tuple(sorted((site.site, site.proj_in.out_channels) for site in unet.attention_sites))
    mapper = Mapper(MapperConfig(input_dim=vision_width, hidden_dim=TINY_MAPPER_HIDDEN, output_dim=text_width,
                                 site_channels=sites))
    _randomise(mapper, generator)
    return unet.eval(), mapper.eval()


def make_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model set into ``out_dir`` (created if needed) and return it."""
    from ..loading.encoders import (
        save_clip_text_single_file,
        save_clip_vision_single_file,
        save_vae_ldm_single_file,
        tiny_clip_text_config,
        tiny_clip_vision_config,
        tiny_vae_config,
        write_tiny_tokenizer,
    )
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPVisionModel

    out = Path(out_dir)
    for sub in ("videobooth", "vae", "clip_vision", "text_encoders"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)  # transformers/diffusers initialise from the global generator
    text_config, vision_config = tiny_clip_text_config(), tiny_clip_vision_config()
    text = CLIPTextModel(text_config).eval()
    vision = CLIPVisionModel(vision_config).eval()
    vae = AutoencoderKL(**tiny_vae_config()).eval()
    unet, mapper = tiny_unet_and_mapper(vision_config.hidden_size, text_config.hidden_size, seed)

    _atomic_torch_save({"ema_unet": unet.state_dict()}, out / UNET_FILE)
    _atomic_torch_save({"ema": mapper.state_dict()}, out / MAPPER_FILE)
    save_vae_ldm_single_file(vae, out / VAE_FILE)
    save_clip_vision_single_file(vision, out / CLIP_VISION_FILE)
    save_clip_text_single_file(text, out / CLIP_TEXT_FILE)
    write_tiny_tokenizer(out / TOKENIZER_DIR)
    (out / MARKER_FILE).write_text(
        "These VideoBooth models are TINY and RANDOM (written by `python -m videobooth_core make-tiny`).\n"
        "They exercise the whole pipeline but generate noise. Real weights: see the README.\n"
    )
    logger.info("wrote the tiny model set to %s", out)
    return out


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    tmp.replace(path)
