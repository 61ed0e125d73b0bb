"""The VideoBooth 3D UNet (SD-1.4 inflated to video, plus temporal attention and a watermark branch).

Module names mirror the official checkpoint (``ema_unet`` of ``watermark_remove_module.pt``), so all of its
keys load strictly. The image prompt enters as per-site features captured from a plain pass of this UNet on
the noised exemplar (see :meth:`UNet3DModel.forward` and ``docs``: this equals the official exemplar stream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ATTENTION_BACKENDS, Attention, AttentionBackend, SiteProjections
from .config import UNetConfig
from .blocks import (
    GroupNorm32,
    ImagePromptFeatures,
    InflatedConv3d,
    ResnetBlock3D,
    SiteContext,
    TimestepEmbedding,
    Transformer3DModel,
    UNetBlock,
    timestep_embedding,
)


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, temb: int, groups: int, eps: float, heads: int, cross_dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(channels, channels, temb, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [Transformer3DModel("mid_block.attentions.0", channels, heads, cross_dim, groups)]
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text_states: torch.Tensor, ctx: SiteContext) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, text_states, ctx)
        return self.resnets[1](x, temb)


def _up_block_inputs(widths: list[int], layers: int, index: int, prev_out: int) -> tuple[list[int], int]:
    """Resnet input widths of up block ``index`` (hidden + skip), following the SD UNet's skip bookkeeping."""
    reversed_widths = list(reversed(widths))
    out = reversed_widths[index]
    skip_in = reversed_widths[min(index + 1, len(widths) - 1)]
    ins = []
    for j in range(layers + 1):
        hidden = prev_out if j == 0 else out
        skip = skip_in if j == layers else out
        ins.append(hidden + skip)
    return ins, out


class UNet3DModel(nn.Module):
    """``UNet3DConditionModelWaterMark`` of the official code, inputs and outputs ``(b, c, f, h, w)``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        widths = list(c.block_out_channels)
        temb = c.time_embed_dim
        groups, eps, heads, cross = c.norm_num_groups, c.norm_eps, c.num_attention_heads, c.cross_attention_dim
        levels = len(widths)

        self.conv_in = InflatedConv3d(c.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], temb)

        self.down_blocks = nn.ModuleList()
        prev = widths[0]
        for i, width in enumerate(widths):
            last = i == levels - 1
            ins = [prev] + [width] * (c.layers_per_block - 1)
            self.down_blocks.append(
                UNetBlock(f"down_blocks.{i}", ins, width, temb, groups, eps, None if last else heads, cross,
                          None if last else "down")
            )
            prev = width

        self.mid_block = MidBlock3D(widths[-1], temb, groups, eps, heads, cross)

        self.up_blocks = nn.ModuleList()
        prev_out = widths[-1]
        for i in range(levels):
            ins, out = _up_block_inputs(widths, c.layers_per_block, i, prev_out)
            first, last = i == 0, i == levels - 1
            self.up_blocks.append(
                UNetBlock(f"up_blocks.{i}", ins, out, temb, groups, eps, None if first else heads, cross,
                          None if last else "up")
            )
            prev_out = out

        wm = list(c.watermark_block_out_channels)
        self.watermark_down_blocks = nn.ModuleList()
        prev = widths[0]
        for i, width in enumerate(wm):
            ins = [prev] + [width] * (c.layers_per_block - 1)
            self.watermark_down_blocks.append(
                UNetBlock(f"watermark_down_blocks.{i}", ins, width, temb, groups, eps, None, cross,
                          None if i == len(wm) - 1 else "down")
            )
            prev = width
        self.watermark_up_blocks = nn.ModuleList()
        prev_out = wm[-1]
        for i in range(len(wm)):
            ins, out = _up_block_inputs(wm, c.layers_per_block, i, prev_out)
            self.watermark_up_blocks.append(
                UNetBlock(f"watermark_up_blocks.{i}", ins, out, temb, groups, eps, None, cross,
                          None if i == len(wm) - 1 else "up")
            )
            prev_out = out
        self.watermark_zero_out = InflatedConv3d(wm[0], wm[0], 1)

        self.conv_norm_out = GroupNorm32(groups, widths[0], eps=eps)
        self.conv_out = InflatedConv3d(widths[0], c.out_channels, 3, padding=1)

    # ----------------------------------------------------------------------------------------------
    @property
    def attention_sites(self) -> list[Transformer3DModel]:
        """The attention sites in forward order (down, mid, up)."""
        return [m for m in self.modules() if isinstance(m, Transformer3DModel)]

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        """Select ``"sdpa"`` (default, fused kernels) or ``"math"`` (explicit scores) for every attention."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    def attach_projections(
        self, projections: dict[str, SiteProjections] | None, release_own: bool = False
    ) -> None:
        """Use the mapper's per-site K/V projections (keyed by site prefix); ``None`` restores the UNet's own.

        ``release_own=True`` also frees the UNet's own ``attn1``/``attn2`` ``to_k``/``to_v`` weights, which the
        released model never uses once the mapper's are attached (about 176 MB in fp32 at the released size).
        """
        if projections is None and self.released_own_projections:
            raise ValueError(
                "this UNet's own attn1/attn2 key/value weights were released when the mapper's projections were "
                "attached; load the UNet again to run it without the mapper"
            )
        for site in self.attention_sites:
            block = site.transformer_blocks[0]
            block.projections = None if projections is None else projections[site.site]
            if release_own and projections is not None:
                for attn in (block.attn1, block.attn2):
                    attn.to_k = attn.to_v = None
        if release_own and projections is not None:
            self.released_own_projections = True

    released_own_projections: bool = False
    """True once :meth:`attach_projections` freed the UNet's own (unused) attn1/attn2 key/value weights."""

    # ----------------------------------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        text_states: torch.Tensor,
        image_prompt_features: ImagePromptFeatures | None = None,
        capture_image_prompt_features: bool = False,
        head_batch: int | None = None,
        watermark_branch: bool = True,
        image_prompt_strength: float = 1.0,
    ) -> tuple[torch.Tensor | None, ImagePromptFeatures | None]:
        """Predict the noise of a video latent.

        Args:
            sample: (b, 4, f, h, w) noisy latent; h and w need not be multiples of 8.
            timestep: int or (b,) integer timesteps on the 0..999 training scale.
            text_states: (b, 77, d) CLIP text states.
            image_prompt_features: per-site image-prompt tokens (b, n, c) to inject into frame 0's
                cross-frame attention (from a capture pass on the noised exemplar), or None.
            capture_image_prompt_features: also return every site's ``attn1`` input, frame 0 (b, n, c).
            head_batch: run the watermark branch and output head on the first ``head_batch`` batch
                elements only (0: skip them, for a pure capture pass). None: all.
            watermark_branch: False skips the watermark-removal branch (an opt-in speed mode that changes
                the output; the released model always runs it).
            image_prompt_strength: scales the image prompt's update of frame 0's values (1 = official).

        Returns:
            (noise prediction (head_batch or b, 4, f, h, w) or None, captured features or None).
        """
        batch, _, frames, height, width = sample.shape
        ctx = SiteContext(image_prompt_features, capture_image_prompt_features, image_prompt_strength)

        # 1. time embedding (per batch element, so differently noised inputs can share a batch)
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps
        temb_features = timestep_embedding(
            timesteps, self.config.block_out_channels[0], self.config.flip_sin_to_cos, self.config.freq_shift
        )
        temb = self.time_embedding(temb_features.to(sample.dtype))

        # 2. down path; skips start with conv_in's output
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block.down(x, temb, text_states, ctx)
            skips.extend(block_skips)

        # 3. middle
        x = self.mid_block(x, temb, text_states, ctx)

        # 4. up path; explicit upsample sizes only when the latent is not a multiple of 2**downsamples
        force_size = any(s % (2 ** self.config.num_downsamples) for s in (height, width))
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[2:]) if force_size and i < len(self.up_blocks) - 1 else None
            x = block.up(x, block_skips, temb, text_states, ctx, size)

        if head_batch is not None:
            x, temb = x[:head_batch], temb[:head_batch]
        if x.shape[0] == 0:
            return None, ctx.captured

        # 5. watermark-removal branch on the up path's output
        branch_input = x
        if not watermark_branch:
            return self.conv_out(F.silu(self.conv_norm_out(x))), ctx.captured
        wm_skips = [x]
        for block in self.watermark_down_blocks:
            x, block_skips = block.down(x, temb, None, ctx)
            wm_skips.extend(block_skips)
        for i, block in enumerate(self.watermark_up_blocks):
            n = len(block.resnets)
            block_skips, wm_skips = wm_skips[-n:], wm_skips[:-n]
            size = tuple(wm_skips[-1].shape[2:]) if i < len(self.watermark_up_blocks) - 1 else None
            x = block.up(x, block_skips, temb, None, ctx, size)

        # 6. output head
        x = branch_input + self.watermark_zero_out(x)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return x, ctx.captured
