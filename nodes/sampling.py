"""The cross-frame sampler (image-prompted or text-only) and the VideoBooth VAE decode."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..videobooth_core.errors import SamplingError, explain
from ..videobooth_core.pipeline import GenerationRequest, decode_video, latent_shape, sample_seeded
from ..videobooth_core.sampling.run import prepare_denoiser
from ..videobooth_core.sampling.schedulers import SAMPLERS as CORE_SAMPLERS
from ..videobooth_core.sampling.schedulers import SPACINGS
from ..videobooth_core.sampling.denoiser import GUIDANCE_RULES
from ..videobooth_core.settings import MAX_SEED, VAE_SCALE, widget
from . import _bridge as bridge
from ._widgets import check_widgets, widget_names
from ._types import CONDITIONING, EXEMPLAR, MODEL, VAE, Conditioning, Exemplar, VideoBoothModel, VideoBoothVAE
from .subjects import SUBJECTS, sampler_subjects
from .long_video import CONTEXT, ContextOptions

logger = logging.getLogger(__name__)

SAMPLER_NAMES = widget_names({
    "context_window": "context_window (VideoBooth Context Options)",
    "context_overlap": "context_overlap (VideoBooth Context Options)",
    "subject_strength": "the strength of each subject's VideoBooth Latent Injection",
    "image": "image_embeds", "word": "subject_word",
})
"""How the core's validation names the settings that are not the Sampler's own widgets."""

SAMPLERS = list(CORE_SAMPLERS)
"""ddpm: the official respaced ancestral DDPM (linear betas, fixed-large variance); the others: diffusers'
schedulers on the same linear-beta training schedule."""


def _decode_memory(frames: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Working memory (bytes) to decode ``frames`` frames: about 2048 values per output pixel at the peak."""
    return int(frames * height * width * 64 * 2048 * torch.finfo(dtype).bits / 8)


def check_start_frames(start: torch.Tensor, frames: int, width: int, height: int) -> None:
    """The start frames' latents (1, 4, n, h, w) fit the video the widgets ask for: its size, in pixels, and at
    least one frame left to generate; SamplingError in the widgets' words otherwise (the core checks the same,
    in its callers' terms)."""
    count, start_height, start_width = start.shape[2], start.shape[3] * VAE_SCALE, start.shape[4] * VAE_SCALE
    if (start_width, start_height) != (width // VAE_SCALE * VAE_SCALE, height // VAE_SCALE * VAE_SCALE):
        raise SamplingError(  # the explain shape, with the sizes unquoted
            f"the start frames (start_latent) are not the video's size, {width}x{height} pixels (the width and height "
            f"widgets): {start_width}x{start_height} pixels; set width {start_width} and height {start_height}, or "
            f"encode the start frames at {width}x{height} (VideoBooth Start Frames' width and height)")
    if count >= frames:
        raise SamplingError(explain(
            f"the start_latent holds {count} frames and they count among the video's frames, so a video of this many "
            "frames has none left to generate (the frames widget)", frames,
            f"raise frames above {count}, or start from fewer frames (VideoBooth Start Frames' last_frames)"))


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
                "seed": ("INT", {**widget("seed"), "control_after_generate": True, "tooltip": (
                    "Seed of all the noise (drawn on the CPU, so a seed gives the same video on any device and "
                    "the same as the command line). Video i of a batch uses seed + i.")}),
                "steps": ("INT", {**widget("steps"), "tooltip": (
                    "Denoising steps; 250 with ddpm is the official setting. Each step costs the same with every "
                    "sampler, so time is proportional to steps: dpmpp_2m or unipc need far fewer (about 25) for a "
                    "converged result.")}),
                "cfg": ("FLOAT", {**widget("cfg"), "step": 0.1, "round": 0.01, "tooltip": (
                    "Classifier-free guidance scale; 4.0 is the official setting.")}),
                "sampler": (SAMPLERS, {"default": "ddpm", "tooltip": (
                    "ddpm: the official respaced ancestral DDPM sampler (the reference, 250 steps). ddim, dpmpp_2m, "
                    "euler, euler_ancestral, unipc: diffusers' samplers on VideoBooth's own linear-beta schedule "
                    "(never SD's), the image prompt re-noised to every step's timestep. lcm: the consistency sampler "
                    "for a distilled LCM LoRA (train --stage distill; load it with the LoRA loader), 1-8 steps, "
                    "guidance-free (the cfg input is not used).")}),
                "guidance": (list(GUIDANCE_RULES), {"default": "official", "tooltip": (
                    "official: guidance on latent channels 0-2 and the conditional prediction on channel 3, as "
                    "released; all: guidance on every channel.")}),
                "frames": ("INT", {**widget("frames"), "tooltip": (
                    "Frames per video; the model was trained on 16.")}),
                "width": ("INT", {**widget("width"), "tooltip": (
                    "Video width in pixels, a multiple of 8; the model was trained at 256.")}),
                "height": ("INT", {**widget("height"), "tooltip": (
                    "Video height in pixels, a multiple of 8; the model was trained at 256.")}),
                "batch": ("INT", {**widget("batch"), "tooltip": (
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
                "eta": ("FLOAT", {**widget("eta"), "step": 0.05, "tooltip": (
                    "DDIM only: 0 is deterministic DDIM, 1 adds DDPM-like fresh noise at every step.")}),
                "subjects": (SUBJECTS, {"tooltip": (
                    "More subjects from VideoBooth Subjects: each one's exemplar is injected with its own strength "
                    "and region (with the exemplar above, when connected, as the first).")}),
                "context": (CONTEXT, {"tooltip": (
                    "Long videos: from VideoBooth Context Options. More frames than its window are denoised by "
                    "overlapping windows that all attend to frame 0 and the image prompt (memory of one window).")}),
                "start_latent": ("LATENT", {"tooltip": (
                    "Image-to-video or extension: latents of the frames the video starts with (VideoBooth Start "
                    "Frames, VAE Encode, or a previous video's last latents); held at every step and exactly the "
                    "first frames of the result, counted in frames.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model: VideoBoothModel, conditioning: Conditioning, seed: int, steps: int, cfg: float,
               sampler: str, guidance: str, frames: int, width: int, height: int, batch: int,
               exemplar: Exemplar | None = None, spacing: str = "trailing", eta: float = 0.0,
               unique_id: str | None = None, subjects: tuple | None = None, context: ContextOptions | None = None,
               start_latent: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor]]:
        check_widgets({"seed": seed, "steps": steps, "cfg": cfg, "sampler": sampler, "guidance": guidance,
                       "frames": frames, "width": width, "height": height, "batch": batch, "spacing": spacing,
                       "eta": eta})
        start = None if start_latent is None else bridge.comfy_latent_to_video(
            bridge.comfy_latent_samples(start_latent, "VideoBooth Sampler (start_latent)"))
        if start is not None:  # the start frames leave frames to generate, at the video's size (in pixels)
            check_start_frames(start, frames, width, height)
        # the image prompt's latent: encoded per video with its generator (the official seed order), or given
        source: dict[str, Any] = {}
        if exemplar is not None and exemplar.latent is None:
            source = {"vae": exemplar.vae.vae, "image_prompt": exemplar.image_prompt}
        elif exemplar is not None:
            source = {"exemplar_latent": exemplar.latent}
        strength, window = (1.0, (0.0, 1.0)) if exemplar is None else (exemplar.strength,
                                                                        (exemplar.start, exemplar.end))
        fine, vaes, plan = {}, [exemplar.vae.managed] if "vae" in source else [], None
        if subjects:  # several subjects: every exemplar planned (strength 0 runs no stream), one source each
            planned = sampler_subjects(exemplar, subjects)
            source, strength, window, vaes, plan = (planned.source, planned.plan.strength, planned.window,
                                                    planned.vaes, planned.plan)
            fine = {"subject_strengths": planned.plan.subject_strengths,
                    "subject_regions": planned.plan.subject_regions}
        # the core's one validation, as every road runs it (several subjects with context windows, the start frames)
        windows = {"context_window": max(frames, 2), "context_overlap": 0} if context is None else {
            "context_window": context.window, "context_overlap": context.overlap, "context_fuse": context.fuse,
            "noise_reuse": context.noise_reuse}
        GenerationRequest(prompt="", frames=frames, width=width, height=height, steps=steps, cfg_scale=cfg,
                          guidance=guidance, seed=seed, sampler=sampler, spacing=spacing, eta=eta, start_latents=start,
                          **windows).validate(names=SAMPLER_NAMES, fine_injection=plan)
        shape = latent_shape(frames, height, width)
        device = model.managed.load_device
        denoiser, estimate = prepare_denoiser(model.unet, conditioning.cond, conditioning.null, shape, device,
                                              image_prompt=bool(source), cfg_scale=cfg, guidance=guidance,
                                              image_prompt_strength=strength, context=context, **fine)
        logger.info("VideoBooth Sampler: %s", estimate.describe())
        # ComfyUI frees the step's working memory (beyond the weights) before loading the models
        bridge.activate([model.managed] + vaes, memory_required=estimate.activations_bytes)
        progress = bridge.Progress(batch * steps, unique_id)
        videos = []
        for index in range(batch):
            bridge.check_interrupt()
            report = bridge.step_reporter(progress, index * steps)
            latents = sample_seeded(denoiser, (seed + index) % (MAX_SEED + 1), shape, device, sampler=sampler,
                                    steps=steps, spacing=spacing, eta=eta, image_prompt_steps=window, callback=report,
                                    context=context, start_latents=start, **source)
            videos.append(latents.cpu())
        return (bridge.video_latents_to_comfy(torch.cat(videos)),)


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
        if chunk_size < 1:
            raise SamplingError(f"chunk_size must be at least 1, got {chunk_size}.")
        video = bridge.comfy_latent_to_video(bridge.comfy_latent_samples(samples, "VideoBooth Decode"))
        _, _, count, h, w = video.shape
        dtype = next(vae.vae.parameters()).dtype
        bridge.activate([vae.managed], memory_required=_decode_memory(min(chunk_size, count), h, w, dtype))
        progress = bridge.Progress(count, unique_id)

        def on_chunk(done: int, total: int) -> None:
            progress.update(done)
            bridge.check_interrupt()

        return (bridge.image_to_comfy(decode_video(vae.vae, video, chunk_size, on_chunk)),)


NODE_CLASS_MAPPINGS = {"VideoBoothSampler": VideoBoothSampler, "VideoBoothDecode": VideoBoothDecode}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VideoBoothSampler": "VideoBooth Sampler (cross-frame)",
    "VideoBoothDecode": "VideoBooth Decode",
}
