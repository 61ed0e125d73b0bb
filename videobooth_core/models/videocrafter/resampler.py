"""The I2V image projector (``image_proj_model``): a perceiver Resampler turning the OpenCLIP ViT-H/14 image
tokens (257 x 1280, last layer, no ``ln_post``) into 16 context tokens of the UNet's width, written anew with the
official key names (``latents``, ``proj_in``, ``layers.N.0`` attention, ``layers.N.1`` feed-forward, ``proj_out``,
``norm_out``).

As in the official code (``lvdm/modules/encoders/ip_resampler.py``): the latents attend to ``[image tokens ;
latents]``; queries and keys are each scaled by ``dim_head ** -0.25``; the softmax is computed in float32.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .config import ImageProjectorConfig


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads, self.dim_head = heads, dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, image_tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``image_tokens`` ``(b, n, dim)``, ``latents`` ``(b, queries, dim)`` -> ``(b, queries, dim)``."""
        image_tokens, latents = self.norm1(image_tokens), self.norm2(latents)
        query = self.to_q(latents)
        key, value = self.to_kv(torch.cat([image_tokens, latents], dim=1)).chunk(2, dim=-1)
        query, key, value = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (query, key, value))
        scale = self.dim_head ** -0.25
        weights = (query * scale) @ (key * scale).transpose(-2, -1)
        weights = weights.float().softmax(dim=-1).to(weights.dtype)
        return self.to_out(rearrange(weights @ value, "b h n d -> b n (h d)"))


class ImageProjector(nn.Module):
    """``(b, n, embedding_dim)`` image-encoder tokens -> ``(b, num_queries, output_dim)`` context tokens."""

    def __init__(self, config: ImageProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.randn(1, config.num_queries, config.dim) / config.dim ** 0.5)
        self.proj_in = nn.Linear(config.embedding_dim, config.dim)
        self.proj_out = nn.Linear(config.dim, config.output_dim)
        self.norm_out = nn.LayerNorm(config.output_dim)
        inner = config.dim * config.ff_mult
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(config.dim, config.dim_head, config.heads),
                nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, inner, bias=False), nn.GELU(),
                              nn.Linear(inner, config.dim, bias=False)),
            ])
            for _ in range(config.depth))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(image_tokens.shape[0], 1, 1)
        image_tokens = self.proj_in(image_tokens.to(self.latents.dtype))
        for attention, feed_forward in self.layers:
            latents = attention(image_tokens, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))
