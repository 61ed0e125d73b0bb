"""One home for the settings of a generation: defaults, ranges, choices, help, command-line flags, jobs keys
and the checks, all in one place.

Every user-facing setting is a field of :class:`GenerationSettings` (or of :class:`SamplingOptions`, the
opt-in speed modes) whose metadata is a :class:`Setting`. The command line builds its flags from
:data:`SETTINGS` (:func:`add_setting_flags`), batch jobs read their keys from it, the ComfyUI nodes take their
widget ranges from it (a test checks them), and :func:`check_request` is the one validation that the single run,
batch jobs, the API and the nodes all call before any model is loaded or any step is run. The trainer's settings
are a table of the same kind (:func:`settings_table` over its ``TrainConfig``: ``training.config.TRAIN_SETTINGS``),
giving its flags, config-file keys and checks.

    SETTINGS["cfg"]          # Setting(kind="float", default=4.0, minimum=0.0, maximum=30.0, flag="--cfg", ...)
    settings_kwargs({"cfg": 6, "single_frame_image_prompt": True})  # GenerationRequest keyword arguments
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

from .conditioning.text import NULL_PROMPT, SUBJECT_MATCHES, WHOLE_WORD
from .errors import DeviceError, ImagePromptError, SamplingError, VideoBoothError
from .loading.checkpoint import DTYPES
from .models.attention import ATTENTION_BACKENDS
from .sampling.denoiser import GUIDANCE_RULES
from .sampling.known_frames import check_long_video
from .sampling.lcm import LCM_SAMPLER, MAX_STEPS as LCM_MAX_STEPS, lcm_timesteps
from .sampling.schedulers import OFFICIAL_SAMPLER, SAMPLERS, SPACINGS
from .sampling.videocrafter import REFUSED_SAMPLERS as VIDEOCRAFTER_REFUSED_SAMPLERS
from .sampling.videocrafter import SAMPLERS as VIDEOCRAFTER_SAMPLERS

logger = logging.getLogger(__name__)

Names = Callable[[str], "str | None"]
"""How one road names an input in its messages, by its jobs key (``cfg``, ``image``...): the command line by its
flag, a jobs line by its key, a node by its widget; None keeps the setting's own label."""

MAX_SEED = 2**64 - 1
"""Seeds are 64-bit: torch.Generator.manual_seed takes [0, 2**64)."""
TRAINED_FRAMES = 16
TRAINED_SIZE = 256
"""The released model was trained on 16 frames of 256 x 256; anything else is an extrapolation."""
VAE_SCALE = 8
"""Pixels per latent cell of the SD 1.x VAE."""
CONTEXT_WINDOW = TRAINED_FRAMES
"""Long videos: frames per UNet call by default (the trained length)."""
CONTEXT_OVERLAP = 4
FUSE_MODES: tuple[str, ...] = ("pyramid", "flat")
"""How overlapping windows' predictions are weighted; the first is the default."""

# -- per-run settings (the command line's and the loader nodes'; not part of a generation's request) -------------
PRECISIONS: tuple[str, ...] = tuple(DTYPES)
"""Weight precisions (``--dtype``, the loader nodes' precision); the first, fp32, is a generation's default (the
official numerics)."""
DEFAULT_PRECISION = PRECISIONS[0]
CONVERT_PRECISION = "fp16"
"""Precision of the weights ``convert`` writes (half the size; loading casts them to the run's precision)."""
DEFAULT_ATTENTION = ATTENTION_BACKENDS[0]
"""The attention kernel of a run (``--attention``): sdpa, the tested default."""
DEFAULT_DEVICE = "cpu"


@dataclass(frozen=True)
class Setting:
    """What is known about one setting. ``kind``: ``int``, ``float``, ``str``, ``bool``, ``pair`` (two
    floats, start < end), ``choice`` (one of ``choices``, of any type; the command line reads it with ``parse``)
    or ``strs`` (a non-empty list of non-empty strings; ``nargs="+"`` on the command line). Bounds are inclusive
    except ``above`` and ``below`` (value must exceed / stay under it).
    A setting whose default is None may also be None (not set)."""

    kind: str
    default: Any
    help: str
    key: str = ""
    """Jobs key, config-file key and command-line ``dest``; the field name when empty."""
    flag: str = ""
    """Command-line flag; ``--key`` with dashes when empty (``--no-...`` for a setting that defaults to True)."""
    label: str = ""
    """Name used in messages; the key when empty."""
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    multiple_of: int | None = None
    choices: tuple[Any, ...] | None = None
    name: str = ""
    """The dataclass field (filled in by :func:`settings_table`)."""
    section: str = "request"
    """``request`` (a field of GenerationSettings), ``options`` (a field of SamplingOptions), ``train`` (a field
    of the trainer's TrainConfig)."""
    required: bool = False
    """No default: the command line or the config file must give it."""
    error: type[VideoBoothError] = SamplingError
    """The error a bad value raises (the trainer's: TrainingError)."""
    shown_default: str = ""
    """The default as the help shows it, when the value alone would not say it."""
    parse: Callable[[str], Any] | None = None
    """A ``choice`` setting's command-line type: the typed text to the value (e.g. ``"1"`` to 1)."""
    refused: tuple[tuple[Any, str], ...] = ()
    """Values refused with their own reason, as ``(value, why and the fix)`` pairs (another family's sampler)."""

    def check(self, value: Any, name: str | None = None) -> Any:
        """``value`` if it is valid for this setting; otherwise ``error`` naming it (as ``name``, how the caller's
        road calls it: a flag, a jobs key, a config-file key, a widget; the label when None) and the fix."""
        what = name or self.label or self.key
        if value is None and self.default is None and not self.required:
            return None
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise self.error(f"{what} must be true or false, got {value!r}")
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise self.error(f"{what} must be a string, got {value!r}")
            for refused, why in self.refused:
                if value == refused:
                    raise self.error(f"{what} {value!r} is not available: {why}")
            if self.choices is not None and value not in self.choices:
                raise self.error(f"unknown {what} {value!r}; choose one of {', '.join(self.choices)}")
            return value
        if self.kind == "pair":
            return self._check_pair(value, what)
        if self.kind == "choice":  # any type; True is not 1 here
            if isinstance(value, bool) or value not in self.choices:
                raise self.error(f"{what} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
            return value
        if self.kind == "strs":
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value \
                    or not all(isinstance(item, str) and item for item in value):
                raise self.error(f"{what} must be a list of one or more non-empty strings, got {value!r}; "
                                 f"the default is {self.describe_default()}")
            return tuple(value)
        whole = self.kind == "int"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
            raise self.error(f"{what} must be {'a whole number' if whole else 'a number'}, got {value!r}")
        if self.choices is not None:
            if value not in self.choices:
                raise self.error(f"{what} must be one of {', '.join(map(str, self.choices))}, got {value}")
            return value
        if not math.isfinite(value):
            raise self.error(f"{what} must be a finite number, got {value}; {self._fix()}")
        if self.multiple_of and (value < self.multiple_of or value % self.multiple_of):
            nearest = max(self.multiple_of, round(value / self.multiple_of) * self.multiple_of)
            raise self.error(f"{what} must be a positive multiple of {self.multiple_of}, got {value}; try {nearest}")
        default = f"the default is {self.describe_default()}"
        if self.above is not None and not value > self.above:
            raise self.error(f"{what} must be greater than {_number(self.above)}, got {value}; {default}")
        if self.below is not None and not value < self.below:
            raise self.error(f"{what} must be less than {_number(self.below)}, got {value}; {default}")
        if self.minimum is not None and value < self.minimum:
            most = f" and at most {_number(self.maximum)}" if self.maximum is not None else ""
            raise self.error(f"{what} must be at least {_number(self.minimum)}{most}, got {value}; {default}")
        if self.maximum is not None and value > self.maximum:
            raise self.error(f"{what} must be between {_number(self.minimum)} and {_number(self.maximum)}, "
                             f"got {value}; {default}")
        return value

    def _check_pair(self, value: Any, what: str) -> tuple[float, float]:
        if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)):
            raise self.error(f"{what} must be two numbers (start, end), got {value!r}")
        start, end = float(value[0]), float(value[1])
        low, high = _number(self.minimum), _number(self.maximum)
        if not (math.isfinite(start) and math.isfinite(end)) or not self.minimum <= start < end <= self.maximum:
            example = f"{what} 0 0.5" if what.startswith("--") else "start 0 and end 0.5"  # a flag, or any other name
            raise self.error(f"{what} must satisfy {low} <= start < end <= {high}, got ({value[0]}, {value[1]}); "
                             f"e.g. {example} for the first half of the steps ({low} {high} is official)")
        return start, end

    def _fix(self) -> str:
        bounds = []
        if self.above is not None:
            bounds.append(f"above {_number(self.above)}")
        if self.below is not None:
            bounds.append(f"below {_number(self.below)}")
        if self.minimum is not None and self.maximum is not None:
            bounds.append(f"between {_number(self.minimum)} and {_number(self.maximum)}")
        elif self.minimum is not None:
            bounds.append(f"at least {_number(self.minimum)}")
        elif self.maximum is not None:
            bounds.append(f"at most {_number(self.maximum)}")
        return f"use a value {' and '.join(bounds)} (default {self.describe_default()})"

    def describe_default(self) -> str:
        """The default as a user types it on the command line."""
        if self.shown_default:
            return self.shown_default
        if self.kind == "pair":
            return " ".join(_number(v) for v in self.default)
        return repr(self.default) if isinstance(self.default, str) else _number(self.default)


def _number(value: Any) -> str:
    if value == MAX_SEED:
        return "2**64 - 1"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


REQUIRED = object()
"""The default of a setting that has none (:func:`setting_field`): the user must give it."""


def setting_field(kind: str, default: Any, help: str, **details: Any) -> Any:
    """A dataclass field described by a :class:`Setting` (collected by :func:`settings_table`); ``default``
    :data:`REQUIRED` makes a field without a default."""
    if default is REQUIRED:
        return field(metadata={"setting": Setting(kind, None, help, required=True, **details)})
    return field(default=default, metadata={"setting": Setting(kind, default, help, **details)})


_setting = setting_field


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


def settings_table(*sections: tuple[str, type], error: type[VideoBoothError] = SamplingError) -> dict[str, Setting]:
    """Every :class:`Setting` of the dataclasses of ``sections`` ((section name, class) pairs) by key, in field
    order, with key, flag, label, field name, section and error filled in: the one table that a command's flags,
    its jobs or config-file keys, its widgets and its checks are made from."""
    table = {}
    for section, cls in sections:
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("setting")
            if spec is None:
                continue
            key = spec.key or f.name
            flag = spec.flag or "--" + ("no-" if spec.kind == "bool" and spec.default is True else "") \
                + key.replace("_", "-")
            table[key] = dataclasses.replace(spec, key=key, flag=flag, label=spec.label or key, name=f.name,
                                             section=section, error=error)
    return table


def _table() -> dict[str, Setting]:
    return settings_table(("request", GenerationSettings), ("options", SamplingOptions))


SETTINGS: dict[str, Setting] = _table()
"""Every user-facing setting by its jobs key (also the command line's dest), in help order."""


# -- VideoCrafter1/2 ------------------------------------------------------------------------------------------
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


def check_number(flag: str, value: Any, default: Any, *, whole: bool = False, minimum: float | None = None,
                 maximum: float | None = None, above: float | None = None) -> Any:
    """One numeric input of a command that is not a generation setting (``--limit``, ``--lr``, a LoRA's
    strength, ``--best-of``...) checked as the settings are (:meth:`Setting.check`): a number, finite, in its
    range; ``None`` (not given) passes. SamplingError naming ``flag``, the value and the fix otherwise."""
    if value is None:
        return None
    spec = Setting("int" if whole else "float", default, "", key=flag, flag=flag, label=flag, minimum=minimum,
                   maximum=maximum, above=above)
    return spec.check(value)


LORA_STRENGTH_RANGE = (-10.0, 10.0)
"""A LoRA's strength (the nodes' widget range): past it the merged weights are noise (1e30 gives a black video)."""
MAX_BEST_OF = 100
"""``--best-of`` at most: every candidate is a whole generation (and its frames are held until ranked)."""


def check_lora_strength(value: Any, what: str = "the LoRA strength") -> float:
    """A LoRA's strength: a finite number within :data:`LORA_STRENGTH_RANGE` (SamplingError otherwise)."""
    low, high = LORA_STRENGTH_RANGE
    return check_number(what, value, 1.0, minimum=low, maximum=high)


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


def add_setting_flags(parser: Any, table: Mapping[str, Setting], *, unset: bool = False,
                      group_of: Callable[[Setting], Any] | None = None) -> None:
    """One command-line flag per setting of ``table`` (argparse): flag, ``dest`` (the key), type, choices and
    help with the default come from the table. ``unset``: every flag defaults to None, so a value not given
    on the command line can come from a config file (the trainer); otherwise to the setting's default.
    ``group_of``: the argparse group a setting's flag goes in (default ``parser``)."""
    for spec in table.values():
        group = group_of(spec) if group_of is not None else parser
        if spec.kind == "bool":
            state = spec.shown_default or ("runs" if spec.default else "off")
            group.add_argument(spec.flag, dest=spec.key, action="store_const", const=not spec.default,
                               default=None if unset else spec.default, help=f"{spec.help} (default: {state})")
            continue
        kind = spec.parse or {"int": int, "float": float, "pair": float, "str": str, "strs": str,
                              "choice": str}[spec.kind]
        extra: dict[str, Any] = {"nargs": 2, "metavar": ("START", "END")} if spec.kind == "pair" else {}
        if spec.kind == "strs":
            extra["nargs"] = "+"
        if spec.choices:
            extra["choices"] = spec.choices
        shown = "required" if spec.required else f"default: {spec.describe_default()}"
        group.add_argument(spec.flag, dest=spec.key, type=kind, default=None if unset else spec.default,
                           help=f"{spec.help} ({shown})", **extra)


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


# -- devices -----------------------------------------------------------------------------------------
def available_devices() -> list[str]:
    """The devices this machine has, as ``--device`` takes them (``cpu``, ``cuda``, ``cuda:0``..., ``mps``)."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: Any) -> Any:
    """``torch.device(device)`` if this machine has it; DeviceError naming the devices that exist otherwise."""
    import torch

    here = ", ".join(available_devices())
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r}; this machine has: {here}") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {device!r}: no CUDA GPU is available here (this machine has: {here}); "
                                "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU")
        if parsed.index is not None and parsed.index >= count:
            raise DeviceError(f"device {device!r}: this machine has {count} CUDA GPU(s) ({here})")
        return parsed
    if parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {device!r}: Apple's MPS is not available here (this machine has: {here})")
        return parsed
    raise DeviceError(f"device {device!r} is not supported; this machine has: {here}")


# -- the one validation --------------------------------------------------------------------------------
def load_prompt_tokenizer(models_dir: str | Path) -> Any:
    """The CLIP tokenizer of a models folder (cheap: two text files), to check prompts before any model loads."""
    from .conditioning.tokenizer import load_clip_tokenizer
    from .loading.models_dir import check_models_dir, find_tokenizer_dir

    return load_clip_tokenizer(find_tokenizer_dir(check_models_dir(models_dir)))


def check_request(request: Any, tokenizer: Any = None, device: Any = None, *, names: Names | None = None,
                  fine_injection: Any = None) -> list[str]:
    """Validate one generation before any model is loaded; return the warnings (not logged here). Every road
    calls it: the pipeline (:meth:`GenerationRequest.validate`), so the Python API; the command line and batch
    jobs through the one request builder (:func:`videobooth_core.app.request.build_request`); the Sampler node.

    ``request`` is a :class:`GenerationSettings` with ``prompt``, ``subject_word``, ``image``, ``mask``, ``bbox``
    and ``subjects`` (the pipeline's GenerationRequest). With ``tokenizer`` the prompts are checked against CLIP's
    77 tokens after the subject splice; with ``device`` the device must exist on this machine. The photos are
    prepared here, once per request (:func:`conditioning.subjects.prepare_photo` keeps them for the
    conditioning). ``names``: how the caller's road names the inputs in messages (:data:`Names`; the flags when
    None). ``fine_injection``: the plan of the image-prompt streams when the caller made it without photos (the
    Sampler node, from its exemplars); otherwise it is planned from the request's subjects.

    Raises:
        VideoBoothError: SamplingError, ImagePromptError or PromptError naming the value and the fix.
    """
    from .conditioning.subjects import check_subjects, check_windowed_subjects, plan_request_injection, prepare_photo
    from .conditioning.text import prompt_fit_warnings, substitute_subject
    
    def say(key: str) -> str:  # the road's name, else the setting's label; the flags when no road is named
        if names is None:
            return flag_names(key)
        return names(key) or (SETTINGS[key].label if key in SETTINGS else key)

    if device is not None:
        check_device(device)
    request.check(names)
    check_long_video(request, say)
    has_image, has_word = request.image is not None, request.subject_word is not None
    if has_image != has_word:
        raise ImagePromptError(
            "an image prompt needs both the image and the subject word (the prompt's word naming the subject); "
            f"got {'an image without a subject word' if has_image else f'the subject word {request.subject_word!r} without an image'}; "
            f"give both ({say('image')} and {say('word')}), or neither for text-to-video")
    if not has_image and (request.mask is not None or request.bbox is not None):
        given = " and ".join(n for n, v in (("a mask", request.mask), ("a bbox", request.bbox)) if v is not None)
        raise ImagePromptError(f"{given} without an image: the mask and the bbox select the subject in its photo; "
                               f"give the photo too ({say('image')} and {say('word')}), or drop them for "
                               "text-to-video")
    if not isinstance(request.prompt, str):
        raise VideoBoothError(f"the prompt must be a string, got {type(request.prompt).__name__}")
    if has_image:
        prepare_photo(request, request.image, request.mask, request.bbox)
        substitute_subject(request.prompt, request.subject_word, request.subject_match)
    warnings = []
    subjects = getattr(request, "subjects", None)
    if subjects:  # several subjects: each checked, the prompt measured after every splice
        warnings += check_subjects(request, tokenizer, SETTINGS["image_prompt_strength"].check)
    elif tokenizer is not None:
        warnings += prompt_fit_warnings(tokenizer, request.prompt, request.subject_word if has_image else None,
                                        request.subject_match)
    if fine_injection is None and subjects:
        fine_injection = plan_request_injection(request)
    if fine_injection is not None:
        check_windowed_subjects(fine_injection, request, say)
    if tokenizer is not None:
        warnings += prompt_fit_warnings(tokenizer, request.negative_prompt, what="negative prompt")
    if request.frames > max(TRAINED_FRAMES, request.context_window):
        warnings.append(f"{request.frames} frames: the model was trained on {TRAINED_FRAMES}, so the video is denoised "
                        f"in overlapping windows of {request.context_window} frames that all attend to frame 0 and the "
                        "image prompt (motion may drift or repeat from window to window; see "
                        f"{say('context_overlap')})")
    elif request.frames > TRAINED_FRAMES:
        warnings.append(f"{request.frames} frames: the model was trained on {TRAINED_FRAMES}, so longer videos are an "
                        f"extrapolation (they tend to repeat or lose the subject); {say('context_window')} "
                        f"{TRAINED_FRAMES} denoises them in windows of the trained length")
    if (request.width, request.height) != (TRAINED_SIZE, TRAINED_SIZE):
        warnings.append(f"{request.width}x{request.height}: the model was trained at {TRAINED_SIZE}x{TRAINED_SIZE}, "
                        "so other sizes are an extrapolation (expect less coherent frames)")
    return warnings


@functools.lru_cache(maxsize=1024)
def log_once(message: str, name: str = __name__) -> None:
    """Log a warning once per process: the command line validates before loading the models and the pipeline
    validates again before sampling, and the user needs to read each warning once."""
    logging.getLogger(name).warning(message)
