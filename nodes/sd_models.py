"""SD 1.x checkpoints and LoRAs on VideoBooth's spatial layers (from ComfyUI's ``checkpoints`` and ``loras``).

Each node returns a new model that shares every unchanged weight with its input: the input (cached by ComfyUI,
perhaps used by other branches of the graph) is never changed.
"""

from __future__ import annotations

import logging

from ..videobooth_core.loading.lora import LoraSpec, personalised_copies
from ..videobooth_core.settings import LORA_STRENGTH_RANGE, check_lora_strength
from . import _bridge as bridge
from ._types import CLIP, MODEL, VideoBoothCLIP, VideoBoothModel

logger = logging.getLogger(__name__)

_STRENGTH = {"default": 1.0, "min": LORA_STRENGTH_RANGE[0], "max": LORA_STRENGTH_RANGE[1]}
"""A LoRA strength widget's options: the command line's range (videobooth_core.settings)."""
_KV_TOOLTIP = ("VideoBooth attends with the mapper's key/value projections, not the UNet's own attn1/attn2 to_k/to_v. "
               "mapper: apply the file's key/value weights to the mapper's projections; ignore: leave them out.")


def _copy_model(model: VideoBoothModel, unet, mapper) -> VideoBoothModel:
    managed = bridge.ManagedModel({"unet": unet, "mapper": mapper}, model.managed.load_device,
                                  model.managed.offload_device)
    return VideoBoothModel(managed, model.dtype, model.unet_path, model.mapper_path)


class VideoBoothApplySDCheckpoint:
    DESCRIPTION = ("Replaces the layers VideoBooth inherited from Stable Diffusion 1.x (resnets, spatial attention, "
                   "feed-forwards, norms, input/output convolutions, time embedding) with those of a personalised "
                   "SD 1.x checkpoint from models/checkpoints; temporal attention, the watermark branch and the "
                   "mapper are kept. SD 2.x, SDXL and other models are refused.")
    CATEGORY = "VideoBooth/loaders"
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The VideoBooth model with the checkpoint's spatial layers.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": (MODEL, {"tooltip": "The VideoBooth model (from VideoBooth Model Loader)."}),
            "ckpt_name": (bridge.list_models("checkpoints"), {"tooltip": (
                "An SD 1.x / 1.5-based checkpoint (single file, LDM layout). Files in "
                f"{bridge.describe_locations('checkpoints')}.")}),
            "kv_weights": (["ignore", "mapper"], {"default": "ignore", "tooltip": _KV_TOOLTIP + (
                " For a checkpoint, mapper replaces VideoBooth's trained projections with the checkpoint's.")}),
        }}

    @classmethod
    def IS_CHANGED(cls, model, ckpt_name: str, kv_weights: str) -> str:
        return bridge.file_signature("checkpoints", ckpt_name)

    def apply(self, model: VideoBoothModel, ckpt_name: str, kv_weights: str) -> tuple[VideoBoothModel]:
        path = bridge.model_path("checkpoints", ckpt_name)
        unet, mapper, _, lines = personalised_copies(model.unet, model.mapper, base_checkpoint=path, kv=kv_weights)
        logger.info("VideoBooth: %s", "; ".join(lines))
        return (_copy_model(model, unet, mapper),)


class VideoBoothLoRA:
    DESCRIPTION = ("Merges an SD 1.x LoRA (kohya, LoCon, diffusers or PEFT format) from models/loras into the "
                   "VideoBooth model's spatial layers and, when connected, the CLIP text encoder. Chain several to "
                   "stack them. A LoRA for another model (SDXL, SD 2.x...) is refused, listing what did not match.")
    CATEGORY = "VideoBooth/loaders"
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL, CLIP)
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The VideoBooth model with the LoRA merged.",
                       "The CLIP text encoder with the LoRA's text-encoder layers merged (as given if none).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The VideoBooth model (from the model loader, or another LoRA node)."}),
                "lora_name": (bridge.list_models("loras"), {"tooltip": (
                    f"An SD 1.x LoRA. Files in {bridge.describe_locations('loras')}.")}),
                "strength_model": ("FLOAT", {**_STRENGTH, "step": 0.05, "tooltip": (
                    "How strongly the LoRA changes the UNet (0: not at all, bit-identical; negative: inverted).")}),
                "strength_clip": ("FLOAT", {**_STRENGTH, "step": 0.05, "tooltip": (
                    "How strongly the LoRA changes the text encoder (used when clip is connected).")}),
                "kv_weights": (["mapper", "ignore"], {"default": "mapper", "tooltip": _KV_TOOLTIP}),
            },
            "optional": {
                "clip": (CLIP, {"tooltip": "The VideoBooth CLIP text encoder, for the LoRA's text-encoder layers. "
                                           "Without it those layers are an error unless strength_clip is 0."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, model, lora_name: str, *args, **kwargs) -> str:
        return bridge.file_signature("loras", lora_name)

    def apply(self, model: VideoBoothModel, lora_name: str, strength_model: float, strength_clip: float,
              kv_weights: str, clip: VideoBoothCLIP | None = None) -> tuple[VideoBoothModel, VideoBoothCLIP | None]:
        for name, value in (("strength_model", strength_model), ("strength_clip", strength_clip)):
            check_lora_strength(value, name)  # the command line's and the jobs' rule, naming the widget
        spec = LoraSpec(bridge.model_path("loras", lora_name), strength_model, strength_clip)
        text_encoder = clip.text_encoder if clip is not None else None
        unet, mapper, text_copy, lines = personalised_copies(model.unet, model.mapper, loras=[spec],
                                                             text_encoder=text_encoder, kv=kv_weights)
        logger.info("VideoBooth: %s", "; ".join(lines))
        if clip is not None:
            managed = bridge.ManagedModel({"text_encoder": text_copy}, clip.managed.load_device,
                                          clip.managed.offload_device)
            clip = VideoBoothCLIP(managed, clip.tokenizer, clip.path, clip.tokenizer_path)
        return (_copy_model(model, unet, mapper), clip)


NODE_CLASS_MAPPINGS = {
    "VideoBoothApplySDCheckpoint": VideoBoothApplySDCheckpoint,
    "VideoBoothLoRA": VideoBoothLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VideoBoothApplySDCheckpoint": "VideoBooth Apply SD1.x Checkpoint",
    "VideoBoothLoRA": "VideoBooth LoRA",
}
