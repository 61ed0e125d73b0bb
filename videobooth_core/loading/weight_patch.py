"""Replacing weights of loaded modules, exactly undoably: the mechanism behind an SD 1.x checkpoint's spatial layers
and merged LoRAs.

A replaced weight gets a *new* ``nn.Parameter`` on its module; the old Parameter object is kept by the
:class:`WeightPatch` and put back by :meth:`WeightPatch.undo`, so undoing is exact by construction (no subtraction,
whatever the dtype). Dropping the patch frees the originals. Because only the module's attribute changes, a
structural copy that shares every tensor (:func:`share_weights_copy`) can be patched without touching the original
modules (what a ComfyUI node needs: its inputs are cached and shared).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import CheckpointError, explain


class WeightPatch:
    """Weights replaced on modules, with the originals kept for :meth:`undo`."""

    def __init__(self) -> None:
        self._originals: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._replaced: set[tuple[int, str]] = set()

    def __len__(self) -> int:
        return len(self._originals)

    def replace(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        """Give ``module`` a new parameter ``name`` holding ``value`` (cast to the old one's dtype and device).

        Replacing the same parameter twice in one patch keeps the very first original (so undo is still exact)."""
        old = getattr(module, name)
        new = nn.Parameter(value.detach().to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad)
        if (id(module), name) not in self._replaced:
            self._originals.append((module, name, old))
            self._replaced.add((id(module), name))
        setattr(module, name, new)

    def undo(self) -> None:
        """Put every original Parameter object back (bit-exact), newest first."""
        for module, name, old in reversed(self._originals):
            setattr(module, name, old)
        self._originals.clear()
        self._replaced.clear()


def check_patchable(unet: nn.Module, what: str) -> None:
    """Refuse a UNet whose weights are not resident (weight streaming reads them from the file at every call)."""
    if getattr(unet, "weight_streamer", None) is not None:
        raise CheckpointError(explain(
            f"{what} changes the UNet's weights, but this UNet streams them from its file", "--stream-weights",
            "load the UNet without --stream-weights (stream_weights=False) to use an SD 1.x checkpoint or LoRAs"))


def share_weights_copy(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Structural copies of ``modules`` (copied together, so references between them stay consistent, e.g. the
    UNet's attached mapper projections) that share every parameter and buffer with the originals: no weight memory
    is copied. Patch the copies with :class:`WeightPatch` and the originals stay as they were."""
    modules = list(modules)
    memo: dict[int, object] = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            memo[id(tensor)] = tensor
    return list(copy.deepcopy(modules, memo))
