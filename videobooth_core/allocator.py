"""How this process allocates memory, in one place: glibc's heap thresholds (:func:`apply_allocator`, chosen per
run by the command line; never by the ComfyUI nodes, whose process is the host's) and handing freed heap memory
back to the OS (:func:`return_freed_memory`, after each block of a weight-streamed UNet). On systems without
glibc both do nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def _glibc_function(name: str) -> Callable[..., Any] | None:
    """``name`` from glibc (``mallopt``, ``malloc_trim``), or None off Linux or with another C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc_function("malloc_trim")


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS: glibc keeps freed blocks under 32 MB in its heap, where the
    next block's weights, of other sizes, fragment it and the process would slowly grow."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


ALLOCATORS: tuple[str, ...] = ("fast", "glibc", "lean")
"""How a process of ours allocates memory (:func:`apply_allocator`): ``fast`` keeps freed memory in glibc's heap for
reuse (the fewest page faults, the highest peak), ``glibc`` leaves glibc's adaptive default, ``lean`` maps large
blocks and returns them one by one (the lowest peak, the slowest steps). Measured: README, Speed and memory."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
LEAN_MMAP_THRESHOLD_BYTES = 256 * 1024
"""``lean``: allocations from this size up are mapped and unmapped directly."""
FAST_MMAP_THRESHOLD_BYTES = 1 << 30
"""``fast``: only allocations from this size up are mapped directly; the rest come from the heap, which keeps what
is freed (trim threshold at its maximum)."""


def chosen_allocator(choice: str | None, stream_weights: bool) -> str:
    """The allocator a generation run uses: ``choice`` when given, else lean with weight streaming (whose point is
    memory) and fast otherwise (measured: README, Speed and memory)."""
    return choice or ("lean" if stream_weights else "fast")


def apply_allocator(name: str) -> bool:
    """Set glibc's allocation thresholds for this process (see :data:`ALLOCATORS`).

    glibc's default raises its mmap threshold (up to 32 MB) as large blocks are freed and trims the heap top
    beyond twice that: activations larger than 32 MB (many at the 32x32 level: 42 MB per fp32 activation of 32
    frames) are mapped fresh and page-faulted in at every use. ``fast`` serves everything below 1 GiB from the
    heap and never trims it, so a step reuses memory it has touched before: measured 0.86x the time of an fp32
    step (7-10 s less system time per step) for about 0.75 GB more peak from the heap's fragmentation. ``lean``
    maps every block from 256 KiB up and returns it when freed: no fragmentation (about 0.4 GB below
    ``glibc``), every large activation page-faulted in. Process-wide, so never called by the ComfyUI nodes (the
    host owns its process). Returns True when the setting is in force (``glibc`` always; Linux with glibc for the
    others), False where it cannot be applied.
    """
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; choose one of {ALLOCATORS}")
    if name == "glibc":
        return True
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    if name == "lean":
        return bool(mallopt(_M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD_BYTES))
    # glibc before 2.35 caps the threshold at 32 MB (HEAP_MAX_SIZE / 2): take the largest it accepts
    threshold_set = bool(mallopt(_M_MMAP_THRESHOLD, FAST_MMAP_THRESHOLD_BYTES)) or bool(
        mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    return threshold_set and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
