"""Long videos: the context-window options of the sampler, and the start frames (image-to-video, extension)."""

from __future__ import annotations

from typing import Any

import torch

from ..videobooth_core.errors import SamplingError
from ..videobooth_core.sampling.known_frames import encode_start_frames
from ..videobooth_core.sampling.windows import ContextOptions, check_context
from ..videobooth_core.settings import FUSE_MODES, SETTINGS, widget
from . import _bridge as bridge
from ._widgets import check_widgets
from ._types import VAE, VideoBoothVAE

CONTEXT = "VIDEOBOOTH_CONTEXT"
"""Socket type of :class:`ContextOptions` (the sampler's optional ``context`` input)."""


class VideoBoothContextOptions:
    DESCRIPTION = ("Long videos: connect to the sampler's context input to denoise videos longer than the window by "
                   "overlapping windows whose predictions are fused at every step. Every window holds the video's "
                   "frame 0 and the image prompt, so the subject stays the same across the video; memory stays that "
                   "of one window and time grows linearly with the frames. Videos no longer than the window are "
                   "unchanged. The VideoCrafter Sampler takes the same options as windows of consecutive frames "
                   "(no frame 0; noise_reuse off).")
    CATEGORY = "VideoBooth/sampling"
    FUNCTION = "options"
    RETURN_TYPES = (CONTEXT,)
    RETURN_NAMES = ("context",)
    OUTPUT_TOOLTIPS = ("Context-window options for VideoBooth Sampler's context input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "context_window": ("INT", {**widget("context_window"), "tooltip": (
                    "Frames per UNet call, frame 0 included; 16 is what the model was trained on.")}),
                "context_overlap": ("INT", {**widget("context_overlap"), "tooltip": (
                    "Frames shared by neighbouring windows (besides frame 0), at most the window minus 2: more "
                    "overlap gives smoother transitions and more UNet calls.")}),
                "context_fuse": (list(FUSE_MODES), {"default": SETTINGS["context_fuse"].default, "tooltip": (
                    "How overlapping predictions are weighted: pyramid (highest at a window's middle, seams fade) "
                    "or flat (equal).")}),
                "noise_reuse": ("BOOLEAN", {"default": SETTINGS["noise_reuse"].default, "tooltip": (
                    "FreeNoise: later windows start from shuffled copies of earlier frames' noise, which keeps "
                    "the content closer from window to window.")}),
            },
        }

    def options(self, context_window: int, context_overlap: int, context_fuse: str,
                noise_reuse: bool) -> tuple[ContextOptions]:
        check_widgets({"context_window": context_window, "context_overlap": context_overlap,
                       "context_fuse": context_fuse, "noise_reuse": bool(noise_reuse)})
        check_context(context_window, context_overlap, context_fuse, lambda key: key)  # the core's rule, widget words
        return (ContextOptions(context_window, context_overlap, context_fuse, bool(noise_reuse)),)


class VideoBoothStartFrames:
    DESCRIPTION = ("Image-to-video and extension: encodes the frames a video starts with (a start image, or the last "
                   "frames of a previous video) at the video's size, for the sampler's start_latent input. Those "
                   "frames are held at every step and are exactly the video's first frames; they count among the "
                   "sampler's frames.")
    CATEGORY = "VideoBooth/sampling"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("start_latent",)
    OUTPUT_TOOLTIPS = ("The start frames' latents (frames, 4, height/8, width/8) for VideoBooth Sampler's "
                       "start_latent input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": (VAE, {"tooltip": "The VideoBooth VAE (SD 1.x)."}),
                "image": ("IMAGE", {"tooltip": (
                    "The start image, or a video's frames (an IMAGE batch) of which the last ones are kept.")}),
                "last_frames": ("INT", {**widget("extend_frames"), "default": 1, "tooltip": (
                    "How many of the batch's last frames start the video: 1 for a start image (image-to-video), "
                    "a few (e.g. 4) to extend a video.")}),
                "width": ("INT", {**widget("width"), "tooltip": (
                    "The video's width in pixels (as on the sampler); the frames are resized to cover it and "
                    "centre-cropped.")}),
                "height": ("INT", {**widget("height"), "tooltip": (
                    "The video's height in pixels (as on the sampler).")}),
            },
        }

    def encode(self, vae: VideoBoothVAE, image: torch.Tensor, last_frames: int, width: int,
               height: int) -> tuple[dict[str, Any]]:
        check_widgets({"width": width, "height": height, "last_frames": last_frames}, {"last_frames": "extend_frames"})
        if image.ndim != 4 or image.shape[-1] != 3:
            raise SamplingError(f"VideoBooth Start Frames: expected an IMAGE batch (frames, H, W, 3); got "
                                f"{tuple(image.shape)}.")
        bridge.activate([vae.managed])
        latents = encode_start_frames(vae.vae, image[-last_frames:].cpu(), height, width)
        return (bridge.video_latents_to_comfy(latents),)


NODE_CLASS_MAPPINGS = {"VideoBoothContextOptions": VideoBoothContextOptions,
                       "VideoBoothStartFrames": VideoBoothStartFrames}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VideoBoothContextOptions": "VideoBooth Context Options (long videos)",
    "VideoBoothStartFrames": "VideoBooth Start Frames (image-to-video, extension)",
}
