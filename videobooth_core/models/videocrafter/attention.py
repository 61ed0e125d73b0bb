"""Attention of the VideoCrafter UNet: the spatial and temporal transformers of LVDM (``lvdm/modules/attention.py``
of AILab-CVC/VideoCrafter), written anew with the official parameter names so the released keys load unchanged.

What the official code does and this one reproduces:

* ``CrossAttention``: scale ``d_head ** -0.5``; optional **relative positions** (temporal attention of VC1 only):
  one table for keys and one for values, ``(2 L + 1, d_head)``, shared by the heads, indexed by ``k - q`` clamped
  to ``+-L``: ``scores += q . E_k[q, k] * scale`` before the softmax, ``out += softmax . E_v[q, k]`` after it;
  optional **image cross-attention** (I2V): the context is split at 77 text tokens, the image tokens get their own
  ``to_k_ip`` / ``to_v_ip`` and their own softmax, and the two results are added (weight 1.0) before ``to_out``.
* ``TemporalTransformer`` with ``only_self_att``: both ``attn1`` and ``attn2`` are self-attention over the frames
  (``attn2`` is built without a context and called without one).
* Norm eps: GroupNorm 1e-6 in both transformers, LayerNorm the default 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..blocks import GEGLU
from .config import GROUPS, TEXT_TOKENS


class RelativePosition(nn.Module):
    """A learnt table of ``2 * max_distance + 1`` vectors, one per clamped distance ``k - q``."""

    def __init__(self, num_units: int, max_distance: int) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.embeddings_table = nn.Parameter(torch.empty(2 * max_distance + 1, num_units))
        nn.init.xavier_uniform_(self.embeddings_table)

    def forward(self, length_q: int, length_k: int) -> torch.Tensor:
        """``(length_q, length_k, num_units)``: entry ``[i, j]`` is the vector of distance ``clamp(j - i)``."""
        device = self.embeddings_table.device
        distance = torch.arange(length_k, device=device)[None, :] - torch.arange(length_q, device=device)[:, None]
        index = distance.clamp(-self.max_distance, self.max_distance) + self.max_distance
        return self.embeddings_table[index]


class CrossAttention(nn.Module):
    """Multi-head attention with the official projections ``to_q``/``to_k``/``to_v``/``to_out.0`` (+ the I2V
    ``to_k_ip``/``to_v_ip`` and the relative-position tables, when enabled)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, *,
                 relative_position: bool = False, temporal_length: int | None = None,
                 image_cross_attention: bool = False) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.image_cross_attention = image_cross_attention
        if image_cross_attention:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        self.relative_position = relative_position
        if relative_position:
            if temporal_length is None:
                raise ValueError("relative positions need the temporal_length")
            self.relative_position_k = RelativePosition(dim_head, temporal_length)
            self.relative_position_v = RelativePosition(dim_head, temporal_length)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(batch, tokens, query_dim)``; ``context`` ``(batch, context_tokens, context_dim)`` or ``None``
        (self-attention). With image cross-attention the context is ``[77 text tokens ; image tokens]``."""
        context = x if context is None else context
        image_tokens = None
        if self.image_cross_attention and context is not x:
            context, image_tokens = context[:, :TEXT_TOKENS], context[:, TEXT_TOKENS:]
        query = self._heads(self.to_q(x))
        key, value = self._heads(self.to_k(context)), self._heads(self.to_v(context))
        if self.relative_position:
            out = self._relative_attention(query, key, value)
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        if image_tokens is not None:
            key_ip, value_ip = self._heads(self.to_k_ip(image_tokens)), self._heads(self.to_v_ip(image_tokens))
            out = out + F.scaled_dot_product_attention(query, key_ip, value_ip)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def _relative_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Explicit scores so the relative-position terms can enter before and after the softmax (the temporal
        attention works on a handful of frames, so the score matrix is small)."""
        length_q, length_k = query.shape[2], key.shape[2]
        table_k = self.relative_position_k(length_q, length_k).to(query.dtype)
        table_v = self.relative_position_v(length_q, length_k).to(query.dtype)
        scores = torch.einsum("bhid,bhjd->bhij", query, key) * self.scale
        scores = scores + torch.einsum("bhid,ijd->bhij", query, table_k) * self.scale
        weights = scores.softmax(dim=-1)
        return torch.einsum("bhij,bhjd->bhid", weights, value) + torch.einsum("bhij,ijd->bhid", weights, table_v)


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4x inner width (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """``attn1`` (self) -> ``attn2`` (cross with ``context``, or self when ``context`` is None) -> GEGLU FF, each
    pre-LayerNorm and residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, *,
                 relative_position: bool = False, temporal_length: int | None = None,
                 image_cross_attention: bool = False) -> None:
        super().__init__()
        positions = {"relative_position": relative_position, "temporal_length": temporal_length}
        self.attn1 = CrossAttention(dim, None, heads, dim_head, **positions)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, **positions,
                                    image_cross_attention=image_cross_attention)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Attention within each frame: ``(b f) c h w`` -> tokens ``h w`` -> blocks with the text (and image) context."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, *,
                 use_linear: bool, image_cross_attention: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, image_cross_attention=image_cross_attention)
            for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x`` ``(b f, c, h, w)``; ``context`` ``(b f, tokens, context_dim)``."""
        height, width = x.shape[-2:]
        hidden = self.norm(x)
        if not self.use_linear:
            hidden = self.proj_in(hidden)
        hidden = rearrange(hidden, "n c h w -> n (h w) c")
        if self.use_linear:
            hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        if self.use_linear:
            hidden = self.proj_out(hidden)
        hidden = rearrange(hidden, "n (h w) c -> n c h w", h=height, w=width)
        if not self.use_linear:
            hidden = self.proj_out(hidden)
        return hidden + x


class TemporalTransformer(nn.Module):
    """Self-attention across the frames at each spatial position: ``b c f h w`` -> sequences ``(b h w) f``.

    ``use_linear=False`` (only ``init_attn``, which the official code builds without ``use_linear``) projects with
    1x1 ``Conv1d`` (weights ``[out, in, 1]``)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, *, use_linear: bool,
                 relative_position: bool, temporal_length: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv1d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, None, relative_position=relative_position,
                                  temporal_length=temporal_length)
            for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv1d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(b, c, f, h, w)`` -> same shape."""
        _, _, _, height, width = x.shape
        hidden = rearrange(self.norm(x), "b c f h w -> (b h w) c f")
        if not self.use_linear:
            hidden = self.proj_in(hidden)
        hidden = rearrange(hidden, "n c f -> n f c")
        if self.use_linear:
            hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden)
        if self.use_linear:
            hidden = self.proj_out(hidden)
        else:
            hidden = self.proj_out(rearrange(hidden, "n f c -> n c f")).transpose(1, 2)
        return rearrange(hidden, "(b h w) f c -> b c f h w", h=height, w=width) + x
