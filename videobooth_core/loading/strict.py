"""Strict loading on the ``meta`` device: build a module without allocating its weights, check that a state dict
has exactly its keys and shapes (one error message naming the first missing, unexpected and mis-shaped keys), then
*assign* the file's tensors (``load_state_dict(strict=True, assign=True)``), so a large checkpoint is never held
twice in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import CheckpointError, VideoBoothError, explain
from .weight_files import CONFIG_METADATA_KEY

Device = str | torch.device


def format_keys(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def key_mismatch_report(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    file_name: Callable[[str], str] = lambda key: key,
) -> str | None:
    """``None`` when ``state_dict`` has exactly the keys and shapes of ``expected``, else a summary of the first
    differences: ``missing keys (N): ...; unexpected keys (N): ...; wrong shapes (N, file vs model): ...``.
    ``file_name`` maps a model key to its name in the file (the names the user can look up)."""
    missing = [file_name(k) for k in expected if k not in state_dict]
    unexpected = [file_name(k) for k in state_dict if k not in expected]
    mismatched = [
        f"{file_name(k)!r} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {format_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
    if mismatched:
        shown = "; ".join(mismatched[:3]) + (f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else "")
        parts.append(f"wrong shapes ({len(mismatched)}, file vs model): {shown}")
    return "; ".join(parts) or None


def check_keys(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    what: str,
    file_name: Callable[[str], str] = lambda key: key,
) -> None:
    """Raise the strict-loading :class:`CheckpointError` unless ``state_dict`` matches ``expected`` exactly.

    Args:
        state_dict: the file's tensors (meta tensors are enough: only keys and shapes are compared).
        expected: the module's ``state_dict()`` (built on the meta device).
        source: the file, for the message.
        what: what the file should hold, e.g. ``"a VideoBooth UNet"``.
        file_name: maps a model key to the key's name in the file.
    """
    report = key_mismatch_report(state_dict, expected, file_name)
    if report:
        raise CheckpointError(explain(
            f"the weights do not match {what}: {report}; in", source,
            "use a complete, unmodified file of the right model (a partial download, a pruned or merged file, or "
            f"another architecture causes this); a config stored in the file (the '{CONFIG_METADATA_KEY}' metadata) "
            "must describe its weights"))


def build_on_meta(build: Callable[[], torch.nn.Module], *, source: str | os.PathLike, expected: str) -> torch.nn.Module:
    """``build()`` on the meta device (no weight memory); a config the model rejects is a :class:`CheckpointError`."""
    try:
        with torch.device("meta"):
            return build()
    except VideoBoothError:
        raise
    except (ValueError, TypeError, KeyError, AssertionError, AttributeError) as e:
        raise CheckpointError(explain(
            f"cannot build {expected} from the config ({e})", source,
            f"check the config (or the '{CONFIG_METADATA_KEY}' metadata), or use the model's original files")) from e


def assign_weights(
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    *,
    source: str | os.PathLike,
    expected: str,
    dtype: torch.dtype | None,
    device: Device,
    file_name: Callable[[str], str] = lambda key: key,
) -> None:
    """Strictly load ``weights`` (model key names) into the meta-built ``model`` with ``assign=True``; leave it in
    eval mode with ``requires_grad=False``.

    Floating-point tensors are cast to ``dtype`` (kept when ``None``); every tensor moves to ``device`` (neither
    copies a tensor already there in that dtype). Non-persistent buffers left on the meta device (``position_ids``)
    are recreated on ``device``.

    Raises:
        CheckpointError: the keys or shapes differ (see :func:`check_keys`).
    """
    check_keys(weights, model.state_dict(), source, expected, file_name)
    prepared = {
        k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
        for k, v in weights.items()
    }
    model.load_state_dict(prepared, strict=True, assign=True)
    _materialize_meta_buffers(model, device, source)
    model.eval()
    model.requires_grad_(False)


def _materialize_meta_buffers(model: torch.nn.Module, device: Device, source: str | os.PathLike) -> None:
    """Recreate the non-persistent buffers that ``assign=True`` left on the meta device."""
    for module_name, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name != "position_ids":  # a buffer of a future library version this loader does not know
                raise CheckpointError(explain(
                    f"the buffer {module_name}.{name} of {type(model).__name__} is not stored in the file and has no "
                    "known initialisation", source, "use the library versions of requirements.txt"))
            module._buffers[name] = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
