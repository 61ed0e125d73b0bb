"""The cheap checks of the weight files a command reads, run before any model loads: the file exists, can be read,
and holds what the flag expects, told from its header (a safetensors header, or a pickle's keys read
memory-mapped, no tensor data), never from its name. A mistyped, corrupt or wrong file then fails in seconds
with the flag's name, not after minutes of loading the other models.

    check_weight_input("runs/s1/videobooth_mapper.safetensors", "--mapper", "mapper")
    check_weight_input("style.safetensors", "--lora", "lora")
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, explain
from .kinds import MAPPER_WRAPPER_KEY, describe_checkpoint, detect_kind
from .weight_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_safetensors_header, read_state_dict

ROLES = {
    "mapper": ("a VideoBooth mapper", ("videobooth_mapper", "wrapped_videobooth_mapper"),
               "give a mapper (a training run's videobooth_mapper.safetensors, or the released mapper.pt)"),
    "starting_mapper": ("a mapper a training stage can start from", ("videobooth_mapper", "elite_mapper"),
                        "pass ELITE's global mapper (stage 1, the official start), a stage-1 result "
                        "(videobooth_mapper.safetensors) or the released mapper.pt"),
    "lora": ("an SD 1.x LoRA", (), "give a LoRA file (kohya, diffusers or PEFT format, .safetensors preferred)"),
    "base_checkpoint": ("an SD 1.x checkpoint", (), "give an SD 1.x checkpoint file or a diffusers UNet folder"),
}
"""What each role's file must be: (in words, the kinds that fill it, the fix)."""


def check_readable(path: str | os.PathLike, flag: str, fix: str, folder_ok: bool = False) -> Path:
    """``path`` exists, is a file (or, with ``folder_ok``, a folder) and can be opened; returns it. CheckpointError
    naming ``flag`` and the path otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(explain(f"{flag}: no such file", str(path), fix))
    if p.is_dir():
        if folder_ok:
            return p
        raise CheckpointError(explain(f"{flag} names a folder, not a file", str(path), fix))
    try:
        with open(p, "rb") as handle:
            handle.read(8)
    except OSError as error:
        raise CheckpointError(explain(f"{flag}: cannot read the file ({error.strerror or error})", str(path),
                                      "check its permissions")) from None
    return p


def header_state_dict(path: Path) -> dict[str, Any]:
    """The keys of a weight file without its tensor data: storage-free tensors from a safetensors header, or a
    pickle's mapping read memory-mapped (weights-only). CheckpointError for a corrupt, truncated or unsafe file."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors_header(path).meta_state_dict()
    if suffix in PICKLE_SUFFIXES:
        return read_state_dict(path)
    raise CheckpointError(explain("unsupported weight file", path.name,
                                  f"use one of {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"))


def check_weight_input(path: str | os.PathLike, flag: str, role: str) -> Path:
    """Check the file given to ``flag`` for ``role`` (a key of :data:`ROLES`) before any model loads: it exists, is
    readable, is a complete weight file and holds what the role needs. Returns the path.

    Raises:
        CheckpointError: one line naming the flag, the file and the fix.
    """
    try:
        stat = os.stat(path)
        signature = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        signature = None  # missing or unreadable: said by the check itself
    try:
        return _checked_weight_input(str(path), flag, role, signature)
    except CheckpointError as error:  # the reader's own message, said of the flag that named the file
        message = str(error)
        raise CheckpointError(message if message.startswith(flag) else f"{flag}: {message}") from None


@functools.lru_cache(maxsize=256)
def _checked_weight_input(path: str, flag: str, role: str, signature: tuple[int, int] | None) -> Path:
    """Once per file version (``signature``: modification time and size): a batch whose thousand lines name one
    LoRA reads it once."""
    expected, kinds, fix = ROLES[role]
    p = check_readable(path, flag, fix, folder_ok=role == "base_checkpoint")
    if role == "base_checkpoint":
        from .sd_checkpoint import identify_sd_unet
        from .weight_files import resolve_model_folder, unwrap_state_dict

        if p.is_dir():  # a diffusers folder: its layout now, its weights when they are merged
            resolve_model_folder(p, ("unet",), "a diffusers UNet folder (config.json + diffusion_pytorch_model)")
            return p
        family, description = identify_sd_unet(unwrap_state_dict(header_state_dict(p), ("state_dict",), source=p))
        if family != "sd1":
            raise CheckpointError(explain(f"{flag} is {description}, not {expected}", str(path), fix))
        return p
    if role == "lora":
        from .lora import read_lora

        read_lora(p)  # small files: read and grouped as they will be, so a foreign or partial LoRA fails now
        return p
    found = header_state_dict(p)
    if role == "starting_mapper":  # a training start may be wrapped as the official checkpoints are (``ema``)
        from .weight_files import unwrap_state_dict

        found = unwrap_state_dict(found, (MAPPER_WRAPPER_KEY,), source=p)
    if detect_kind(found) not in kinds:
        raise CheckpointError(explain(f"{flag} holds {describe_checkpoint(found)}, not {expected}", str(path), fix))
    return p
