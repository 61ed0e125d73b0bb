"""The constants every road shares: the released model's trained size and frames, the VAE's scale, seeds, the long
videos' default windows, the per-run defaults (precision, attention kernel, device) and the limits of inputs that
are not generation settings (a LoRA's strength, ``--best-of``). A test checks that each is defined here once and
nowhere else in the core or the nodes."""

from __future__ import annotations

from ..loading.checkpoint import DTYPES
from ..models.attention import ATTENTION_BACKENDS

MAX_SEED = 2**64 - 1
"""Seeds are 64-bit: torch.Generator.manual_seed takes [0, 2**64)."""
TRAINED_FRAMES = 16
TRAINED_SIZE = 256
"""The released model was trained on 16 frames of 256 x 256; anything else is an extrapolation."""
VAE_SCALE = 8
"""Pixels per latent cell of the SD 1.x VAE."""
CONTEXT_WINDOW = TRAINED_FRAMES
"""Long videos: frames per UNet call by default (the trained length)."""
CONTEXT_OVERLAP = 4
FUSE_MODES: tuple[str, ...] = ("pyramid", "flat")
"""How overlapping windows' predictions are weighted; the first is the default."""

# -- per-run settings (the command line's and the loader nodes'; not part of a generation's request) -------------
PRECISIONS: tuple[str, ...] = tuple(DTYPES)
"""Weight precisions (``--dtype``, the loader nodes' precision); the first, fp32, is a generation's default (the
official numerics)."""
DEFAULT_PRECISION = PRECISIONS[0]
CONVERT_PRECISION = "fp16"
"""Precision of the weights ``convert`` writes (half the size; loading casts them to the run's precision)."""
DEFAULT_ATTENTION = ATTENTION_BACKENDS[0]
"""The attention kernel of a run (``--attention``): sdpa, the tested default."""
DEFAULT_DEVICE = "cpu"

# -- inputs that are not generation settings -------------------------------------------------------------------
LORA_STRENGTH_RANGE = (-10.0, 10.0)
"""A LoRA's strength (the nodes' widget range): past it the merged weights are noise (1e30 gives a black video)."""
MAX_BEST_OF = 100
"""``--best-of`` at most: every candidate is a whole generation (and its frames are held until ranked)."""
