"""Ranks under ``torchrun``: who runs which jobs (job ``i`` goes to rank ``i % WORLD_SIZE``), on which device,
and the process group the ranks wait for each other with."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from ...errors import JobsError

logger = logging.getLogger(__name__)

DIST_TIMEOUT = timedelta(days=7)
"""Ranks wait for each other at the end; a shard can take hours with real weights (torchrun stops every
rank as soon as one fails, so a long timeout never leaves a rank hanging on a dead one)."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise JobsError(f"environment variable {name}={value!r} is not a whole number") from None


def rank_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when run directly."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise JobsError(f"inconsistent distributed environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def rank_device(device: str, local_rank: int, world: int) -> str:
    """``cuda`` (or ``cuda`` with several ranks) becomes ``cuda:LOCAL_RANK``; other devices stay as given."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise JobsError("--device cuda was given but no CUDA device is available; use --device cpu")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise JobsError(f"local rank {local_rank} has no GPU of its own: this machine has {count}; start at most "
                            f"{count} processes per node (torchrun --nproc_per_node {count})")
        return f"cuda:{local_rank}"
    if world > 1 and device.startswith("cuda:"):
        logger.warning("every rank uses %s; give --device cuda to use one GPU per rank", device)
    return device


@contextlib.contextmanager
def process_group(world: int) -> Iterator[Any]:
    """torch.distributed (gloo: only barriers are needed, on CPU and GPU ranks alike) when WORLD_SIZE > 1."""
    if world <= 1:
        yield None
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise JobsError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise JobsError(f"WORLD_SIZE > 1 but {', '.join(missing)} is not set: launch with torchrun")
    dist.init_process_group(backend="gloo", timeout=DIST_TIMEOUT)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def peak_memory(device: str) -> dict[str, float]:
    from ..common import peak_memory_mb

    peak = {"peak_rss_mb": round(peak_memory_mb(), 1)}
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak

