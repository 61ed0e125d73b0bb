"""Building blocks of the VideoBooth 3D UNet: inflated convolutions, resnets, transformers, up/down blocks.

Layout inside the UNet is always ``(batch, channels, frames, height, width)``. Module names mirror the
official checkpoint (``resnets.0.norm1``, ``attentions.1.transformer_blocks.0.attn_temp``...), so its
state dict loads without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import Attention, cross_frame_attention, text_cross_attention
from .subjects import region_token_weights

ImagePromptFeatures = dict[str, torch.Tensor]
"""Per attention site (module path prefix): image-prompt tokens (batch, tokens, channels) at that site."""


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in at least float32 whatever the weights' dtype (fp16/bf16 safe;
    float64, the trainer's checking precision, stays float64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):
            return super().forward(x)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        if x.device.type == "cpu":
            # the CPU kernel takes half-precision input with float32 weights and computes in float32 itself:
            # the same statistics without two full-size casts (about 15x faster at the 32x32 level in bf16;
            # differs from the cast path only in the summation order, 1 bf16 ulp in ~2 of 10^6 outputs)
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class InflatedConv3d(nn.Conv2d):
    """A 2-D convolution applied to every frame: (b, c, f, h, w) → (b, c', f, h', w')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        x = super().forward(rearrange(x, "b c f h w -> (b f) c h w"))
        return rearrange(x, "(b f) c h w -> b c f h w", f=frames)


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal timestep features: (b,) integer timesteps on the 0..999 scale → (b, dim) float32."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - freq_shift)
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock3D(nn.Module):
    """Resnet whose GroupNorms see all frames of a video at once (5-D statistics), as the official model."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_channels, eps=eps)
        self.conv1 = InflatedConv3d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm32(groups, out_channels, eps=eps)
        self.conv2 = InflatedConv3d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = InflatedConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (b, c_in, f, h, w); temb: (b, temb_channels) → (b, c_out, f, h, w)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample3D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = InflatedConv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = InflatedConv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, ...] | None = None) -> torch.Tensor:
        """Nearest 2x spatial upsampling (or to an explicit (f, h, w)), then a 3x3 conv per frame."""
        dtype = x.dtype
        if dtype == torch.bfloat16 and x.device.type not in ("cpu", "cuda"):  # no bf16 nearest kernel on some
            x = x.float()  # backends; on the CPU and CUDA the bf16 kernel copies the same values
        if output_size is None:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x.to(dtype))


class GEGLU(nn.Module):
    """The gated GELU input of the feed-forward (key ``proj``), as LDM writes it; the VideoCrafter UNet's too."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # index 1 is a (weightless) dropout in the checkpoint layout: net.0.proj, net.2
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Cross-frame attention → text attention → GEGLU feed-forward → temporal attention, each pre-norm."""

    def __init__(self, dim: int, num_heads: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.attn1 = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, context_dim=cross_attention_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.attn_temp = Attention(dim, num_heads)
        self.norm_temp = nn.LayerNorm(dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        text_states: torch.Tensor,
        num_frames: int,
        image_prompt_states: torch.Tensor | None = None,
        captured: list[torch.Tensor] | None = None,
        image_prompt_strength: float | Sequence[float] = 1.0,
        image_prompt_regions: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """hidden_states: (b*f, n, c); text_states: (b, 77, d); image_prompt_states: (b, n, c) or None.

        When ``captured`` is a list, frame 0 of this block's ``attn1`` input (b, n, c) is appended to it:
        that is exactly what the image prompt contributes when this UNet runs on the noised exemplar.
        """
        normed = self.norm1(hidden_states)
        if captured is not None:
            captured.append(rearrange(normed, "(b f) n c -> b f n c", f=num_frames)[:, 0])
        hidden_states = hidden_states + cross_frame_attention(
            self.attn1, normed, num_frames, image_prompt_states, image_prompt_strength, image_prompt_regions
        )
        hidden_states = hidden_states + text_cross_attention(self.attn2, self.norm2(hidden_states), text_states,
                                                             num_frames)
        hidden_states = hidden_states + self._chunked_feed_forward(self.norm3(hidden_states))

        tokens = hidden_states.shape[1]
        temporal = rearrange(hidden_states, "(b f) n c -> (b n) f c", f=num_frames)
        temporal = temporal + self.attn_temp.self_attention(self.norm_temp(temporal))
        return rearrange(temporal, "(b n) f c -> (b f) n c", n=tokens)


    FEED_FORWARD_CHUNK_ROWS = 8
    """Frames (rows of the (b*f) axis) per feed-forward chunk: the GEGLU's 8C-wide intermediate is the largest
    activation of a step; per-row math is unchanged, only its peak memory shrinks."""

    def _chunked_feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.FEED_FORWARD_CHUNK_ROWS:
            return self.ff(x)
        return torch.cat([self.ff(part) for part in x.split(self.FEED_FORWARD_CHUNK_ROWS, dim=0)], dim=0)


class Transformer3DModel(nn.Module):
    """One attention site: per-frame GroupNorm → 1x1 proj_in → transformer block → 1x1 proj_out, residual."""

    def __init__(self, site: str, channels: int, num_heads: int, cross_attention_dim: int, groups: int) -> None:
        super().__init__()
        self.site = site
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, num_heads, cross_attention_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, text_states: torch.Tensor, ctx: "SiteContext") -> torch.Tensor:
        """x: (b, c, f, h, w); text_states: (b, 77, d) → (b, c, f, h, w)."""
        frames, height, width = x.shape[2:]
        frames_first = rearrange(x, "b c f h w -> (b f) c h w")
        h = self.proj_in(self.norm(frames_first))
        h = rearrange(h, "bf c h w -> bf (h w) c")
        image_prompt = ctx.image_prompt_features[self.site] if ctx.image_prompt_features is not None else None
        regions = None
        if ctx.subject_features is not None:  # several subjects: per-subject tokens, regions on this site's grid
            image_prompt = [features[self.site] for features in ctx.subject_features]
            regions = [region_token_weights(region, height, width, x.device, x.dtype) for region in ctx.subject_regions]
        captured: list[torch.Tensor] | None = [] if ctx.captured is not None else None
        for block in self.transformer_blocks:
            h = block(h, text_states, frames, image_prompt_states=image_prompt, captured=captured,
                      image_prompt_strength=ctx.image_prompt_strength, image_prompt_regions=regions)
        if captured:
            ctx.captured[self.site] = captured[0]
        h = rearrange(h, "bf (h w) c -> bf c h w", h=height, w=width)
        out = self.proj_out(h) + frames_first
        return rearrange(out, "(b f) c h w -> b c f h w", f=frames)


class SiteContext:
    """Per-call state shared by every attention site: the image-prompt features to inject (with their strength),
    or, for a capture pass, the dict each site's captured ``attn1`` input (frame 0) goes into."""

    def __init__(
        self, *, image_prompt_features: ImagePromptFeatures | None = None, image_prompt_strength: float = 1.0,
        capture: bool = False,
    ) -> None:
        self.image_prompt_features = image_prompt_features
        self.image_prompt_strength = image_prompt_strength
        self.subject_features: list[ImagePromptFeatures] | None = None
        """Several subjects (set by :meth:`UNet3DModel.forward`): per subject its features; then
        ``image_prompt_strength`` holds one strength per subject and ``subject_regions`` one region (or None) each."""
        self.subject_regions: list[Any] = []
        self.captured: ImagePromptFeatures | None = {} if capture else None


class UNetBlock(nn.Module):
    """A down or up block: resnets, optional attention sites, optional resampler.

    Down blocks return every intermediate state for the skip connections; up blocks consume one skip
    per resnet (concatenated after the hidden state along channels).
    """

    def __init__(
        self,
        prefix: str,
        in_channels: list[int],
        out_channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
        num_heads: int | None,
        cross_attention_dim: int,
        resampler: str | None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock3D(c, out_channels, temb_channels, groups, eps) for c in in_channels]
        )
        if num_heads is not None:
            self.attentions = nn.ModuleList(
                [
                    Transformer3DModel(f"{prefix}.attentions.{i}", out_channels, num_heads, cross_attention_dim, groups)
                    for i in range(len(in_channels))
                ]
            )
        else:
            self.attentions = None
        if resampler == "down":
            self.downsamplers = nn.ModuleList([Downsample3D(out_channels)])
        elif resampler == "up":
            self.upsamplers = nn.ModuleList([Upsample3D(out_channels)])

    def down(
        self, x: torch.Tensor, temb: torch.Tensor, text_states: torch.Tensor | None, ctx: SiteContext
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, text_states, ctx)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips

    def up(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        text_states: torch.Tensor | None,
        ctx: SiteContext,
        upsample_size: tuple[int, ...] | None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, text_states, ctx)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, upsample_size)
        return x
