"""A trainable LoRA on the VideoBooth UNet, saved in kohya's format so that the pack's LoRA loaders read it.

Layers are named by the UNet's own module paths (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``);
the update of a layer is ``scale * up @ down`` (``scale = alpha / rank``), applied as a forward hook that adds
``scale * up(down(x))`` to the module's output, so the frozen weights are never touched and strength 0 (or a
disabled adapter) leaves every output bit for bit.

Key/value layers: VideoBooth attends with the mapper's projections, not the UNet's own ``attn1``/``attn2``
``to_k``/``to_v``. A LoRA layer named after a UNet K/V projection therefore updates the modules that really project
keys/values, chosen by :func:`~videobooth_core.loading.sd_checkpoint.kv_target_modules`, the same function the
loader (:func:`~videobooth_core.loading.lora.apply_loras` with ``kv="mapper"``, its default) uses to merge it:
``attn1.to_k`` updates the mapper's ``to_k_new`` (video tokens) and ``to_k_exemplar`` (image-prompt tokens) with
one shared delta, ``attn2.to_k`` the mapper's text key. What is trained is what is loaded.

The file (:func:`save_kohya`) holds ``lora_unet_<name with _>.lora_down.weight`` (rank, in),
``.lora_up.weight`` (out, rank) and ``.alpha``: kohya's format, the one ComfyUI's own LoRA loader and every
SD 1.x LoRA tool read, and whose per-layer ``.alpha`` keeps the scale inside the file (PEFT keeps it in a separate
``adapter_config.json``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainingError, explain
from ..loading.sd_checkpoint import kv_target_modules
from .config import DEFAULT_LORA_TARGETS

DEFAULT_TARGETS = DEFAULT_LORA_TARGETS


def target_names(unet: nn.Module, targets: Sequence[str]) -> list[str]:
    """The UNet's linear layers (module paths, in model order) whose path ends with one of ``targets``; K/V paths
    are listed even when the UNet released its own projections (the mapper's are then what they name)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)]
    names += [f"{site.site}.transformer_blocks.0.{attn}.{proj}" for site in unet.attention_sites
              for attn in ("attn1", "attn2") for proj in ("to_k", "to_v")]
    chosen = [n for n in dict.fromkeys(names) if not n.startswith("watermark_")
              and any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        raise TrainingError(explain("the LoRA targets match no layer of the UNet", ", ".join(targets),
                                    f"use module-path endings such as {', '.join(DEFAULT_TARGETS[:3])}"))
    return chosen


def _real_modules(unet: nn.Module, name: str) -> list[nn.Linear]:
    """The modules a layer named ``name`` updates: the mapper's projections for a K/V path, else the layer."""
    return kv_target_modules(unet, name) or [unet.get_submodule(name)]


class LoraLinear(nn.Module):
    """``down`` (rank, in) and ``up`` (out, rank): PEFT's initialisation (Kaiming-uniform down, zero up), so the
    adapter starts as the identity."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))


def _key(name: str) -> str:
    return name.replace(".", "_")


class LoraLayers(nn.Module):
    """The LoRA's parameters only (no reference to the UNet: an EMA copy of it copies nothing else)."""

    def __init__(self, unet: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> None:
        super().__init__()
        self.names = target_names(unet, targets)
        self.rank, self.alpha = int(rank), float(alpha)
        layers = {}
        for name in self.names:
            module = _real_modules(unet, name)[0]
            layers[_key(name)] = LoraLinear(module.in_features, module.out_features, self.rank)
        self.layers = nn.ModuleDict(layers)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraHooks:
    """Forward hooks adding a :class:`LoraLayers`' update to the UNet's (and the mapper's K/V) modules.

    ``active`` chooses whose parameters act (the student's, an EMA target's, or None: the frozen teacher) and
    ``strength`` scales them; both can change between passes (:meth:`use`)."""

    def __init__(self, unet: nn.Module, layers: LoraLayers) -> None:
        self.active: LoraLayers | None = layers
        self.strength = 1.0
        self._handles = []
        for name in layers.names:
            for module in _real_modules(unet, name):
                self._handles.append(module.register_forward_hook(self._hook(_key(name))))

    def _hook(self, key: str) -> Any:
        def add_update(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            layers = self.active
            if layers is None or self.strength == 0:
                return None  # the module's own output, untouched
            layer = layers.layers[key]
            x = args[0]
            update = F.linear(F.linear(x.to(layer.down.dtype), layer.down), layer.up)
            return output + (self.strength * layers.scale) * update.to(output.dtype)
        return add_update

    @contextmanager
    def use(self, layers: LoraLayers | None, strength: float | None = None) -> Iterator[None]:
        """Within the block ``layers`` act (None: none, the teacher) at ``strength`` (unchanged when None)."""
        previous = (self.active, self.strength)
        self.active = layers
        if strength is not None:
            self.strength = float(strength)
        try:
            yield
        finally:
            self.active, self.strength = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def kohya_state_dict(layers: LoraLayers) -> dict[str, torch.Tensor]:
    """The layers in kohya's key layout (module docstring), float32 on the CPU."""
    state = {}
    for name in layers.names:
        layer = layers.layers[_key(name)]
        stem = "lora_unet_" + _key(name)
        state[stem + ".lora_down.weight"] = layer.down.detach().float().cpu().contiguous()
        state[stem + ".lora_up.weight"] = layer.up.detach().float().cpu().contiguous()
        state[stem + ".alpha"] = torch.tensor(layers.alpha, dtype=torch.float32)
    return state


def save_kohya(layers: LoraLayers, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``layers`` as a kohya LoRA safetensors file (atomically); returns the path."""
    from ..loading.weight_files import save_safetensors

    info = {"ss_network_module": "networks.lora", "ss_network_dim": str(layers.rank),
            "ss_network_alpha": f"{layers.alpha:g}", **(metadata or {})}
    save_safetensors(kohya_state_dict(layers), path, info)
    return Path(path)


__all__ = ["DEFAULT_TARGETS", "LoraHooks", "LoraLayers", "LoraLinear", "kohya_state_dict", "save_kohya",
           "target_names"]
