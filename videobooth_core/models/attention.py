"""Attention for the VideoBooth 3D UNet: one module, three uses.

* ``attn1`` - sparse-causal cross-frame attention: every frame attends to [frame 0 ; previous frame],
  optionally with the image prompt (exemplar) tokens folded into frame 0's values;
* ``attn2`` - text cross-attention;
* ``attn_temp`` - temporal self-attention over the frames at each spatial position (no positional encoding).

Every :class:`Attention` holds the key/value projections it uses (``key_value``): its own ``to_k``/``to_v``
until :meth:`UNet3DModel.attach_projections` resolves, once, the mapper's for ``attn1`` and ``attn2`` (the
released model uses the mapper checkpoint's, see :class:`SiteProjections`). They are held by reference, not
registered, so the UNet's state dict never lists the mapper's weights.

Three numerically equivalent backends: ``"sdpa"`` (the default: ``torch.nn.functional.scaled_dot_product_attention``,
flash kernels on the CPU and GPU), ``"math"`` (explicit score matrix and softmax in the input dtype, the order of
operations of the official diffusers-0.11 code, kept for checking) and ``"dedup"`` (opt-in: SDPA, and in
cross-frame attention frames 0 and 1, which attend to [frame 0 ; frame 0], attend to one copy of frame 0 in one
call: the same softmax for 1/16 fewer attention FLOPs at 16 frames, not bit-identical to ``"sdpa"``; see
:func:`sparse_causal_attention` and ``benchmarks/bench_attention.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import SamplingError
from .subjects import combine_subject_updates

AttentionBackend = Literal["sdpa", "math", "dedup"]
ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "math", "dedup")


def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    backend: AttentionBackend = "sdpa",
) -> torch.Tensor:
    """Scaled dot-product attention with heads split from the channel axis.

    Args:
        query: (batch, query_tokens, channels).
        key: (batch, key_tokens, channels).
        value: (batch, key_tokens, channels).
        num_heads: channels are split as (heads, channels // heads), head-major.
        backend: ``"sdpa"``, ``"math"`` or ``"dedup"`` (SDPA here; it differs only in
            :func:`sparse_causal_attention`).

    Returns:
        (batch, query_tokens, channels), heads merged back, no output projection.
    """
    # (b, h, n, d): four dimensions, the layout the CPU flash kernel requires (three-dimensional inputs
    # fall back to the materialised math kernel, about 4x slower on the CPU at the 32x32 level)
    query, key, value = (rearrange(t, "b n (h d) -> b h n d", h=num_heads) for t in (query, key, value))
    if backend in ("sdpa", "dedup"):
        out = F.scaled_dot_product_attention(query, key, value)
    elif backend == "math":
        scale = query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        # softmax in float32 for half precision; identical for float32 inputs
        out = torch.matmul(scores.float().softmax(dim=-1).to(value.dtype), value)
    else:
        raise SamplingError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    return rearrange(out, "b h n d -> b n (h d)")


@dataclass(frozen=True)
class KeyValueProjections:
    """The key and value projections an attention layer applies to what it attends to."""

    key: nn.Module
    value: nn.Module


class Attention(nn.Module):
    """Projections of one attention layer; names mirror the official checkpoint (``to_q``, ``to_out.0``).

    ``key_value`` holds the key/value projections in use (by reference, not registered: they may be the
    mapper's); ``image_prompt_key_value`` those of the image prompt's tokens (``attn1`` only, set when the
    mapper's projections are attached).
    """

    def __init__(self, query_dim: int, num_heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        context_dim = context_dim or query_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k: nn.Linear | None = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v: nn.Linear | None = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim), nn.Dropout(0.0)])
        self.backend: AttentionBackend = "sdpa"
        self.key_value = KeyValueProjections(self.to_k, self.to_v)
        self.image_prompt_key_value: KeyValueProjections | None = None

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of already projected tensors (see :func:`multi_head_attention`)."""
        return multi_head_attention(query, key, value, self.num_heads, self.backend)

    def self_attention(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Plain self-attention: (b, n, c) → (b, n, c)."""
        key_value = self.key_value
        out = self.attend(self.to_q(hidden_states), key_value.key(hidden_states), key_value.value(hidden_states))
        return self.to_out[0](out)


@dataclass(frozen=True)
class SiteProjections:
    """The mapper's per-site key/value projections, used in place of the UNet's own ``to_k``/``to_v``.

    ``attn1_key``/``attn1_value`` (the mapper's ``_to_k_new``/``_to_v_new``) project video tokens in
    cross-frame attention; ``image_prompt_key``/``image_prompt_value`` (``_to_k_exemplar``/``_to_v_exemplar``)
    project the image prompt's tokens; ``text_key``/``text_value`` (``attn2`` ``_to_k``/``_to_v``) project text.
    """

    attn1_key: nn.Linear
    attn1_value: nn.Linear
    image_prompt_key: nn.Linear
    image_prompt_value: nn.Linear
    text_key: nn.Linear
    text_value: nn.Linear


def cross_frame_attention(
    attn: Attention,
    hidden_states: torch.Tensor,
    num_frames: int,
    image_prompt_states: torch.Tensor | Sequence[torch.Tensor] | None = None,
    image_prompt_strength: float | Sequence[float] = 1.0,
    image_prompt_regions: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Sparse-causal attention: frame f attends to [frame 0 ; frame max(f-1, 0)] (2N keys).

    With an image prompt, frame 0's queries first attend to [image prompt tokens ; frame-0 tokens]; the
    result (heads merged, no output projection) replaces frame 0's *values* (not its keys) wherever
    frame 0 is attended to.

    Args:
        hidden_states: (batch * frames, tokens, channels), ``norm1`` output, frame-minor.
        num_frames: frames per video.
        image_prompt_states: (batch, tokens, channels) image-prompt tokens at this site (frame 0 of the
            exemplar stream, after the same GroupNorm/proj_in/norm1), or None. Projected with
            ``attn.image_prompt_key_value`` (the UNet checks once per call that the mapper's are attached).
        image_prompt_strength: 1 = the official update of frame 0's values; s blends
            ``v0 + s * (updated - v0)`` (0 = no image prompt).
            Several subjects: a sequence of (batch, tokens, channels) states, one strength per subject and
            optionally ``image_prompt_regions``, per subject (1, tokens, 1) token weights or None; each subject's
            update is computed separately and added (:func:`.subjects.combine_subject_updates`).

    Returns:
        (batch * frames, tokens, channels), after ``to_out``.
    """
    query = attn.to_q(hidden_states)
    key = rearrange(attn.key_value.key(hidden_states), "(b f) n c -> b f n c", f=num_frames)
    value = rearrange(attn.key_value.value(hidden_states), "(b f) n c -> b f n c", f=num_frames)

    if image_prompt_states is not None and not isinstance(image_prompt_states, torch.Tensor):  # several subjects
        first_query = rearrange(query, "(b f) n c -> b f n c", f=num_frames)[:, 0]
        updated_first_value = combine_subject_updates(attn, first_query, key[:, 0], value[:, 0], image_prompt_states,
                                                      image_prompt_strength, image_prompt_regions)
        value = torch.cat([updated_first_value[:, None], value[:, 1:]], dim=1)
    elif image_prompt_states is not None:
        first_query = rearrange(query, "(b f) n c -> b f n c", f=num_frames)[:, 0]
        prompt_key = attn.image_prompt_key_value.key(image_prompt_states)
        prompt_value = attn.image_prompt_key_value.value(image_prompt_states)
        updated_first_value = attn.attend(
            first_query,
            torch.cat([prompt_key, key[:, 0]], dim=1),
            torch.cat([prompt_value, value[:, 0]], dim=1),
        )
        if image_prompt_strength != 1.0:
            updated_first_value = value[:, 0] + image_prompt_strength * (updated_first_value - value[:, 0])
        value = torch.cat([updated_first_value[:, None], value[:, 1:]], dim=1)

    return attn.to_out[0](sparse_causal_attention(query, key, value, attn.num_heads, attn.backend))


def sparse_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    backend: AttentionBackend = "sdpa",
) -> torch.Tensor:
    """Frame f's queries attend to [frame 0 ; frame max(f-1, 0)] of the projected keys and values.

    ``"sdpa"`` and ``"math"`` gather the 2N keys of every frame (the official computation, frames 0 and 1
    see frame 0 twice). ``"dedup"`` uses that [k0 ; k0] gives the same softmax as k0 alone (each weight and
    the normaliser double): frames 0 and 1 stack their queries against one copy of frame 0 (one call with
    2N queries), the other frames gather [frame 0 ; previous]; exact up to rounding, not bit-identical.

    Args:
        query: (batch * frames, tokens, channels), frame-minor.
        key: (batch, frames, tokens, channels).
        value: (batch, frames, tokens, channels).
        num_heads: heads split from the channels.
        backend: see :func:`multi_head_attention`.

    Returns:
        (batch * frames, tokens, channels), heads merged, no output projection.
    """
    num_frames = key.shape[1]
    if backend != "dedup":
        key = rearrange(first_and_previous_frames(key), "b f n c -> (b f) n c")
        value = rearrange(first_and_previous_frames(value), "b f n c -> (b f) n c")
        return multi_head_attention(query, key, value, num_heads, backend)

    query = rearrange(query, "(b f) n c -> b f n c", f=num_frames)
    head = min(num_frames, 2)
    out_head = multi_head_attention(
        rearrange(query[:, :head], "b f n c -> b (f n) c"), key[:, 0], value[:, 0], num_heads, backend
    )
    out_head = rearrange(out_head, "b (f n) c -> b f n c", f=head)
    if num_frames == head:
        return rearrange(out_head, "b f n c -> (b f) n c")
    rest = num_frames - head  # frames 2.. attend to [frame 0 ; frame f-1]
    key = torch.cat([key[:, :1].expand(-1, rest, -1, -1), key[:, 1:-1]], dim=2)
    value = torch.cat([value[:, :1].expand(-1, rest, -1, -1), value[:, 1:-1]], dim=2)
    out_rest = multi_head_attention(
        rearrange(query[:, head:], "b f n c -> (b f) n c"),
        rearrange(key, "b f n c -> (b f) n c"),
        rearrange(value, "b f n c -> (b f) n c"),
        num_heads,
        backend,
    )
    out_rest = rearrange(out_rest, "(b f) n c -> b f n c", f=rest)
    return rearrange(torch.cat([out_head, out_rest], dim=1), "b f n c -> (b f) n c")


def first_and_previous_frames(states: torch.Tensor) -> torch.Tensor:
    """(b, f, n, c) → (b, f, 2n, c): frame f's [frame 0 ; frame max(f-1, 0)], written in one pass (gathering
    both halves and concatenating them would copy every frame twice)."""
    batch, frames, tokens, channels = states.shape
    out = states.new_empty(batch, frames, 2 * tokens, channels)
    out[:, :, :tokens] = states[:, :1]
    out[:, 0, tokens:] = states[:, 0]
    out[:, 1:, tokens:] = states[:, :-1]
    return out


def text_cross_attention(
    attn: Attention, hidden_states: torch.Tensor, text_states: torch.Tensor, num_frames: int = 1
) -> torch.Tensor:
    """Cross-attention to text: (b * f, n, c) queries, (b, 77, d) text states → (b * f, n, c).

    Every frame of a video attends to the same text, so the text is projected once per video and the keys and
    values are repeated per frame (bit-identical to projecting a per-frame copy of the text: each row of a
    projection is computed alike; one call with all frames' queries would change the attention kernel's
    blocking, and so its bits)."""
    key = attn.key_value.key(text_states).repeat_interleave(num_frames, 0)
    value = attn.key_value.value(text_states).repeat_interleave(num_frames, 0)
    return attn.to_out[0](attn.attend(attn.to_q(hidden_states), key, value))
