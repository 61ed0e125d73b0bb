"""The VideoBooth 3D UNet (SD-1.4 inflated to video, plus temporal attention and a watermark branch).

Module names mirror the official checkpoint (``ema_unet`` of ``watermark_remove_module.pt``), so all of its
keys load strictly.

The interface, explicitly:

* :meth:`UNet3DModel.attach_projections` - once, after loading: use the mapper's key/value projections (and
  check that the mapper belongs to this UNet);
* :meth:`UNet3DModel.capture_image_prompt_features` - a pass on the noised exemplar that returns every
  attention site's ``attn1`` input of frame 0 (this equals the official exemplar stream, see ``docs``);
* :meth:`UNet3DModel.forward` - the noise prediction, optionally with those features injected;
* :meth:`UNet3DModel.predict_and_capture` - both of the last two in one batched call (the default sampling path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ModelMismatchError, SamplingError, explain
from .attention import ATTENTION_BACKENDS, Attention, AttentionBackend, KeyValueProjections, SiteProjections
from .config import UNetConfig
from .subjects import Region
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


class ControlResiduals:
    """A ControlNet's residuals in the UNet's layout: one per skip connection (``skips[i]`` (b, c, f, h, w) or None,
    in the down path's order: conv_in's output, then every resnet/attention and downsampler output, which is SD 1.x's
    ``input_blocks`` order) and one for the middle block's output (or None).

    SD 1.x's UNet (ComfyUI's ``openaimodel.apply_control``) adds ``output`` residuals to the skips as the up path
    pops them and the ``middle`` one after the middle block; adding them all right after the middle block is the
    same sum, since no skip is read before."""

    def __init__(self, skips: Sequence[torch.Tensor | None], middle: torch.Tensor | None) -> None:
        self.skips, self.middle = list(skips), middle

    def select(self, index: torch.Tensor) -> ControlResiduals:
        """The residuals of the videos ``index`` (batch axis)."""
        return ControlResiduals([None if r is None else r[index] for r in self.skips],
                                None if self.middle is None else self.middle[index])

    def padded(self, rows: int) -> ControlResiduals:
        """These residuals followed by zeros for ``rows`` more batch elements (inputs that share the call without a
        ControlNet, e.g. the exemplar pass: ``x + 0`` is ``x``, so their results are unchanged)."""
        def pad(residual: torch.Tensor | None) -> torch.Tensor | None:
            if residual is None:
                return None
            return torch.cat([residual, residual.new_zeros((rows, *residual.shape[1:]))])
        return ControlResiduals([pad(r) for r in self.skips], pad(self.middle))

    def apply(self, middle: torch.Tensor, skips: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the middle block's output, the skips) with the residuals added."""
        residuals = self.skips or [None] * len(skips)  # a control with the middle residual alone
        if len(residuals) != len(skips):
            raise SamplingError(explain(
                f"the VideoBooth UNet has {len(skips)} skip connections; the ControlNet gives residuals for",
                len(self.skips), "use an SD 1.x ControlNet (the UNet's widths and block layout)"))
        for number, (skip, residual) in enumerate(zip([*skips, middle], [*residuals, self.middle])):
            if residual is not None and residual.shape != skip.shape:
                where = "the middle block" if number == len(skips) else f"skip connection {number}"
                raise SamplingError(explain(f"the ControlNet's residual for {where} has shape {tuple(residual.shape)}, "
                                            "the UNet's state there", tuple(skip.shape),
                                            "use an SD 1.x ControlNet (the UNet's widths and block layout)"))
        added = [skip if residual is None else skip + residual.to(skip.dtype)
                 for skip, residual in zip(skips, residuals)]
        return (middle if self.middle is None else middle + self.middle.to(middle.dtype)), added


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
        """Select ``"sdpa"`` (default, fused kernels), ``"dedup"`` (opt-in: SDPA with frames 0 and 1 attending to one
        copy of frame 0, not bit-identical) or ``"math"`` (explicit scores, the official order) for every attention;
        the command line's ``--attention``."""
        if backend not in ATTENTION_BACKENDS:
            raise SamplingError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    @property
    def attention_backend(self) -> str:
        """The backend every attention uses (``"mixed"`` if they differ)."""
        backends = {m.backend for m in self.modules() if isinstance(m, Attention)}
        return backends.pop() if len(backends) == 1 else "mixed"

    attached_projections: dict[str, SiteProjections] | None = None
    """The mapper's per-site projections in use (see :meth:`attach_projections`), or None: the UNet's own."""

    released_own_projections: bool = False
    """True once :meth:`attach_projections` freed the UNet's own (unused) attn1/attn2 key/value weights."""

    def attach_projections(
        self,
        projections: dict[str, SiteProjections] | None,
        release_own: bool = False,
        *,
        unet_name: str = "the UNet",
        mapper_name: str = "the mapper",
    ) -> None:
        """Use the mapper's per-site K/V projections (``Mapper.site_projections()``); ``None`` restores the UNet's own.

        Resolved once here: afterwards every ``attn1`` attends with the mapper's ``to_k_new``/``to_v_new`` (and
        projects the image prompt with ``to_k_exemplar``/``to_v_exemplar``), every ``attn2`` with its text
        ``to_k``/``to_v``. ``release_own=True`` also frees the UNet's own ``attn1``/``attn2`` ``to_k``/``to_v``
        weights, which the released model never uses (about 176 MB in fp32 at the released size).

        ``unet_name`` / ``mapper_name`` (e.g. the files they were loaded from) only label the error.

        Raises:
            ModelMismatchError: the mapper does not belong to this UNet (other attention sites, other widths or
                another precision); nothing is changed then.
            CheckpointError: ``None`` after the UNet's own weights were released.
        """
        if projections is None:
            if self.released_own_projections:
                raise CheckpointError(explain(
                    f"{unet_name}'s own attn1/attn2 key/value weights were released when the mapper's projections "
                    "were attached, so it cannot go back to them", "attach_projections(None)",
                    "load the UNet again to run it without the mapper"))
            for site in self.attention_sites:
                block = site.transformer_blocks[0]
                for attn in (block.attn1, block.attn2):
                    attn.key_value = KeyValueProjections(attn.to_k, attn.to_v)
                block.attn1.image_prompt_key_value = None
            self.attached_projections = None
            return

        self._check_projections(projections, unet_name, mapper_name)
        for site in self.attention_sites:
            block, p = site.transformer_blocks[0], projections[site.site]
            block.attn1.key_value = KeyValueProjections(p.attn1_key, p.attn1_value)
            block.attn1.image_prompt_key_value = KeyValueProjections(p.image_prompt_key, p.image_prompt_value)
            block.attn2.key_value = KeyValueProjections(p.text_key, p.text_value)
            if release_own:
                for attn in (block.attn1, block.attn2):
                    attn.to_k = attn.to_v = None
        self.attached_projections = dict(projections)
        if release_own:
            self.released_own_projections = True

    def _check_projections(self, projections: dict[str, SiteProjections], unet_name: str, mapper_name: str) -> None:
        """Raise :class:`ModelMismatchError` unless ``projections`` cover exactly this UNet's sites with the
        widths (and dtype) each site needs."""
        what = f"{mapper_name} does not belong to {unet_name}"
        fix = ("load the UNet and the mapper of one release (watermark_remove_module.pt with mapper.pt, or the "
               "safetensors files one `convert` or `make-tiny` wrote together), in one precision")
        sites = [site.site for site in self.attention_sites]
        missing = [site for site in sites if site not in projections]
        extra = [site for site in projections if site not in set(sites)]
        if missing or extra:
            counts = f"{unet_name} has {len(sites)} attention sites, {mapper_name} projections for {len(projections)}"
            first = "first missing site" if missing else "first unknown site"
            raise ModelMismatchError(explain(f"{what}: {counts}; {first}", (missing or extra)[0], fix))
        dtype = next(self.parameters()).dtype
        text_width = self.config.cross_attention_dim
        for site in self.attention_sites:
            channels = site.proj_in.out_channels
            p = projections[site.site]
            for name in SiteProjections.__dataclass_fields__:
                weight = getattr(p, name).weight
                needed = (channels, text_width if name.startswith("text_") else channels)
                if tuple(weight.shape) != needed:
                    raise ModelMismatchError(explain(
                        f"{what}: at {site.site} the UNet needs {name} weights of shape {needed}, {mapper_name}'s are",
                        tuple(weight.shape), fix))
                if weight.dtype != dtype:
                    raise ModelMismatchError(explain(
                        f"{what}: {unet_name} is {dtype}, {mapper_name}'s projections are", weight.dtype, fix))

    # ----------------------------------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        text_states: torch.Tensor,
        image_prompt_features: ImagePromptFeatures | Sequence[ImagePromptFeatures] | None = None,
        image_prompt_strength: float | Sequence[float] = 1.0,
        watermark_branch: bool = True,
        image_prompt_regions: Sequence[Region | None] | None = None,
        control: ControlResiduals | None = None,
    ) -> torch.Tensor:
        """Predict the noise of a video latent.

        Args:
            sample: (b, 4, f, h, w) noisy latent; h and w need not be multiples of 8.
            timestep: int or (b,) integer timesteps on the 0..999 training scale.
            text_states: (b, 77, d) CLIP text states.
            image_prompt_features: per-site image-prompt tokens (b, n, c), from
                :meth:`capture_image_prompt_features` on the noised exemplar, injected into frame 0's
                cross-frame attention; or None (no image prompt).
            image_prompt_strength: scales the image prompt's update of frame 0's values (1 = official).
            Several subjects: ``image_prompt_features`` a list (one capture per subject), ``image_prompt_strength``
                one strength per subject (0 = skipped) and ``image_prompt_regions`` one (x1, y1, x2, y2) box in frame
                fractions, or None, per subject (see :mod:`.subjects`).
            watermark_branch: False skips the watermark-removal branch (an opt-in speed mode that changes
                the output; the released model always runs it).
            control: a ControlNet's residuals, added where SD 1.x's UNet adds them (:class:`ControlResiduals`);
                None: none (the default path, unchanged).

        Returns:
            (b, 4, f, h, w) noise prediction, in the weights' dtype.
        """
        if image_prompt_features is not None and not isinstance(image_prompt_features, dict):  # several subjects
            ctx = self._subjects_context(image_prompt_features, image_prompt_strength, image_prompt_regions)
        else:
            self._check_image_prompt_features(image_prompt_features)
            ctx = SiteContext(image_prompt_features=image_prompt_features, image_prompt_strength=image_prompt_strength)
        hidden, temb = self._down_mid_up(sample, self._timesteps(timestep, sample), text_states, ctx, control)
        return self._output_head(hidden, temb, watermark_branch)

    def capture_image_prompt_features(
        self, exemplar: torch.Tensor, timestep: torch.Tensor | int, text_states: torch.Tensor
    ) -> ImagePromptFeatures:
        """Every attention site's ``attn1`` input, frame 0, from a plain pass on the noised image prompt.

        Args:
            exemplar: (b, 4, f, h, w) the clean image-prompt latent repeated over f frames and noised to ``timestep``
                (independent noise per frame, as the official exemplar stream).
            timestep: int or (b,) timesteps of ``exemplar``.
            text_states: (b, 77, d) text states (the null prompt's, as the official stream).

        Returns:
            site prefix → (b, tokens, channels) features, for ``forward(image_prompt_features=...)``.
        """
        ctx = SiteContext(capture=True)
        self._down_mid_up(exemplar, self._timesteps(timestep, exemplar), text_states, ctx)
        return ctx.captured

    def predict_and_capture(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        text_states: torch.Tensor,
        exemplar: torch.Tensor,
        exemplar_timestep: torch.Tensor | int,
        exemplar_text_states: torch.Tensor,
        watermark_branch: bool = True,
        control: ControlResiduals | None = None,
    ) -> tuple[torch.Tensor, ImagePromptFeatures]:
        """``forward(sample, timestep, text_states)`` and ``capture_image_prompt_features(exemplar, ...)`` in one
        batched call (same math; batching changes only kernel choice). The output head runs on ``sample`` only.

        Args:
            sample: (b, 4, f, h, w); exemplar: (b2, 4, f, h, w), same frames and size.
            control: a ControlNet's residuals for ``sample`` (the exemplar takes none), or None.

        Returns:
            ((b, 4, f, h, w) prediction for ``sample``, site → (b2, tokens, channels) features of ``exemplar``).
        """
        batch = sample.shape[0]
        timesteps = torch.cat([self._timesteps(timestep, sample), self._timesteps(exemplar_timestep, exemplar)])
        ctx = SiteContext(capture=True)
        hidden, temb = self._down_mid_up(
            torch.cat([sample, exemplar]), timesteps, torch.cat([text_states, exemplar_text_states]), ctx,
            None if control is None else control.padded(exemplar.shape[0]),
        )
        prediction = self._output_head(hidden[:batch], temb[:batch], watermark_branch)
        return prediction, {site: features[batch:] for site, features in ctx.captured.items()}

    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def _timesteps(timestep: torch.Tensor | int, sample: torch.Tensor) -> torch.Tensor:
        """(b,) timesteps for ``sample``'s batch: one per element, so differently noised inputs can share a batch."""
        timesteps = torch.as_tensor(timestep, device=sample.device)
        return timesteps.reshape(-1).expand(sample.shape[0]) if timesteps.numel() == 1 else timesteps

    def _subjects_context(self, features: Sequence[ImagePromptFeatures], strengths: float | Sequence[float],
                          regions: Sequence[Region | None] | None) -> SiteContext:
        """The site context of several subjects, each one's features checked and counted against its settings."""
        features = list(features)
        strengths = [float(strengths)] * len(features) if isinstance(strengths, (int, float)) else list(strengths)
        regions = [None] * len(features) if regions is None else list(regions)
        if not len(features) == len(strengths) == len(regions):
            raise SamplingError(explain(
                "several subjects need one strength and one region (or None) per subject's features; got "
                "(features, strengths, regions)", (len(features), len(strengths), len(regions)),
                "give image_prompt_strength and image_prompt_regions as lists as long as image_prompt_features"))
        for one in features:
            self._check_image_prompt_features(one)
        ctx = SiteContext(image_prompt_strength=strengths)
        ctx.subject_features, ctx.subject_regions = features, regions
        return ctx

    def _check_image_prompt_features(self, features: ImagePromptFeatures | None) -> None:
        if features is None:
            return
        if self.attached_projections is None:
            raise SamplingError(explain(
                "image-prompt features need the mapper's image-prompt projections; this UNet's attached projections",
                None, "call unet.attach_projections(mapper.site_projections()) once after loading"))
        sites = self.attached_projections  # checked at attach time to be exactly this UNet's sites
        if features.keys() != sites.keys():
            differing = sorted(features.keys() ^ sites.keys())[0]
            raise SamplingError(explain(
                f"image-prompt features for {len(features)} sites given to a UNet with {len(sites)}; first differing "
                "site", differing, "capture them with this UNet's capture_image_prompt_features"))

    def _down_mid_up(
        self, sample: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor, ctx: SiteContext,
        control: ControlResiduals | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stages 1-4: (b, 4, f, h, w) → (the up path's output (b, c0, f, h, w), time embedding (b, temb))."""
        height, width = sample.shape[3:]

        # 1. time embedding (per batch element, so differently noised inputs can share a batch)
        temb_features = timestep_embedding(
            timesteps, self.config.block_out_channels[0], self.config.flip_sin_to_cos, self.config.freq_shift
        )
        temb = self.time_embedding(temb_features.to(sample.dtype))

        # 2. down path; skips start with conv_in's output
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = self._run(block.down, x, temb, text_states, ctx)
            skips.extend(block_skips)

        # 3. middle
        x = self._run(self.mid_block, x, temb, text_states, ctx)
        if control is not None:  # before the up path reads a skip: as SD 1.x adds them when it pops each one
            x, skips = control.apply(x, skips)

        # 4. up path; explicit upsample sizes only when the latent is not a multiple of 2**downsamples
        force_size = any(s % (2 ** self.config.num_downsamples) for s in (height, width))
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[2:]) if force_size and i < len(self.up_blocks) - 1 else None
            x = self._run(block.up, x, block_skips, temb, text_states, ctx, size)
        return x, temb

    gradient_checkpointing: bool = False
    """Training only: recompute each down/mid/up block in the backward pass instead of keeping its activations."""

    def _run(self, block, *args):
        """``block(*args)``, through ``torch.utils.checkpoint`` when gradient checkpointing is on and a gradient is
        being recorded (the recomputation repeats the block's capture of image-prompt features: same values)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            def fresh_lists(*inputs):  # an up block consumes its skip list; the recomputation needs it whole again
                return block(*(list(value) if isinstance(value, list) else value for value in inputs))

            return checkpoint(fresh_lists, *args, use_reentrant=False)
        return block(*args)

    def _output_head(self, x: torch.Tensor, temb: torch.Tensor, watermark_branch: bool) -> torch.Tensor:
        """Stages 5-6: the watermark-removal branch and the output convolution, (b, c0, f, h, w) → (b, 4, f, h, w)."""
        if not watermark_branch:
            return self.conv_out(F.silu(self.conv_norm_out(x)))

        # 5. watermark-removal branch on the up path's output (no attention sites: no text, no image prompt)
        branch_input = x
        ctx = SiteContext()
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
        return self.conv_out(F.silu(self.conv_norm_out(x)))
