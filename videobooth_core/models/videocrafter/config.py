"""The shape of a VideoCrafter1/2 UNet (LVDM ``openaimodel3d.UNetModel``) and of the I2V image projector, with the
released kinds as presets.

One config describes all four released kinds; they differ only in the switches ``fps_cond``, ``temporal_conv``,
``use_relative_position`` and ``use_image_attention`` (official configs ``configs/inference_*.yaml`` of
AILab-CVC/VideoCrafter at 11bcd76). ``use_scale`` is not here: it is a sampler setting (:mod:`...sampling.videocrafter`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from ...errors import ModelConfigError, explain

GROUPS = 32
"""Every GroupNorm of the official UNet has 32 groups (``lvdm/basics.py`` ``normalization``, attention.py)."""
INIT_ATTN_HEADS = 8
"""``init_attn`` has 8 heads hard-coded (openaimodel3d.py:379-388), whatever the width."""
TEXT_TOKENS = 77
"""The image cross-attention splits the context at a hard-coded 77 text tokens (attention.py:58)."""


@dataclass(frozen=True)
class VideoCrafterUNetConfig:
    """Shape of the UNet (defaults: the released 320-wide model, VideoCrafter1 T2V 512)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = 64
    transformer_depth: int = 1
    temporal_transformer_depth: int = 1
    context_dim: int = 1024
    temporal_length: int = 16
    use_linear: bool = True
    fps_cond: bool = False
    temporal_conv: bool = False
    use_relative_position: bool = True
    use_image_attention: bool = False
    addition_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        # a set of downsampling factors: kept sorted, so the official (4, 2, 1) and one read from shapes compare equal
        object.__setattr__(self, "attention_resolutions", tuple(sorted(int(r) for r in self.attention_resolutions)))
        for width in [self.model_channels * m for m in self.channel_mult]:
            if width % GROUPS:
                raise ModelConfigError(explain(f"a UNet width is not a multiple of the {GROUPS} GroupNorm groups",
                                               width, "use model_channels and channel_mult giving multiples of 32"))
            if width % self.num_head_channels:
                raise ModelConfigError(explain(
                    f"a UNet width is not a multiple of num_head_channels={self.num_head_channels}", width,
                    "use widths that are multiples of the head width"))
        if self.num_res_blocks < 1 or not self.channel_mult:
            raise ModelConfigError(explain("the UNet needs at least one level and one res block per level",
                                           (self.channel_mult, self.num_res_blocks), "use the released values"))
        if self.temporal_length < 1:
            raise ModelConfigError(explain("temporal_length must be positive", self.temporal_length,
                                           "use the released 16"))

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VideoCrafterUNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelConfigError(explain("unknown VideoCrafter UNet config entries", unknown,
                                           f"use only {', '.join(sorted(known))}"))
        return cls(**values)


@dataclass(frozen=True)
class ImageProjectorConfig:
    """The I2V ``image_proj_model`` (a perceiver Resampler); defaults are the sizes hard-coded in
    ``LatentVisualDiffusion.init_projector`` (ddpm3d.py:660-684): 257 OpenCLIP ViT-H/14 tokens of width 1280 in,
    16 tokens of width 1024 out."""

    dim: int = 1024
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280
    output_dim: int = 1024
    ff_mult: int = 4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The released kinds (official configs/inference_*.yaml). Names are the ones ``detect_kind`` returns and the CLI's
# ``make-tiny --family`` takes.
KIND_T2V_512_V1 = "videocrafter1-t2v-512"
KIND_T2V_1024_V1 = "videocrafter1-t2v-1024"
KIND_I2V_512_V1 = "videocrafter1-i2v-512"
KIND_T2V_512_V2 = "videocrafter2"

_BASE = VideoCrafterUNetConfig()
RELEASED_UNETS: dict[str, VideoCrafterUNetConfig] = {
    KIND_T2V_512_V1: _BASE,
    KIND_T2V_1024_V1: replace(_BASE, fps_cond=True),
    KIND_T2V_512_V2: replace(_BASE, fps_cond=True, temporal_conv=True, use_relative_position=False),
    KIND_I2V_512_V1: replace(_BASE, fps_cond=True, temporal_conv=True, use_relative_position=False,
                             use_image_attention=True),
}


@dataclass(frozen=True)
class SamplingDefaults:
    """What a kind's official run uses: the size (``configs/inference_*.yaml`` / ``scripts/run_*.sh``), fps, the
    ``use_scale`` x0 scale (``scale_b``; ``scale_steps`` 1000 without ``fix_scale_bug`` gives 1400 entries of
    which only the first 1000 are ever indexed). What every kind shares (16 frames, DDIM 50 steps, eta 1.0,
    guidance 12, seed 123) is in ``settings.VIDEOCRAFTER_SETTINGS``."""

    height: int
    width: int
    fps: int = 28
    use_scale: bool = False
    scale_b: float = 0.3
    fix_scale_bug: bool = False

    @property
    def x0_scale(self) -> dict[str, object]:
        """The ``use_scale`` keywords every VideoCrafter sampler takes (``VideoCrafterDDIM``,
        ``sample_videocrafter_scheduler``, ``variance_preserving_schedule``)."""
        return dict(use_scale=self.use_scale, scale_b=self.scale_b, fix_scale_bug=self.fix_scale_bug)


RELEASED_SAMPLING: dict[str, SamplingDefaults] = {
    KIND_T2V_512_V1: SamplingDefaults(height=320, width=512),
    KIND_T2V_1024_V1: SamplingDefaults(height=576, width=1024, use_scale=True, scale_b=0.3, fix_scale_bug=True),
    KIND_T2V_512_V2: SamplingDefaults(height=320, width=512, use_scale=True, scale_b=0.7),
    KIND_I2V_512_V1: SamplingDefaults(height=320, width=512, fps=8, use_scale=True, scale_b=0.7),
}
