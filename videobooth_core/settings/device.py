"""The devices of this machine, as ``--device`` takes them, and the check that a run's device exists (before any
model loads). torch is imported by the functions: importing the settings stays cheap."""

from __future__ import annotations

from typing import Any

from ..errors import DeviceError


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
