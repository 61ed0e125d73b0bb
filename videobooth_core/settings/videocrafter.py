"""VideoCrafter1/2's settings: :class:`VideoCrafterSettings` (the official DDIM's defaults), their table
:data:`VIDEOCRAFTER_SETTINGS` (the same keys and flags as VideoBooth's where they mean the same) and the family's
frame and size limits."""

from __future__ import annotations

from dataclasses import dataclass

from ..sampling.videocrafter import REFUSED_SAMPLERS as VIDEOCRAFTER_REFUSED_SAMPLERS
from ..sampling.videocrafter import SAMPLERS as VIDEOCRAFTER_SAMPLERS
from .constants import CONTEXT_OVERLAP, FUSE_MODES, MAX_SEED, TRAINED_FRAMES, VAE_SCALE
from .table import Names, Setting, settings_table
from .table import setting_field as _setting

VIDEOCRAFTER_MAX_FRAMES = 64
"""VideoCrafter frames at most in one UNet call (trained on 16; VC1's relative positions clamp beyond 16)."""
VIDEOCRAFTER_MAX_LONG_FRAMES = 256
"""VideoCrafter frames at most with context windows (``context_window``), as VideoBooth's ``frames``."""
VIDEOCRAFTER_SIZE_STEP = 64
"""The released VideoCrafter UNets take sizes in multiples of 64 (8 x 2^3): the widgets' step. The model's own
multiple is checked by ``videocrafter_pipeline.check_request``."""


@dataclass(kw_only=True)
class VideoCrafterSettings:
    """The settings of one VideoCrafter1/2 generation (the official DDIM's defaults of ``scripts/run_*.sh``).
    ``None`` (height, width, fps) takes the checkpoint kind's official value
    (``models.videocrafter.config.RELEASED_SAMPLING``); the nodes' 0 and an absent flag mean the same."""

    negative_prompt: str = _setting("str", "", "VideoCrafter: the unconditional branch's prompt (official: empty)",
                                    key="negative")
    frames: int = _setting("int", TRAINED_FRAMES, "VideoCrafter: frames per video (trained: 16; more than 64 need "
                           "--context-window)", minimum=1, maximum=VIDEOCRAFTER_MAX_LONG_FRAMES)
    width: int | None = _setting("int", None, "VideoCrafter: width in pixels, a multiple of 64", minimum=VAE_SCALE,
                                 maximum=2048, shown_default="the model's: 512, 1024 for T2V 1024")
    height: int | None = _setting("int", None, "VideoCrafter: height in pixels, a multiple of 64",
                                  minimum=VAE_SCALE, maximum=2048, shown_default="the model's: 320, 576 for T2V 1024")
    sampler: str = _setting(
        "str", VIDEOCRAFTER_SAMPLERS[0], "VideoCrafter: ddim, the official DDIM (exact); dpmpp_2m, euler, "
        "euler_ancestral, unipc: the pack's diffusers samplers on the model's own schedule (dpmpp_2m: about 25 steps)",
        choices=VIDEOCRAFTER_SAMPLERS, refused=VIDEOCRAFTER_REFUSED_SAMPLERS)
    steps: int = _setting("int", 50, "VideoCrafter: sampling steps (official DDIM 50; counts the official schedule "
                          "cannot run, 3, 9, 27..., are refused for ddim)", minimum=1, maximum=500)
    eta: float = _setting("float", 1.0, "VideoCrafter: DDIM eta (1 official, 0 deterministic; the fast samplers have "
                          "none)", minimum=0.0, maximum=1.0)
    guidance: float = _setting("float", 12.0, "VideoCrafter: classifier-free guidance scale (official 12)", key="cfg",
                               minimum=1.0, maximum=30.0)
    fps: int | None = _setting("int", None, "VideoCrafter: the fps conditioning of T2V 1024, VideoCrafter2 and I2V",
                               minimum=1, maximum=60, shown_default="the model's: 28 T2V, 8 I2V")
    seed: int = _setting("int", 123, "VideoCrafter: seed of the run's noise (drawn on the CPU)", minimum=0,
                         maximum=MAX_SEED)
    context_window: int | None = _setting(
        "int", None, "VideoCrafter long videos: frames per UNet call; more frames are denoised by overlapping windows "
        "of consecutive frames whose predictions are fused at every step (memory of one window)", minimum=2,
        maximum=VIDEOCRAFTER_MAX_FRAMES, shown_default="none: every frame in one call")
    context_overlap: int = _setting("int", CONTEXT_OVERLAP, "VideoCrafter long videos: frames shared by neighbouring "
                                    "windows (at most the window minus 1)", minimum=0,
                                    maximum=VIDEOCRAFTER_MAX_FRAMES - 1)
    context_fuse: str = _setting("str", FUSE_MODES[0], "VideoCrafter long videos: weights of overlapping windows' "
                                 "predictions (pyramid: highest at a window's middle; flat: equal)", choices=FUSE_MODES)
    save_latents: bool = _setting("bool", False, "VideoCrafter: also write the sampler's final latents next to the "
                                  "video as OUT.latents.safetensors (as VideoBooth's --save-latents)")

    def check(self, names: Names | None = None) -> None:
        """Every setting's type and range (SamplingError naming the value, as ``names`` calls it, and the fix);
        None passes where it means the model's value."""
        for key, spec in VIDEOCRAFTER_SETTINGS.items():
            spec.check(getattr(self, spec.name), names(key) if names else None)


VIDEOCRAFTER_SETTINGS: dict[str, Setting] = settings_table(("videocrafter", VideoCrafterSettings))
"""Every VideoCrafter setting by its key (the same keys and flags as VideoBooth's where they mean the same)."""
