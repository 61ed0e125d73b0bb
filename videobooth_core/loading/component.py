"""One model component (a CLIP tower, a VAE) read from the two layouts users keep it in: a transformers/diffusers
model folder, or a single weight file that may hold other parts too (a full Stable Diffusion checkpoint); and the
two helpers that infer a component's config from its weight shapes. Written once for :mod:`.clip` and :mod:`.vae`.

    found = read_component(path, subfolder="vae", flavour="diffusers", marker="encoder.conv_in.weight",
                           example_key="encoder.conv_in.weight", expected="a VAE", folder_config=_vae_folder_config)
    found.config        # folder_config(folder) for a folder; None for a single file (metadata or shapes then)
    found.weights       # the component's tensors, its prefix in the file removed

Cheap to import (no transformers, no diffusers).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch

from ..errors import CheckpointError, explain
from ..files import PathLike
from .kinds import select_component
from .weight_files import (
    CONFIG_METADATA_KEY,
    read_folder_weights,
    read_state_dict,
    resolve_model_folder,
    unwrap_state_dict,
)

ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class Component(Generic[ConfigT]):
    """What :func:`read_component` found."""

    source: str
    """The folder (the resolved sub-folder of a pipeline root) or the file, as messages name it."""
    config: ConfigT | None
    """``folder_config(folder)`` for a folder; None for a single file (its config comes from its metadata or its
    shapes, which the caller decides)."""
    state_dict: dict[str, torch.Tensor]
    """Every tensor read (a full checkpoint's other parts too: a CLIP tower's projection lies outside the tower)."""
    prefix: str
    """The component's key prefix in the file (``first_stage_model.``, ``''``), for naming keys as the file has them."""
    weights: dict[str, torch.Tensor]
    """The component's tensors, ``prefix`` removed."""


def read_component(
    path: PathLike,
    *,
    subfolder: str,
    flavour: str,
    marker: str,
    example_key: str,
    expected: str,
    folder_config: Callable[[Path], ConfigT],
) -> Component[ConfigT]:
    """Read the one component whose keys end in ``marker`` from a model folder or a single weight file.

    Args:
        path: a model folder (``config.json`` + weights, or a pipeline root with ``subfolder/``) or a weight file.
        flavour: the folder's weight file names, ``"transformers"`` or ``"diffusers"``.
        marker / example_key: how the component's keys end / a key named in the error when none does.
        expected: the component in words, for errors (``"a CLIP text encoder"``).
        folder_config: reads and checks a folder's ``config.json``; it runs before the weights are read, so a
            folder holding another model is refused without reading gigabytes.

    Raises:
        CheckpointError: no model folder, unreadable/unsafe weights, no such component or several.
    """
    p = Path(path)
    config: ConfigT | None = None
    if p.is_dir():
        folder = resolve_model_folder(p, (subfolder,), expected)
        config = folder_config(folder)
        state_dict = read_folder_weights(folder, flavour)
        source = str(folder)
    else:
        state_dict = unwrap_state_dict(read_state_dict(p), source=p)
        source = str(p)
    prefix, weights = select_component(state_dict, marker, source=source, expected=expected, example_key=example_key)
    return Component(source, config, state_dict, prefix, weights)


def count_indices(keys: Sequence[str], pattern: str) -> int:
    """Number of distinct integers captured by ``pattern`` (one group) among ``keys`` (layers, blocks)."""
    return len({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def require_tensor(
    weights: Mapping[str, torch.Tensor], key: str, *, source: str, what: str, prefix: str = ""
) -> torch.Tensor:
    """``weights[key]``, needed to infer the ``what`` config from shapes (``prefix``: the key's prefix in the file,
    for the message).

    Raises:
        CheckpointError: the key is missing (the fix: a complete file, or the config in the file's metadata).
    """
    if key not in weights:
        raise CheckpointError(explain(
            f"'{prefix}{key}', needed to infer the {what} config, is missing from", source,
            f"use a complete file, or one with the config in its '{CONFIG_METADATA_KEY}' metadata"))
    return weights[key]
