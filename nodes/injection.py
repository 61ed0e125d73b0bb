"""Noised latent injection (the fine image-prompt embedding): what the sampler injects, how strongly, when."""

from __future__ import annotations

from typing import Any

from ..videobooth_core.errors import SamplingError
from ..videobooth_core.conditioning.image_prompt import PreparedImagePrompt
from ..videobooth_core.settings import SETTINGS, widget
from . import _bridge as bridge
from ._widgets import check_widgets
from ._types import EXEMPLAR, IMAGE_PROMPT, VAE, Exemplar, VideoBoothVAE


def _window(end: int) -> dict[str, float]:
    """The start (0) or end (1) widget's options: the ``image_prompt_steps`` setting's (start, end) default and
    range."""
    spec = SETTINGS["image_prompt_steps"]
    return {"default": spec.default[end], "min": spec.minimum, "max": spec.maximum}


class VideoBoothLatentInjection:
    DESCRIPTION = ("The fine image-prompt embedding: at every sampling step the image prompt's latent is noised to the "
                   "step's noise level and its features are injected into the video's cross-frame attention. The "
                   "latent is the prepared image encoded by the VideoBooth VAE (at sampling time, with the video's "
                   "seed, as the official pipeline does), or a LATENT from ComfyUI's VAE Encode of the preview image.")
    CATEGORY = "VideoBooth/image prompt"
    FUNCTION = "build"
    RETURN_TYPES = (EXEMPLAR,)
    RETURN_NAMES = ("exemplar",)
    OUTPUT_TOOLTIPS = ("The image prompt's latent and injection settings, for VideoBooth Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "strength": ("FLOAT", {**widget("image_prompt_strength"), "step": 0.05, "tooltip": (
                    "How strongly the image prompt's features are injected; 1 is the official model.")}),
                "start": ("FLOAT", {**_window(0), "step": 0.01, "tooltip": (
                    "First sampling step (as a fraction of the steps, 0 = first) where the image prompt is "
                    "injected.")}),
                "end": ("FLOAT", {**_window(1), "step": 0.01, "tooltip": (
                    "Fraction of the steps where the injection stops (1 = through the last step, the official "
                    "behaviour; 0.5 = first half only, faster, a little less faithful).")}),
            },
            "optional": {
                "image_prompt": (IMAGE_PROMPT, {"tooltip": (
                    "The prepared image prompt, encoded by the VAE below (needed unless a latent is connected).")}),
                "vae": (VAE, {"tooltip": "The VideoBooth VAE that encodes the image prompt."}),
                "latent": ("LATENT", {"tooltip": (
                    "Instead: a LATENT from ComfyUI's VAE Encode (SD 1.x VAE) of the image prompt's preview; the "
                    "first latent of the batch is used and the image prompt and VAE inputs are ignored.")}),
            },
        }

    def build(self, strength: float, start: float, end: float, image_prompt: PreparedImagePrompt | None = None,
              vae: VideoBoothVAE | None = None, latent: dict[str, Any] | None = None) -> tuple[Exemplar]:
        check_widgets({"strength": strength, "start and end": (start, end)},
                      {"strength": "image_prompt_strength", "start and end": "image_prompt_steps"})
        if latent is not None:
            samples = bridge.comfy_latent_samples(latent, "the injection's latent")
            clean = bridge.comfy_latent_to_exemplar(samples)
            return (Exemplar(float(strength), float(start), float(end), latent=clean),)
        if image_prompt is None or vae is None:
            raise SamplingError(
                "the injection needs the image prompt and the VideoBooth VAE (connect both), or a LATENT from "
                "VAE Encode."
            )
        return (Exemplar(float(strength), float(start), float(end), image_prompt=image_prompt, vae=vae),)


NODE_CLASS_MAPPINGS = {"VideoBoothLatentInjection": VideoBoothLatentInjection}
NODE_DISPLAY_NAME_MAPPINGS = {"VideoBoothLatentInjection": "VideoBooth Latent Injection (fine)"}
