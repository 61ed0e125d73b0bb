"""Image-prompt nodes: preparation (mask, crop, pad, resize) and the coarse embedding (CLIP vision -> mapper)."""

from __future__ import annotations

import torch

from ..videobooth_core.conditioning.embeddings import encode_image_prompt
from ..videobooth_core.conditioning.image_prompt import PreparedImagePrompt, prepare_image_prompt
from ..videobooth_core.settings import widget
from . import _bridge as bridge
from ._widgets import check_widgets
from ._types import CLIP_VISION, IMAGE_EMBEDS, IMAGE_PROMPT, MODEL, ImageEmbeds, VideoBoothCLIPVision, VideoBoothModel


INVERT_MASK_DEFAULT = True
"""LoadImage's MASK is 1 - alpha: 1 on the transparent background of a cut-out picture (the usual subject photo,
and the pack's own example), 0 on the subject; inverted it marks the subject. Segmentation nodes' masks already mark
the subject with 1 and need it off. A saved workflow keeps the value it stored; the evaluation nodes use the same
default, so one LoadImage mask gives them and the Image Prompt the same subject."""
INVERT_MASK_TOOLTIP = (
    "Use 1 - mask as the subject. On (default) for LoadImage's mask of a cut-out picture (PNG with a transparent "
    "background), which is 1 where the picture is transparent; off for a mask that is already 1 (white) on the "
    "subject, as segmentation nodes give.")


class VideoBoothImagePrompt:
    DESCRIPTION = ("Prepares the photo of the subject as VideoBooth expects it: background painted white using the "
                   "mask, cropped to the subject's box (plus padding), padded to a white square and resized (224 px "
                   "for CLIP, 256 px for the VAE). The preview output shows the result.")
    CATEGORY = "VideoBooth/image prompt"
    FUNCTION = "prepare"
    RETURN_TYPES = (IMAGE_PROMPT, "IMAGE")
    RETURN_NAMES = ("image_prompt", "preview")
    OUTPUT_TOOLTIPS = (
        "The prepared image prompt, for Image Prompt Encode and Latent Injection.",
        "The prepared 256x256 image (what the VAE sees); also a valid input for ComfyUI's VAE Encode.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The photo of the subject (the first image of a batch is used)."}),
                "padding": ("INT", {**widget("padding"), "step": 1, "tooltip": (
                    "Extra pixels kept around the subject's box on every side; 0 is the official preprocessing.")}),
                "invert_mask": ("BOOLEAN", {"default": INVERT_MASK_DEFAULT, "tooltip": INVERT_MASK_TOOLTIP}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": (
                    "The subject's mask, the first of a batch, same size as the image; with invert_mask on (the "
                    "default) LoadImage's MASK of a cut-out picture marks the subject. Without a mask the whole image "
                    "is the subject.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def prepare(self, image: torch.Tensor, padding: int, invert_mask: bool, mask: torch.Tensor | None = None,
                unique_id: str | None = None) -> tuple[PreparedImagePrompt, torch.Tensor]:
        check_widgets({"padding": padding})
        picture = bridge.first_image(image)
        subject = None if mask is None else bridge.subject_mask(mask, tuple(picture.shape[:2]), invert_mask)
        warning = None if subject is None else bridge.inverted_mask_warning(picture, subject, invert_mask)
        if warning is not None:  # on the node itself (a guess, so not an error), and in the log
            bridge.show_on_node(unique_id, warning)
        prepared = prepare_image_prompt(picture, subject, padding=int(padding))
        return prepared, bridge.image_to_comfy(prepared.preview())


class VideoBoothImagePromptEncode:
    DESCRIPTION = ("The coarse image-prompt embedding: the CLIP vision features of the prepared image, turned by the "
                   "mapper into word vectors that VideoBooth Text Encode puts in place of the subject word.")
    CATEGORY = "VideoBooth/image prompt"
    FUNCTION = "encode"
    RETURN_TYPES = (IMAGE_EMBEDS,)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("The subject's word vectors, for VideoBooth Text Encode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": (MODEL, {"tooltip": "The VideoBooth model (its mapper is used here)."}),
            "clip_vision": (CLIP_VISION, {"tooltip": "The CLIP ViT-L/14 vision encoder."}),
            "image_prompt": (IMAGE_PROMPT, {"tooltip": "The prepared image prompt from VideoBooth Image Prompt."}),
        }}

    def encode(self, model: VideoBoothModel, clip_vision: VideoBoothCLIPVision,
               image_prompt: PreparedImagePrompt) -> tuple[ImageEmbeds]:
        bridge.activate([clip_vision.managed, model.managed])
        words = encode_image_prompt(clip_vision.vision_encoder, model.mapper, image_prompt)
        return (ImageEmbeds(words.cpu()),)


NODE_CLASS_MAPPINGS = {
    "VideoBoothImagePrompt": VideoBoothImagePrompt,
    "VideoBoothImagePromptEncode": VideoBoothImagePromptEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VideoBoothImagePrompt": "VideoBooth Image Prompt",
    "VideoBoothImagePromptEncode": "VideoBooth Image Prompt Encode (coarse)",
}
