"""The VideoCrafter1/2 video UNet (LVDM ``openaimodel3d.UNetModel``), written anew with the official module names so
that a released checkpoint's ``model.diffusion_model.*`` tensors load under their own keys (including the
official typo ``temopral_conv``).

Layout: the public input and output are ``(b, c, f, h, w)``; inside, like the official code, frames are folded into
the batch ``(b f) c h w`` and the temporal layers unfold them. What the official code does and this one reproduces:

* time embedding ``[cos, sin]`` of the timestep (``lvdm/models/utils_diffusion.py:23``), ``time_embed_dim = 4 *
  model_channels``; with ``fps_cond`` an fps embedding (its own MLP) is added; an int fps, or none, is the
  official default 16;
* ``init_attn``: an extra temporal transformer after ``input_blocks[0]`` only, 8 heads hard-coded, 1x1 Conv1d
  projections;
* ResBlock norms compute in float32 (``GroupNormSpecific``, eps 1e-5); the optional temporal convolution
  (``temopral_conv``, four GroupNorm-SiLU-Conv3d (3,1,1) stages plus identity) runs after the residual sum;
* attention only at the downsampling factors in ``attention_resolutions``; the middle block always has both
  transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import SpatialTransformer, TemporalTransformer
from .config import GROUPS, INIT_ATTN_HEADS, VideoCrafterUNetConfig

DEFAULT_FPS = 16
"""``UNetModel.forward``'s default ``fps`` (openaimodel3d.py:532), used by fps-conditioned kinds when none is given."""


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` (this order) of ``timesteps`` ``(n,)`` -> ``(n, dim)`` float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class Float32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (the official ``GroupNormSpecific`` of ResBlocks and ``out``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class TemporalConvBlock(nn.Module):
    """Four (GroupNorm, SiLU, [Dropout], Conv3d over 3 frames) stages plus the identity, on ``(b, c, f, h, w)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()

        def stage(with_dropout: bool) -> nn.Sequential:
            layers: list[nn.Module] = [nn.GroupNorm(GROUPS, channels), nn.SiLU()]
            if with_dropout:
                layers.append(nn.Dropout(0.0))
            return nn.Sequential(*layers, nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1 = stage(False)
        self.conv2 = stage(True)
        self.conv3 = stage(True)
        self.conv4 = stage(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv4(self.conv3(self.conv2(self.conv1(x)))) + x


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, + the time embedding, GroupNorm-SiLU-Conv, + skip; then the optional temporal conv."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, temporal_conv: bool) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(Float32GroupNorm(GROUPS, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(Float32GroupNorm(GROUPS, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        if temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_channels)  # sic: the released key name

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``x`` ``(b f, c, h, w)``; ``emb`` ``(b f, emb_channels)``."""
        hidden = self.in_layers(x)
        hidden = hidden + self.emb_layers(emb).to(hidden.dtype)[..., None, None]
        hidden = self.skip_connection(x) + self.out_layers(hidden)
        if hasattr(self, "temopral_conv"):
            hidden = rearrange(hidden, "(b f) c h w -> b c f h w", f=num_frames)
            hidden = rearrange(self.temopral_conv(hidden), "b c f h w -> (b f) c h w")
        return hidden


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.ModuleList):
    """One numbered entry of ``input_blocks`` / ``middle_block`` / ``output_blocks``: its layers in order, each
    given what it needs (the official ``TimestepEmbedSequential``)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, num_frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                x = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)
                x = rearrange(layer(x), "b c f h w -> (b f) c h w")
            else:
                x = layer(x)
        return x


class VideoCrafterUNet(nn.Module):
    """The LVDM 3D UNet of VideoCrafter1 (T2V 512/1024, I2V 512) and VideoCrafter2, one config for all."""

    def __init__(self, config: VideoCrafterUNetConfig) -> None:
        super().__init__()
        self.config = config
        mc, emb_dim = config.model_channels, config.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.fps_cond:
            self.fps_embedding = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, config.temporal_conv)

        def attention(ch: int) -> list[nn.Module]:
            heads = ch // config.num_head_channels
            return [
                SpatialTransformer(ch, heads, config.num_head_channels, config.transformer_depth, config.context_dim,
                                   use_linear=config.use_linear, image_cross_attention=config.use_image_attention),
                TemporalTransformer(ch, heads, config.num_head_channels, config.temporal_transformer_depth,
                                    use_linear=config.use_linear, relative_position=config.use_relative_position,
                                    temporal_length=config.temporal_length),
            ]

        self.input_blocks = nn.ModuleList([Stage([nn.Conv2d(config.in_channels, mc, 3, padding=1)])])
        if config.addition_attention:
            self.init_attn = Stage([TemporalTransformer(
                mc, INIT_ATTN_HEADS, config.num_head_channels, config.transformer_depth, use_linear=False,
                relative_position=config.use_relative_position, temporal_length=config.temporal_length)])
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers += attention(ch)
                self.input_blocks.append(Stage(layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(Stage([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = Stage([res(ch, ch), *attention(ch), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers += attention(ch)
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Stage(layers))
        self.out = nn.Sequential(Float32GroupNorm(GROUPS, ch), nn.SiLU(),
                                 nn.Conv2d(mc, config.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def embed_time(self, timesteps: torch.Tensor, fps: torch.Tensor | int | None) -> torch.Tensor:
        """The time (+ fps) embedding ``(b, 4 * model_channels)`` in the weights' dtype."""
        mc = self.config.model_channels
        emb = self.time_embed(timestep_embedding(timesteps, mc).to(self.dtype))
        if self.config.fps_cond:
            if fps is None or isinstance(fps, int):
                fps = torch.full_like(timesteps, DEFAULT_FPS if fps is None else fps)
            emb = emb + self.fps_embedding(timestep_embedding(fps.to(timesteps.device), mc).to(self.dtype))
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                fps: torch.Tensor | int | None = None) -> torch.Tensor:
        """Predict the noise.

        Args:
            x: noisy latent ``(b, c, f, h, w)``, h and w multiples of 2 ** (levels - 1).
            timesteps: ``(b,)`` integer timesteps in [0, 1000).
            context: ``(b, tokens, context_dim)``: 77 text tokens, then (I2V) the image tokens.
            fps: ``(b,)`` or an int, used only by fps-conditioned kinds (``None``: the official default 16);
                ignored by VideoCrafter1 T2V 512, as in the official code.

        Returns:
            ``(b, out_channels, f, h, w)`` in ``x``'s dtype.
        """
        # 1. time (+ fps) embedding, and context and embedding repeated for every frame
        batch, _, num_frames, _, _ = x.shape
        emb = self.embed_time(timesteps, fps).repeat_interleave(num_frames, dim=0)
        context = context.to(self.dtype).repeat_interleave(num_frames, dim=0)
        hidden = rearrange(x, "b c f h w -> (b f) c h w").to(self.dtype)
        # 2. down path (init_attn right after the input convolution), keeping every output for the skips
        skips = []
        for index, stage in enumerate(self.input_blocks):
            hidden = stage(hidden, emb, context, num_frames)
            if index == 0 and self.config.addition_attention:
                hidden = self.init_attn(hidden, emb, context, num_frames)
            skips.append(hidden)
        # 3. middle, then the up path on [hidden ; skip]
        hidden = self.middle_block(hidden, emb, context, num_frames)
        for stage in self.output_blocks:
            hidden = stage(torch.cat([hidden, skips.pop()], dim=1), emb, context, num_frames)
        # 4. output projection, frames unfolded again
        out = self.out(hidden)
        return rearrange(out, "(b f) c h w -> b c f h w", b=batch).to(x.dtype)
