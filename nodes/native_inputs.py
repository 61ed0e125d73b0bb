"""The native road's inputs besides the prompt (issue 25): the subjects' word vectors from the native MODEL's mapper,
and the start frames as a ComfyUI inpainting latent.

*VideoBooth Native Image Prompt Encode* is *VideoBooth Image Prompt Encode* for the native ``MODEL``: its output feeds
*VideoBooth Subjects*, whose list goes into *VideoBooth Native Conditioning* (several subjects on this road).

*VideoBooth Native Start Frames* turns the start frames' LATENT (from *VideoBooth Start Frames* or VAE Encode) into
the video's latent for KSampler: frames as batch, the known frames first, and a ``noise_mask`` that keeps them. ComfyUI's
samplers then replace the known frames before every model call by their latent noised with the run's own initial
noise to the call's level, and put the exact latent back in the prediction: the replacement the pack's Sampler does
(:class:`~..videobooth_core.sampling.known_frames.KnownFrames`), done by ComfyUI itself, so every sampler, scheduler
and context window takes it.
"""

from __future__ import annotations

from typing import Any

from ..videobooth_core.conditioning.embeddings import encode_image_prompt
from ..videobooth_core.conditioning.image_prompt import PreparedImagePrompt
from ..videobooth_core.errors import SamplingError, explain
from ..videobooth_core.models.frames_as_batch import known_frames_latent
from ..videobooth_core.settings import widget
from . import _bridge as bridge
from ._types import CLIP_VISION, IMAGE_EMBEDS, IMAGE_PROMPT, ImageEmbeds, VideoBoothCLIPVision
from .native import mapper_of


class VideoBoothNativeImagePromptEncode:
    DESCRIPTION = ("A subject's word vectors from the native MODEL's mapper (VideoBooth Image Prompt Encode for the "
                   "native road): connect them to VideoBooth Subjects, and its subjects output to VideoBooth Native "
                   "Conditioning, for several subjects in one video.")
    CATEGORY = "VideoBooth/native"
    FUNCTION = "encode"
    RETURN_TYPES = (IMAGE_EMBEDS,)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("The subject's word vectors, for VideoBooth Subjects.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model of VideoBooth Native Loader (its mapper is used here)."}),
            "clip_vision": (CLIP_VISION, {"tooltip": "The CLIP ViT-L/14 vision encoder."}),
            "image_prompt": (IMAGE_PROMPT, {"tooltip": "The subject's prepared image from VideoBooth Image Prompt."}),
        }}

    def encode(self, model: Any, clip_vision: VideoBoothCLIPVision,
               image_prompt: PreparedImagePrompt) -> tuple[ImageEmbeds]:
        mapper = mapper_of(model)
        bridge.activate([clip_vision.managed])
        return (ImageEmbeds(encode_image_prompt(clip_vision.vision_encoder, mapper, image_prompt).float().cpu()),)


class VideoBoothNativeStartFrames:
    DESCRIPTION = ("Image-to-video and extension on the native road: the video's latent for KSampler, starting with "
                   "the start frames (from VideoBooth Start Frames, or VAE Encode), which ComfyUI holds at every step "
                   "(a noise mask), so they are exactly the video's first frames. Use it in place of Empty Latent "
                   "Image, with denoise 1.")
    CATEGORY = "VideoBooth/native"
    FUNCTION = "make"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("frames latents (frames as batch) with the start frames first and a noise mask that keeps "
                       "them.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "start_latent": ("LATENT", {"tooltip": (
                "The start frames' latents (VideoBooth Start Frames, or VAE Encode of an image); their size is the "
                "video's size.")}),
            "frames": ("INT", {**widget("frames"), "tooltip": (
                "The video's frame count, the start frames included (they are its first frames).")}),
        }}

    def make(self, start_latent: dict[str, Any], frames: int) -> tuple[dict[str, Any]]:
        known = bridge.comfy_latent_samples(start_latent, "VideoBooth Native Start Frames (start_latent)")
        if known.shape[0] >= frames:
            raise SamplingError(explain(
                f"the start_latent holds {known.shape[0]} frames and they count among the video's frames, so a video "
                "of this many frames has none left to generate (the frames widget)", frames,
                f"raise frames above {known.shape[0]}, or start from fewer frames (VideoBooth Start Frames' "
                "last_frames)"))
        samples, mask = known_frames_latent(known, int(frames))
        return ({"samples": samples, "noise_mask": mask},)


NODE_CLASS_MAPPINGS = {"VideoBoothNativeImagePromptEncode": VideoBoothNativeImagePromptEncode,
                       "VideoBoothNativeStartFrames": VideoBoothNativeStartFrames}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VideoBoothNativeImagePromptEncode": "VideoBooth Native Image Prompt Encode (subjects)",
    "VideoBoothNativeStartFrames": "VideoBooth Native Start Frames (image-to-video)",
}
