"""The cross-frame sampler (image-prompted or text-only) and the VideoBooth VAE decode."""

from __future__ import annotations

import logging
from typing import Any

import torch
from einops import rearrange

from ..videobooth_core.errors import PromptError, SamplingError
from ..videobooth_core.pipeline import GenerationRequest, fit_exemplar, latent_shape
from ..videobooth_core.sampling.memory import estimate_step_memory
from ..videobooth_core.sampling.schedulers import OFFICIAL_SAMPLER, SPACINGS, sample_with_scheduler
from ..videobooth_core.sampling.schedulers import SAMPLERS as CORE_SAMPLERS
from ..videobooth_core.sampling.loop import GUIDANCE_RULES, GeneratorNoise, VideoDenoiser, sample_ddpm
from ..videobooth_core.sampling.schedule import RespacedDDPM
from . import _bridge as bridge
from ._types import CONDITIONING, EXEMPLAR, MODEL, VAE, Conditioning, Exemplar, VideoBoothModel, VideoBoothVAE

logger = logging.getLogger(__name__)

SAMPLERS = list(CORE_SAMPLERS)
"""ddpm: the official respaced ancestral DDPM (linear betas, fixed-large variance); the others: diffusers'
schedulers on the same linear-beta training schedule."""
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def _sampling_memory(denoiser: VideoDenoiser, shape: tuple[int, ...], image_prompt: bool, device: torch.device) -> int:
    """Working memory (bytes) of one guided step beyond the weights: a dry run of the step on the meta device
    (videobooth_core.sampling.memory), so ComfyUI frees that much before sampling."""
    estimate = estimate_step_memory(denoiser, shape, image_prompt, device)
    logger.info("VideoBooth Sampler: %s", estimate.describe())
    return estimate.activations_bytes


def _decode_memory(frames: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Working memory (bytes) to decode ``frames`` frames: about 2048 values per output pixel at the peak."""
    return int(frames * height * width * 64 * 2048 * torch.finfo(dtype).bits / 8)


class VideoBoothSampler:
    DESCRIPTION = ("Generates video latents with VideoBooth's cross-frame UNet: classifier-free guidance on the "
                   "conditioning and, with an exemplar, the image prompt injected at every step. Outputs a LATENT in "
                   "ComfyUI's SD 1.x layout (frames in the batch axis, unscaled VAE latents): decode it with "
                   "VideoBooth Decode (or ComfyUI's VAE Decode with a full SD 1.x VAE) and send the frames to any "
                   "video node. Without an exemplar and image embeddings it is plain text-to-video.")
    CATEGORY = "VideoBooth/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("batch x frames latents (frames, 4, height/8, width/8), all frames of video 0 first.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The VideoBooth UNet and mapper."}),
                "conditioning": (CONDITIONING, {"tooltip": "From VideoBooth Text Encode."}),
                "seed": ("INT", {"default": 10, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": (
                    "Seed of all the noise (drawn on the CPU, so a seed gives the same video on any device and "
                    "the same as the command line). Video i of a batch uses seed + i.")}),
                "steps": ("INT", {"default": 250, "min": 1, "max": 1000, "tooltip": (
                    "Denoising steps; 250 with ddpm is the official setting. Each step costs the same with every "
                    "sampler, so time is proportional to steps: dpmpp_2m or unipc need far fewer (about 25) for a "
                    "converged result.")}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01, "tooltip": (
                    "Classifier-free guidance scale; 4.0 is the official setting.")}),
                "sampler": (SAMPLERS, {"default": "ddpm", "tooltip": (
                    "ddpm: the official respaced ancestral DDPM sampler (the reference, 250 steps). ddim, dpmpp_2m, "
                    "euler, euler_ancestral, unipc: diffusers' samplers on VideoBooth's own linear-beta schedule "
                    "(never SD's), the image prompt re-noised to every step's timestep.")}),
                "guidance": (list(GUIDANCE_RULES), {"default": "official", "tooltip": (
                    "official: guidance on latent channels 0-2 and the conditional prediction on channel 3, as "
                    "released; all: guidance on every channel.")}),
                "frames": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": (
                    "Frames per video; the model was trained on 16.")}),
                "width": ("INT", {"default": 256, "min": 8, "max": 2048, "step": 8, "tooltip": (
                    "Video width in pixels, a multiple of 8; the model was trained at 256.")}),
                "height": ("INT", {"default": 256, "min": 8, "max": 2048, "step": 8, "tooltip": (
                    "Video height in pixels, a multiple of 8; the model was trained at 256.")}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": (
                    "Number of videos, generated one after another with seeds seed, seed+1, ...; their frames are "
                    "stacked in the LATENT batch (all frames of video 0, then video 1, ...).")}),
            },
            "optional": {
                "exemplar": (EXEMPLAR, {"tooltip": (
                    "The image prompt's latent from VideoBooth Latent Injection (the fine embedding); leave "
                    "unconnected for text-to-video.")}),
                "spacing": (list(SPACINGS), {"default": "trailing", "tooltip": (
                    "Timestep spacing of the diffusers samplers: trailing (starts at the noisiest timestep, best at "
                    "few steps) or leading. The ddpm sampler always uses the official respacing.")}),
                "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                    "DDIM only: 0 is deterministic DDIM, 1 adds DDPM-like fresh noise at every step.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model: VideoBoothModel, conditioning: Conditioning, seed: int, steps: int, cfg: float,
               sampler: str, guidance: str, frames: int, width: int, height: int, batch: int,
               exemplar: Exemplar | None = None, spacing: str = "trailing", eta: float = 0.0,
               unique_id: str | None = None) -> tuple[dict[str, torch.Tensor]]:
        GenerationRequest(prompt="", frames=frames, width=width, height=height, steps=steps, cfg_scale=cfg,
                          guidance=guidance, seed=seed, sampler=sampler, spacing=spacing, eta=eta).validate()
        if not 0.0 <= eta <= 1.0:
            raise SamplingError(f"eta must be between 0 and 1, got {eta}.")
        if batch < 1:
            raise SamplingError(f"batch must be at least 1, got {batch}.")
        expected = model.unet.config.cross_attention_dim
        if conditioning.cond.shape[-1] != expected:
            raise PromptError(
                f"the conditioning has width {conditioning.cond.shape[-1]} but the UNet expects {expected}; encode the "
                "prompt with the text encoder of the same model set."
            )
        encode_with_vae = exemplar is not None and exemplar.latent is None
        managed = [model.managed] + ([exemplar.vae.managed] if encode_with_vae else [])
        shape = latent_shape(frames, height, width)
        strength, window = (1.0, (0.0, 1.0)) if exemplar is None else (exemplar.strength,
                                                                        (exemplar.start, exemplar.end))
        denoiser = VideoDenoiser(model.unet, conditioning.cond, conditioning.null, cfg, guidance,
                                 image_prompt_strength=strength)
        working = _sampling_memory(denoiser, shape, exemplar is not None, model.managed.load_device)
        bridge.activate(managed, memory_required=working)
        device = model.managed.load_device
        denoiser.cond_text, denoiser.null_text = conditioning.cond.to(device), conditioning.null.to(device)
        progress = bridge.Progress(batch * steps, unique_id)
        videos = []
        for index in range(batch):
            bridge.check_interrupt()
            generator = torch.Generator("cpu").manual_seed((seed + index) % (MAX_SEED + 1))
            initial_noise = torch.randn(shape, generator=generator)  # the official order: z first
            exemplar_clean = self._exemplar_latent(exemplar, generator, height, width)
            noise = GeneratorNoise(generator, device, initial_noise)
            report = bridge.step_reporter(progress, index * steps)
            with torch.no_grad():
                if sampler == OFFICIAL_SAMPLER:
                    latents = sample_ddpm(denoiser, RespacedDDPM(steps), shape, noise, exemplar_clean, report, device,
                                          image_prompt_steps=window)
                else:
                    latents = sample_with_scheduler(denoiser, sampler, steps, shape, noise, generator, exemplar_clean,
                                                    report, device, spacing, eta, window)
            videos.append(latents.cpu())
        return (bridge.video_latents_to_comfy(torch.cat(videos)),)

    @staticmethod
    def _exemplar_latent(exemplar: Exemplar | None, generator: torch.Generator, height: int,
                         width: int) -> torch.Tensor | None:
        """The clean (1, 4, 1, h, w) exemplar at the video's latent size; a VAE posterior sample drawn from the
        video's generator when it comes from the image prompt."""
        if exemplar is None:
            return None
        if exemplar.latent is not None:
            return fit_exemplar(exemplar.latent, height, width)
        from ..videobooth_core.loading.encoders import vae_encode

        with torch.no_grad():
            latent = vae_encode(exemplar.vae.vae, exemplar.image_prompt.vae_pixels, generator=generator, sample=True)
        return fit_exemplar(rearrange(latent.float(), "b c h w -> b c 1 h w"), height, width)


class VideoBoothDecode:
    DESCRIPTION = ("Decodes VideoBooth latents to IMAGE frames (frames, height, width, 3) in 0..1 with the VideoBooth "
                   "VAE, a chunk of frames at a time; the frames go straight into Video Combine, frame interpolation "
                   "or upscalers.")
    CATEGORY = "VideoBooth/sampling"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The video frames as an IMAGE batch (all frames of video 0 first), on the CPU.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": (VAE, {"tooltip": "The VideoBooth VAE (SD 1.x)."}),
                "samples": ("LATENT", {"tooltip": "Latents from VideoBooth Sampler (frames in the batch axis)."}),
                "chunk_size": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip": (
                    "Frames decoded at once: lower it if decoding runs out of memory.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def decode(self, vae: VideoBoothVAE, samples: dict[str, Any], chunk_size: int,
               unique_id: str | None = None) -> tuple[torch.Tensor]:
        from ..videobooth_core.loading.encoders import vae_decode

        if chunk_size < 1:
            raise SamplingError(f"chunk_size must be at least 1, got {chunk_size}.")
        latents = bridge.comfy_latent_to_core(bridge.comfy_latent_samples(samples, "VideoBooth Decode"))
        count, _, h, w = latents.shape
        dtype = next(vae.vae.parameters()).dtype
        bridge.activate([vae.managed], memory_required=_decode_memory(min(chunk_size, count), h, w, dtype))
        progress = bridge.Progress(count, unique_id)
        images = []
        for start in range(0, count, chunk_size):
            bridge.check_interrupt()
            with torch.no_grad():
                pixels = vae_decode(vae.vae, latents[start:start + chunk_size], chunk_size=chunk_size)
            images.append(bridge.pixels_to_image(pixels))
            progress.update(min(start + chunk_size, count))
        return (torch.cat(images),)


NODE_CLASS_MAPPINGS = {"VideoBoothSampler": VideoBoothSampler, "VideoBoothDecode": VideoBoothDecode}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VideoBoothSampler": "VideoBooth Sampler (cross-frame)",
    "VideoBoothDecode": "VideoBooth Decode",
}
