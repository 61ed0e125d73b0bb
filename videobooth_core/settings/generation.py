"""Generation's settings: VideoBooth's :class:`GenerationSettings` and :class:`SamplingOptions` (each field's
default, range, choices, help, flag and jobs key), :data:`SETTINGS` (their table), the keyword arguments and the
per-value checks of a ``{jobs key: value}`` mapping, how each road names the inputs in its messages
(:func:`flag_names`, :func:`key_names`) and the node widgets' options (:data:`WIDGET_SETTINGS`, :func:`widget`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..conditioning.text import NULL_PROMPT, SUBJECT_MATCHES, WHOLE_WORD
from ..errors import SamplingError
from ..sampling.denoiser import GUIDANCE_RULES
from ..sampling.lcm import LCM_SAMPLER, MAX_STEPS as LCM_MAX_STEPS, lcm_timesteps
from ..sampling.schedulers import OFFICIAL_SAMPLER, SAMPLERS, SPACINGS
from .constants import CONTEXT_OVERLAP, CONTEXT_WINDOW, FUSE_MODES, MAX_SEED, TRAINED_FRAMES, TRAINED_SIZE, VAE_SCALE
from .table import Names, Setting, settings_table
from .table import setting_field as _setting


@dataclass(frozen=True)
class SamplingOptions:
    """Opt-in speed modes (each changes the result; measured deviations are in the README) and injection control."""

    single_frame_image_prompt: bool = _setting(
        "bool", False, "run the image-prompt stream on one frame instead of all (about a quarter less compute per "
        "step; changes the video)")
    image_prompt_steps: tuple[float, float] = _setting(
        "pair", (0.0, 1.0), "inject the image prompt only in this fraction of the steps, start < end (0 1 is "
        "official; 0 0.5: the first half, faster, a little less faithful)", minimum=0.0, maximum=1.0)
    watermark_branch: bool = _setting(
        "bool", True, "skip the watermark-removal branch (faster; the released model always runs it)",
        flag="--no-watermark-branch")
    image_prompt_strength: float = _setting(
        "float", 1.0, "scale of the image prompt's update of frame 0's values in cross-frame attention (1 is the "
        "official model)", minimum=0.0, maximum=2.0)
    batch_passes: bool = True
    """Batch the unconditional and image-prompt passes (same result up to float rounding)."""

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(kw_only=True)
class GenerationSettings:
    """The settings of one generation (everything but the prompt and the subject), validated by :meth:`check`.
    The defaults are the released model's official settings."""

    negative_prompt: str = _setting(
        "str", NULL_PROMPT, "unconditional prompt of classifier-free guidance (official: the literal word 'None')",
        key="negative")
    frames: int = _setting("int", TRAINED_FRAMES, "frames per video (the model was trained on 16)",
                           minimum=1, maximum=256)
    width: int = _setting("int", TRAINED_SIZE, "video width in pixels, a multiple of 8 (the model was trained at 256)",
                          multiple_of=VAE_SCALE, minimum=VAE_SCALE, maximum=2048)
    height: int = _setting("int", TRAINED_SIZE, "video height in pixels, a multiple of 8 (the model was trained at "
                           "256)", multiple_of=VAE_SCALE, minimum=VAE_SCALE, maximum=2048)
    steps: int = _setting(
        "int", 250, "denoising steps; 250 with ddpm is the official setting and takes hours on a CPU: for a quick "
        "result use --sampler dpmpp_2m --steps 25", minimum=1, maximum=1000)
    sampler: str = _setting(
        "str", OFFICIAL_SAMPLER, "ddpm: the official respaced ancestral DDPM; the others: diffusers samplers on the "
        "same training schedule (dpmpp_2m or unipc converge in about 25 steps)", choices=SAMPLERS)
    spacing: str = _setting("str", "trailing", "timestep spacing of the diffusers samplers (ddpm ignores it)",
                            choices=SPACINGS, label="timestep spacing")
    eta: float = _setting("float", 0.0, "DDIM stochasticity (0: deterministic; 1: fresh noise at every step)",
                          minimum=0.0, maximum=1.0)
    cfg_scale: float = _setting("float", 4.0, "classifier-free guidance scale (4 is official)", key="cfg",
                                minimum=0.0, maximum=30.0)
    lcm_cfg: float = _setting(
        "float", 1.0, "guidance scale of --sampler lcm (a distilled LoRA): 1 is guidance-free, one conditional pass "
        "per step (the teacher's guidance is distilled in); a little more (1.5) adds the unconditional pass",
        minimum=1.0, maximum=8.0)
    guidance: str = _setting(
        "str", "official", "official: channels 0-2 guided, channel 3 conditional (as released); all: every channel",
        choices=GUIDANCE_RULES)
    seed: int = _setting("int", 10, "seed of all the noise (drawn on the CPU: the same video on any device)",
                         minimum=0, maximum=MAX_SEED)
    image_prompt_padding: int = _setting(
        "int", 0, "extra pixels kept around the subject's box on every side (0 is the official preprocessing)",
        key="padding", minimum=0, maximum=4096)
    subject_match: str = _setting(
        "str", WHOLE_WORD, "how the subject word is found in the prompt: whole-word (so 'dog' leaves 'hotdog' "
        "alone) or official-substring (the official code's plain replacement)", choices=SUBJECT_MATCHES)
    fps: float = _setting("float", 8.0, "frames per second of the written video", above=0.0)
    save_latents: bool = _setting(
        "bool", False, "also write the sampler's final latents (before the VAE decode) next to the video as "
        "OUT.latents.safetensors, for evaluate --reference's latent MSE (refused when it exists, as the video is)")
    context_window: int = _setting(
        "int", CONTEXT_WINDOW, "long videos: frames per UNet call; more frames are denoised by overlapping windows "
        "that all attend to frame 0 and the image prompt (memory of one window, time linear in the frames)", minimum=2,
        maximum=256)
    context_overlap: int = _setting("int", CONTEXT_OVERLAP, "long videos: frames shared by neighbouring windows (at "
                                    "most the window minus 2)", minimum=0, maximum=254)
    context_fuse: str = _setting("str", FUSE_MODES[0], "long videos: weights of overlapping windows' predictions "
                                 "(pyramid: highest at a window's middle; flat: equal)", choices=FUSE_MODES)
    noise_reuse: bool = _setting("bool", False, "long videos: later windows start from shuffled copies of the "
                                 "first window's noise (FreeNoise; keeps the content closer)")
    extend_frames: int = _setting("int", 4, "with --extend: how many of the video's last frames anchor the "
                                  "continuation (they are the new video's first frames)", minimum=1, maximum=255)
    options: SamplingOptions = field(default_factory=SamplingOptions)
    """The opt-in speed modes; ``None`` is read as the defaults."""

    def check(self, names: Names | None = None) -> None:
        """Every setting's type, range and choice (SamplingError naming the value, as ``names`` calls it, and
        the fix)."""
        _check_fields(self, names)
        if self.sampler == LCM_SAMPLER:  # the consistency sampler visits at most the skipping grid's points
            lcm_timesteps(self.steps)
        if self.options is not None and not isinstance(self.options, SamplingOptions):
            raise SamplingError(f"options must be a SamplingOptions, got {type(self.options).__name__}")
        if self.options is not None:
            _check_fields(self.options, names)


def _check_fields(instance: Any, names: Names | None = None) -> None:
    for f in dataclasses.fields(instance):
        spec = f.metadata.get("setting")
        if spec is not None:
            key = spec.key or f.name
            SETTINGS[key].check(getattr(instance, f.name), names(key) if names else None)


SETTINGS: dict[str, Setting] = settings_table(("request", GenerationSettings), ("options", SamplingOptions))
"""Every user-facing setting by its jobs key (also the command line's dest), in help order."""


def settings_kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    """GenerationSettings keyword arguments (with ``options``) from ``{jobs key: value}``; absent keys keep
    their defaults, unknown keys are an error."""
    unknown = set(values) - set(SETTINGS)
    if unknown:
        raise SamplingError(f"unknown setting(s) {', '.join(sorted(unknown))}; the settings are {', '.join(SETTINGS)}")
    request, options = {}, {}
    for key, value in values.items():
        spec = SETTINGS[key]
        if spec.kind == "pair" and value is not None:
            value = tuple(value)
        (options if spec.section == "options" else request)[spec.name] = value
    return {**request, "options": SamplingOptions(**options)}


def check_settings_values(values: Mapping[str, Any], names: Names | None = None) -> dict[str, Any]:
    """Every given setting (``{jobs key: value}``) checked on its own, before anything is read from disk: a
    bad number is named as itself (``--extend-frames 0``, as ``names`` calls it), not by what it would break
    later. Returns the values (pairs as tuples)."""
    checked = {}
    for key, value in values.items():
        if key in SETTINGS and value is not None:
            spec = SETTINGS[key]
            checked[key] = spec.check(tuple(value) if spec.kind == "pair" and isinstance(value, list) else value,
                                      names(key) if names else None)
    return checked


# -- how each road names the inputs in its messages -------------------------------------------------------------
INPUT_FLAGS = {"prompt": "--prompt", "word": "--word", "image": "--image", "mask": "--mask", "bbox": "--bbox",
               "subjects": "--subject", "start_image": "--start-image", "extend": "--extend",
               "subject_strength": "strength= of --subject"}
"""The command line's flags of a generation's inputs that are not settings, by jobs key."""
SUBJECT_KEYS = {"subject_strength": "'strength' of a 'subjects' entry"}
"""A jobs line's names of the inputs inside its ``subjects`` entries."""


def flag_names(key: str) -> str:
    """The command line's (and the Python API's) name of an input: its flag (``--cfg``, ``--image``)."""
    return SETTINGS[key].flag if key in SETTINGS else INPUT_FLAGS.get(key, key)


def key_names(key: str) -> str:
    """A jobs line's name of an input: its key, quoted (``'cfg'``, ``'image'``)."""
    return SUBJECT_KEYS.get(key, repr(key))


SAMPLER_BATCH = Setting("int", 1, "videos per run, one after another with seeds seed, seed + 1, ...", key="batch",
                        label="batch", minimum=1, maximum=64)
"""VideoBooth Sampler's batch widget (not a generation setting: the command line's is ``--jobs`` or ``--best-of``)."""
LCM_STEPS = Setting("int", 4, "steps of the lcm sampler on the native road (the distilled LoRA's 1, 2, 4 or 8; at most "
                    "one per point of its 50-point grid)", key="lcm_steps", label="steps", minimum=1,
                    maximum=LCM_MAX_STEPS)
"""VideoBooth LCM Schedule's steps widget (the command line's is ``--steps`` with ``--sampler lcm``)."""
WIDGET_SETTINGS: dict[str, Setting] = {**SETTINGS, "batch": SAMPLER_BATCH, "lcm_steps": LCM_STEPS}
"""Every setting a node widget takes its options and its check from, by key."""


def widget(key: str, table: Mapping[str, Setting] | None = None, **extra: Any) -> dict[str, Any]:
    """ComfyUI widget options (default, min, max, step for multiples) of a numeric setting of ``table`` (default
    :data:`WIDGET_SETTINGS`), plus ``extra``. A setting whose default is None gets default and min 0: 0 is "not
    set" (the node passes None)."""
    spec = table[key] if table is not None else WIDGET_SETTINGS[key]
    options: dict[str, Any] = {"default": spec.default}
    low = spec.minimum if spec.minimum is not None else spec.above
    if spec.default is None:  # a number ComfyUI cannot leave empty: 0 stands for "not set" (the model's value)
        options["default"], low = 0, 0
    if low is not None:
        options["min"] = low
    if spec.maximum is not None:
        options["max"] = spec.maximum
    if spec.multiple_of:
        options["step"] = spec.multiple_of
    return {**options, **extra}
