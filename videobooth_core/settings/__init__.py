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

The modules, each importing only those above it: ``constants`` (the shared constants: trained size and frames,
VAE scale, seeds, long-video windows, per-run defaults), ``table`` (:class:`Setting` and the table mechanism),
``generation`` (VideoBooth's settings, their table, names and widgets), ``videocrafter`` (VideoCrafter1/2's),
``device`` (the devices of this machine) and ``validation`` (:func:`check_request`). Import from here:
``from videobooth_core.settings import SETTINGS``.
"""

from ..models.attention import ATTENTION_BACKENDS  # the run's kernels (--attention), beside PRECISIONS
from .constants import (
    CONTEXT_OVERLAP,
    CONTEXT_WINDOW,
    CONVERT_PRECISION,
    DEFAULT_ATTENTION,
    DEFAULT_DEVICE,
    DEFAULT_PRECISION,
    FUSE_MODES,
    LORA_STRENGTH_RANGE,
    MAX_BEST_OF,
    MAX_SEED,
    PRECISIONS,
    TRAINED_FRAMES,
    TRAINED_SIZE,
    VAE_SCALE,
)
from .device import available_devices, check_device
from .generation import (
    INPUT_FLAGS,
    LCM_STEPS,
    SAMPLER_BATCH,
    SETTINGS,
    SUBJECT_KEYS,
    WIDGET_SETTINGS,
    GenerationSettings,
    SamplingOptions,
    check_settings_values,
    flag_names,
    key_names,
    settings_kwargs,
    widget,
)
from .table import (
    REQUIRED,
    Names,
    Setting,
    add_setting_flags,
    check_lora_strength,
    check_number,
    setting_field,
    settings_table,
)
from .validation import check_request, load_prompt_tokenizer, log_once
from .videocrafter import (
    VIDEOCRAFTER_MAX_FRAMES,
    VIDEOCRAFTER_MAX_LONG_FRAMES,
    VIDEOCRAFTER_SETTINGS,
    VIDEOCRAFTER_SIZE_STEP,
    VideoCrafterSettings,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "CONTEXT_OVERLAP",
    "CONTEXT_WINDOW",
    "CONVERT_PRECISION",
    "DEFAULT_ATTENTION",
    "DEFAULT_DEVICE",
    "DEFAULT_PRECISION",
    "FUSE_MODES",
    "INPUT_FLAGS",
    "LCM_STEPS",
    "LORA_STRENGTH_RANGE",
    "MAX_BEST_OF",
    "MAX_SEED",
    "PRECISIONS",
    "REQUIRED",
    "SAMPLER_BATCH",
    "SETTINGS",
    "SUBJECT_KEYS",
    "TRAINED_FRAMES",
    "TRAINED_SIZE",
    "VAE_SCALE",
    "VIDEOCRAFTER_MAX_FRAMES",
    "VIDEOCRAFTER_MAX_LONG_FRAMES",
    "VIDEOCRAFTER_SETTINGS",
    "VIDEOCRAFTER_SIZE_STEP",
    "WIDGET_SETTINGS",
    "GenerationSettings",
    "Names",
    "SamplingOptions",
    "Setting",
    "VideoCrafterSettings",
    "add_setting_flags",
    "available_devices",
    "check_device",
    "check_lora_strength",
    "check_number",
    "check_request",
    "check_settings_values",
    "flag_names",
    "key_names",
    "load_prompt_tokenizer",
    "log_once",
    "setting_field",
    "settings_kwargs",
    "settings_table",
    "widget",
]
