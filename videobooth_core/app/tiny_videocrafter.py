"""Tiny random VideoCrafter model sets (``make-tiny --family videocrafter1-t2v-512 | videocrafter1-t2v-1024 |
videocrafter1-i2v-512 | videocrafter2``), in the released layout: one ``videocrafter/<family>.ckpt`` holding a whole
LVDM ``LatentDiffusion`` state dict under ``state_dict`` (the tiny UNet of the family, an SD-layout VAE, an OpenCLIP
text tower under ``cond_stage_model.model.``, for I2V an OpenCLIP visual tower under ``embedder.model.visual.`` and
the projector, and the schedule buffers), plus the tiny CLIP BPE tokenizer. Weights are random: the videos are
noise; the set exercises every stage of the VideoCrafter path (loader, text and image encoders, sampler, VAE).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from ..models.videocrafter.config import (
    KIND_I2V_512_V1,
    KIND_T2V_512_V1,
    RELEASED_SAMPLING,
    RELEASED_UNETS,
    ImageProjectorConfig,
)
from .tiny import TOKENIZER_DIR, write_tiny_tokenizer

logger = logging.getLogger(__name__)

FAMILIES = tuple(RELEASED_UNETS)
TINY_WIDTH = 32
TINY_CONTEXT = 32
VISION_WIDTH = 32
VISION_LAYERS = 2
TEXT_LAYERS = 2


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Small random values everywhere, the zero-initialised layers included (so every module acts)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1:
                offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                param.copy_(offset + 0.05 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)


def tiny_guided_eps(kind: str):
    """The guided eps function (:func:`~..sampling.videocrafter.guided_unet`) of a tiny random UNet of ``kind``
    with random contexts (77 text tokens, + 16 image tokens for I2V) and the kind's official fps: what the sampler
    tests and ``benchmarks/videocrafter_samplers.py`` sample with."""
    from ..models.videocrafter.unet import VideoCrafterUNet
    from ..sampling.videocrafter import guided_unet

    config = tiny_unet_config(kind)
    unet = VideoCrafterUNet(config).eval()
    _randomise(unet, torch.Generator().manual_seed(1))
    tokens = 77 + (16 if config.use_image_attention else 0)
    context = torch.randn(2, tokens, config.context_dim, generator=torch.Generator().manual_seed(2))
    return guided_unet(unet, context[:1], context[1:], torch.tensor([RELEASED_SAMPLING[kind].fps]))


def tiny_unet_config(family: str):
    """The family's switches at width 32/64, one res block per level, attention at the first level."""
    return replace(RELEASED_UNETS[family], model_channels=TINY_WIDTH, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(1,), num_head_channels=8, context_dim=TINY_CONTEXT)


TINY_PROJECTOR = ImageProjectorConfig(dim=TINY_CONTEXT, depth=1, dim_head=TINY_CONTEXT, heads=1, num_queries=16,
                                      embedding_dim=VISION_WIDTH, output_dim=TINY_CONTEXT, ff_mult=2)
"""One head of the whole width, what the loader reads from these shapes (heads are not in the shapes)."""


def _openclip_blocks(width: int, layers: int, generator: torch.Generator, prefix: str) -> dict[str, torch.Tensor]:
    """Random ``transformer.resblocks.N.*`` tensors of an OpenCLIP tower (fused in_proj, c_fc / c_proj MLP)."""
    def rand(*shape: int, scale: float = 0.02, offset: float = 0.0) -> torch.Tensor:
        return offset + scale * torch.randn(shape, generator=generator)

    out = {}
    for n in range(layers):
        block = f"{prefix}transformer.resblocks.{n}."
        out.update({
            block + "ln_1.weight": rand(width, scale=0.1, offset=1.0), block + "ln_1.bias": rand(width),
            block + "attn.in_proj_weight": rand(3 * width, width, scale=width ** -0.5),
            block + "attn.in_proj_bias": rand(3 * width),
            block + "attn.out_proj.weight": rand(width, width, scale=width ** -0.5),
            block + "attn.out_proj.bias": rand(width),
            block + "ln_2.weight": rand(width, scale=0.1, offset=1.0), block + "ln_2.bias": rand(width),
            block + "mlp.c_fc.weight": rand(4 * width, width, scale=width ** -0.5), block + "mlp.c_fc.bias": rand(4 * width),
            block + "mlp.c_proj.weight": rand(width, 4 * width, scale=(4 * width) ** -0.5),
            block + "mlp.c_proj.bias": rand(width),
        })
    return out


def tiny_text_tower(vocab_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``cond_stage_model.model.*``: a random OpenCLIP text tower, width 32 (one head), 2 blocks."""
    prefix = "cond_stage_model.model."
    out = {prefix + "token_embedding.weight": 0.02 * torch.randn(vocab_size, TINY_CONTEXT, generator=generator),
           prefix + "positional_embedding": 0.01 * torch.randn(77, TINY_CONTEXT, generator=generator)}
    out.update(_openclip_blocks(TINY_CONTEXT, TEXT_LAYERS, generator, prefix))
    out.update({prefix + "ln_final.weight": torch.ones(TINY_CONTEXT), prefix + "ln_final.bias": torch.zeros(TINY_CONTEXT),
                prefix + "text_projection": torch.randn(TINY_CONTEXT, TINY_CONTEXT, generator=generator) * 0.1,
                prefix + "logit_scale": torch.tensor(4.6052)})
    return out


def tiny_vision_tower(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``embedder.model.visual.*``: a random OpenCLIP ViT tower at 224 px, patch 14, width 32 (one head)."""
    prefix = "embedder.model.visual."
    w = VISION_WIDTH
    out = {prefix + "conv1.weight": torch.randn(w, 3, 14, 14, generator=generator) / (3 * 14 * 14) ** 0.5,
           prefix + "class_embedding": 0.02 * torch.randn(w, generator=generator),
           prefix + "positional_embedding": 0.02 * torch.randn(257, w, generator=generator),
           prefix + "ln_pre.weight": torch.ones(w), prefix + "ln_pre.bias": torch.zeros(w)}
    out.update(_openclip_blocks(w, VISION_LAYERS, generator, prefix))
    out.update({prefix + "ln_post.weight": torch.ones(w), prefix + "ln_post.bias": torch.zeros(w),
                prefix + "proj": torch.randn(w, w, generator=generator) * 0.1})
    return out


def schedule_buffers(use_scale: bool, scale_b: float, fix_scale_bug: bool) -> dict[str, torch.Tensor]:
    """The top-level buffers a strict official load expects (DDPM.register_schedule), float32."""
    from ..sampling.videocrafter import LINEAR_END, LINEAR_START, x0_scale_array

    betas = np.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    prev = np.append(1.0, alphas_cumprod[:-1])
    variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / alphas_cumprod - 1), "posterior_variance": variance,
        "posterior_log_variance_clipped": np.log(np.maximum(variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - betas) / (1 - alphas_cumprod),
    }
    out = {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}
    if use_scale:
        out["scale_arr"] = x0_scale_array(scale_b, fix_scale_bug)
    return out


def tiny_videocrafter_state_dict(family: str, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole tiny ``LatentDiffusion`` state dict of ``family`` with the released key names."""
    from diffusers import AutoencoderKL

    from ..loading.vae import convert_diffusers_vae_to_ldm
    from ..models.videocrafter.resampler import ImageProjector
    from ..models.videocrafter.unet import VideoCrafterUNet

    generator = torch.Generator().manual_seed(seed)
    unet = VideoCrafterUNet(tiny_unet_config(family))
    _randomise(unet, generator)
    torch.manual_seed(seed)  # diffusers initialises from the global generator
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32],
                        layers_per_block=1, latent_channels=4, norm_num_groups=32)
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    state.update({"first_stage_model." + k: v for k, v in convert_diffusers_vae_to_ldm(vae.state_dict()).items()})
    state.update(tiny_text_tower(vocab_size, generator))
    if family == KIND_I2V_512_V1:
        projector = ImageProjector(TINY_PROJECTOR)
        _randomise(projector, generator)
        state.update({"image_proj_model." + k: v for k, v in projector.state_dict().items()})
        state.update(tiny_vision_tower(generator))
    sampling = RELEASED_SAMPLING[family]
    state.update(schedule_buffers(sampling.use_scale, sampling.scale_b, sampling.fix_scale_bug))
    return {k: v.detach().contiguous() for k, v in state.items()}


def make_tiny_videocrafter(out_dir: str | Path, family: str = KIND_T2V_512_V1, seed: int = 0) -> Path:
    """Write ``videocrafter/<family>.ckpt`` and the tiny tokenizer into ``out_dir``; returns the checkpoint."""
    from ..loading.weight_files import save_torch_file

    if family not in FAMILIES:
        from ..errors import VideoBoothError, explain

        raise VideoBoothError(explain("unknown VideoCrafter family", family, f"choose one of {', '.join(FAMILIES)}"))
    out = Path(out_dir)
    (out / "videocrafter").mkdir(parents=True, exist_ok=True)
    (out / "text_encoders").mkdir(parents=True, exist_ok=True)
    info = write_tiny_tokenizer(out / TOKENIZER_DIR)
    path = out / "videocrafter" / f"{family}.ckpt"
    save_torch_file({"state_dict": tiny_videocrafter_state_dict(family, info.vocab_size, seed)}, path)
    with atomic_path(out / "VIDEOCRAFTER_TINY_RANDOM_WEIGHTS.txt") as tmp:
        tmp.write_text("These VideoCrafter models are TINY and RANDOM (written by `python -m videobooth_core make-tiny "
                       "--family ...`). They exercise the whole pipeline but generate noise.\n")
    logger.info("wrote the tiny %s set to %s", family, out)
    return path
