"""VideoCrafter1/2 nodes: a loader for the four released kinds (``models/videocrafter``, registered by this pack) and
a sampler that runs the official DDIM (or one of the pack's fast samplers on the model's own schedule) from a prompt
(and, for the image-to-video model, a start IMAGE) to IMAGE frames.

Its own sampler, not the VideoBooth Sampler: the inputs differ (no subject photo or word; an fps conditioning; for
I2V a start image), and so does the sampler (the official DDIM with the per-timestep x0 scale of ``use_scale``
checkpoints, which ComfyUI's ``ModelSamplingDiscrete`` cannot express). Each node validates, converts through
``_bridge`` and makes one core call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..videobooth_core.loading.checkpoint import parse_dtype
from ..videobooth_core.settings import (
    DEFAULT_PRECISION,
    VIDEOCRAFTER_SETTINGS,
    VIDEOCRAFTER_SIZE_STEP,
    widget,
)
from ..videobooth_core.videocrafter_pipeline import VideoCrafterPipeline, VideoCrafterRequest, step_count
from . import _bridge as bridge
from .loaders import DEVICES, PRECISIONS, precision_tooltip
from .long_video import CONTEXT, ContextOptions

logger = logging.getLogger(__name__)

VIDEOCRAFTER_FOLDER = "videocrafter"
VIDEOCRAFTER = "VIDEOCRAFTER"
"""The socket type of a loaded VideoCrafter model."""
AUTO = "auto"


@dataclass(frozen=True)
class VideoCrafterModel:
    """What the VIDEOCRAFTER socket carries: the core pipeline (computing on ComfyUI's compute device) and its
    modules in ComfyUI's memory management, which moves them there before sampling and back to the offload device
    when other models need the memory."""

    pipeline: VideoCrafterPipeline
    managed: bridge.ManagedModel


_CACHE: dict[tuple, VideoCrafterModel] = {}
_OTHER_NAMES = {"negative": "negative_prompt", "context_window": "context_window (VideoBooth Context Options)",
                "context_overlap": "context_overlap (VideoBooth Context Options)",
                "context_fuse": "context_fuse (VideoBooth Context Options)"}


def _widget_names(key: str) -> str:
    """How the sampler's messages name a setting: by its widget, or the Context Options node's (the widgets share
    the settings' keys)."""
    return _OTHER_NAMES.get(key, key)


def _widget(key: str) -> dict:
    """A sampler widget's default and range from the VideoCrafter settings table (0 where the default is the
    model's own value)."""
    return widget(key, VIDEOCRAFTER_SETTINGS)


def _tokenizer_dir() -> Path:
    """The CLIP BPE tokenizer (CLIP's vocabulary, the same for ViT-H): one in ``text_encoders``, else ComfyUI's."""
    from ..videobooth_core.errors import CheckpointError
    from ..videobooth_core.loading.models_dir import find_tokenizer_dir

    for location in bridge.folder_locations("text_encoders"):
        try:
            return find_tokenizer_dir(Path(location).parent)
        except CheckpointError:
            continue
    comfy = bridge.comfy_sd1_tokenizer_dir()
    if comfy is None:
        raise CheckpointError("no CLIP tokenizer found: put the tokenizer folder (vocab.json + merges.txt) of "
                              "openai/clip-vit-large-patch14 in models/text_encoders/, or run inside ComfyUI")
    return comfy


class VideoBoothVideoCrafterLoader:
    DESCRIPTION = ("Loads a VideoCrafter1 (text-to-video 512 or 1024, image-to-video 512) or VideoCrafter2 model.ckpt, "
                   "or its safetensors conversion, from models/videocrafter; the kind is read from its keys, and its "
                   "own text (and image) encoder comes with it.")
    CATEGORY = "VideoBooth/VideoCrafter"
    FUNCTION = "load"
    RETURN_TYPES = (VIDEOCRAFTER,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded VideoCrafter model (UNet, VAE, text encoder; image encoder for image-to-video).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        names = bridge.list_models(VIDEOCRAFTER_FOLDER)
        return {"required": {
            "ckpt_name": (names, {"tooltip": "A VideoCrafter model.ckpt (or `convert --videocrafter` output) in "
                                              f"{bridge.describe_locations(VIDEOCRAFTER_FOLDER)}."}),
            "precision": (PRECISIONS, {"default": AUTO, "tooltip": precision_tooltip(
                f"{DEFAULT_PRECISION}, the official numerics; bf16/fp16 halve the UNet's memory")}),
            "device": (DEVICES, {"default": AUTO, "tooltip": "auto: ComfyUI's compute device; cpu: the CPU."}),
        }}

    def load(self, ckpt_name: str, precision: str, device: str) -> tuple[VideoCrafterModel]:
        compute, offload = bridge.devices_for("unet", device)
        key = (bridge.file_signature(VIDEOCRAFTER_FOLDER, ckpt_name), precision, str(compute))
        if key not in _CACHE:
            _CACHE.clear()  # one VideoCrafter model at a time: they are several GB each
            # loaded on the offload device, as the VideoBooth loaders: the sampler has ComfyUI move it to compute
            pipeline = VideoCrafterPipeline.from_files(bridge.model_path(VIDEOCRAFTER_FOLDER, ckpt_name),
                                                       _tokenizer_dir(),
                                                       dtype=parse_dtype(DEFAULT_PRECISION if precision == AUTO
                                                                         else precision),
                                                       device=compute, weights_device=offload)
            _CACHE[key] = VideoCrafterModel(pipeline, bridge.ManagedModel(_modules(pipeline), compute, offload))
        return (_CACHE[key],)


def _modules(pipeline: VideoCrafterPipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's modules that move together (the image encoder and projector only for image-to-video)."""
    modules = {"unet": pipeline.unet, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder,
               "image_encoder": pipeline.image_encoder, "projector": pipeline.projector}
    return {name: module for name, module in modules.items() if module is not None}


class VideoBoothVideoCrafterSampler:
    DESCRIPTION = ("Generates a video with a VideoCrafter model and the official DDIM sampler (its timesteps, x0 scale "
                   "and guidance), or a fast one (dpmpp_2m at 25 steps) on the same schedule: a prompt for the "
                   "text-to-video models, a prompt and a start image for the image-to-video one. 0 for width, height "
                   "or fps takes the model's official value.")
    CATEGORY = "VideoBooth/VideoCrafter"
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The video frames as an IMAGE batch (frames, height, width, 3) in 0..1.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (VIDEOCRAFTER, {"tooltip": "From VideoCrafter Loader."}),
                "prompt": ("STRING", {"multiline": True, "default": "a panda playing guitar, 4k",
                                      "tooltip": "What the video shows."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": VIDEOCRAFTER_SETTINGS["negative"].default,
                                               "tooltip": "The unconditional branch's prompt (official: empty)."}),
                "frames": ("INT", {**_widget("frames"), "tooltip": "Frames (trained: 16)."}),
                "width": ("INT", {**_widget("width"), "step": VIDEOCRAFTER_SIZE_STEP, "tooltip": (
                    "Width in pixels, a multiple of 64; 0: the model's (512, or 1024 for T2V 1024).")}),
                "height": ("INT", {**_widget("height"), "step": VIDEOCRAFTER_SIZE_STEP, "tooltip": (
                    "Height in pixels, a multiple of 64; 0: the model's (320, or 576 for T2V 1024).")}),
                "sampler": (list(VIDEOCRAFTER_SETTINGS["sampler"].choices), {
                    "default": VIDEOCRAFTER_SETTINGS["sampler"].default, "tooltip": (
                        "ddim: the official DDIM, exact; dpmpp_2m, euler, euler_ancestral, unipc: the pack's fast "
                        "samplers on the model's own schedule (dpmpp_2m: about 25 steps).")}),
                "steps": ("INT", {**_widget("steps"), "tooltip": (
                    "Sampling steps (official DDIM 50); counts the official schedule cannot run (3, 9, 27, ...) are "
                    "refused for ddim.")}),
                "eta": ("FLOAT", {**_widget("eta"), "step": 0.05,
                                  "tooltip": "DDIM eta: 1 is the official default, 0 deterministic (ddim only)."}),
                "cfg": ("FLOAT", {**_widget("cfg"), "step": 0.5,
                                  "tooltip": "Classifier-free guidance scale (official 12)."}),
                "fps": ("INT", {**_widget("fps"), "tooltip": (
                    "The fps conditioning of T2V 1024, VideoCrafter2 and I2V; 0: the official 28 (T2V) or 8 (I2V).")}),
                "seed": ("INT", {**_widget("seed"), "tooltip": "Seed of the run's noise (drawn on the CPU)."}),
            },
            "optional": {
                "start_image": ("IMAGE", {"tooltip": "Image-to-video only: the image the video starts from."}),
                "context": (CONTEXT, {"tooltip": (
                    "Long videos: from VideoBooth Context Options (noise_reuse off). More frames than its window "
                    "are denoised by overlapping windows of consecutive frames, fused at every step (memory of one "
                    "window); needed beyond 64 frames.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model: VideoCrafterModel, prompt: str, negative_prompt: str, frames: int, width: int,
               height: int, sampler: str, steps: int, eta: float, cfg: float, fps: int, seed: int,
               start_image: torch.Tensor | None = None, context: ContextOptions | None = None,
               unique_id: str | None = None) -> tuple[torch.Tensor]:
        pipeline = model.pipeline
        request = pipeline.check(VideoCrafterRequest(  # 0: not set, the model's value
            prompt=prompt, negative_prompt=negative_prompt, frames=frames, width=width or None, height=height or None,
            sampler=sampler, steps=steps, eta=eta, guidance=cfg, fps=fps or None, seed=seed, **_context_settings(context),
            start_image=bridge.first_image(start_image) if start_image is not None else None), names=_widget_names)
        # ComfyUI frees one step's working memory (beyond the weights, which it counts itself), then loads the model
        estimate = pipeline.estimate_memory(request)
        logger.info("VideoCrafter Sampler: %s", estimate.describe())
        bridge.activate([model.managed], memory_required=estimate.activations_bytes)
        progress = bridge.Progress(step_count(request), unique_id)
        result = pipeline.generate(request, callback=bridge.step_reporter(progress, 0))
        return (bridge.image_to_comfy(result.frames.float() / 255.0),)


def _context_settings(context: ContextOptions | None) -> dict:
    """The request's context settings from the Context Options node's output (none: every frame in one call);
    its FreeNoise ``noise_reuse`` is VideoBooth's (the official noise order has no window layout) and refused."""
    from ..videobooth_core.errors import SamplingError, explain

    if context is None:
        return {}
    if context.noise_reuse:
        raise SamplingError(explain("noise_reuse (VideoBooth Context Options) is VideoBooth's FreeNoise and does not "
                                    "apply to VideoCrafter, whose noise is drawn in the official order", True,
                                    "turn noise_reuse off"))
    return {"context_window": context.window, "context_overlap": context.overlap, "context_fuse": context.fuse}


NODE_CLASS_MAPPINGS = {"VideoBoothVideoCrafterLoader": VideoBoothVideoCrafterLoader,
                       "VideoBoothVideoCrafterSampler": VideoBoothVideoCrafterSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"VideoBoothVideoCrafterLoader": "VideoCrafter Loader (VideoCrafter1/2)",
                              "VideoBoothVideoCrafterSampler": "VideoCrafter Sampler"}
