"""The one way the nodes check their widgets: each widget that is a setting is checked by that setting's rule in
``videobooth_core/settings/`` (the table its default and range come from), and the message names the widget.
The Sampler, Context Options, Start Frames, Latent Injection and Image Prompt nodes call :func:`check_widgets`
(the LoRA node's strengths go through ``settings.check_lora_strength``, the same rule as ``--lora``); combinations
of settings are then the core's: the one validation (``GenerationRequest.validate``) with :func:`widget_names` on
the Sampler, ``check_context`` on Context Options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..videobooth_core.settings import WIDGET_SETTINGS, Names


def check_widgets(values: Mapping[str, Any], settings: Mapping[str, str] | None = None) -> None:
    """Every widget value of ``values`` (by widget name) checked by its setting's rule; SamplingError naming the
    widget, the value and the fix. ``settings``: the setting of a widget named otherwise (``strength``:
    ``image_prompt_strength``); a widget of two values (start, end) is given as a pair."""
    for name, value in values.items():
        key = (settings or {}).get(name, name)
        WIDGET_SETTINGS[key].check(value, name if key != name else None)  # a widget named as its setting: the label


def widget_names(names: Mapping[str, str]) -> Names:
    """The ``names`` of the core's validation for a node: a setting is named as ``names`` says (a widget, or a
    widget of another node), else by its own label (the widgets that share the settings' names)."""
    return names.get
