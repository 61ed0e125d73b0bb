"""One guided denoising step on the model side: the UNet passes, classifier-free guidance, the step record.

A guided step, as the official pipeline computes it (the loops in :mod:`.ddpm` and :mod:`.schedulers` supply
the noised latent and the noised image prompt, see :mod:`.noise`):
1. the UNet runs on the noised image prompt with the null text and its per-site ``attn1`` inputs are captured
   (frame 0) - batched with the unconditional pass, which needs no image prompt;
2. the conditional pass runs with the subject prompt and the captured features injected;
3. guidance: channels 0-2 ``uncond + s * (cond - uncond)``, channel 3 the raw conditional prediction
   (the official rule), or all four channels guided (``guidance="all"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import SamplingError
from ..models.unet_3d import UNet3DModel

GuidanceRule = Literal["official", "all"]
GUIDANCE_RULES: tuple[str, ...] = ("official", "all")


def guide(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float, rule: GuidanceRule = "official") -> torch.Tensor:
    """Classifier-free guidance on (b, 4, f, h, w) predictions.

    ``"official"``: channels 0-2 guided, channel 3 the conditional prediction (the official code's rule,
    inherited from DiT's learned-sigma split); ``"all"``: every channel guided.
    """
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if rule == "official":
        return torch.cat([guided[:, :3], eps_cond[:, 3:]], dim=1)
    if rule == "all":
        return guided
    raise SamplingError(f"unknown guidance rule {rule!r}; choose one of {GUIDANCE_RULES}")


@dataclass
class StepOutput:
    """Everything one guided step computed (latents float32, (b, 4, f, h, w))."""

    x_prev: torch.Tensor
    pred_x0: torch.Tensor
    eps: torch.Tensor
    eps_cond: torch.Tensor
    eps_uncond: torch.Tensor | None
    exemplar_t: torch.Tensor | None


StepCallback = Callable[[int, int, StepOutput], None]
"""Called after every step with (step number from 0, total steps, the step's output)."""


class VideoDenoiser:
    """Runs the UNet for one guided step (steps 1-3 of the module docstring)."""

    def __init__(
        self,
        unet: UNet3DModel,
        cond_text: torch.Tensor,
        null_text: torch.Tensor,
        cfg_scale: float = 4.0,
        guidance: GuidanceRule = "official",
        batch_passes: bool = True,
        single_frame_image_prompt: bool = False,
        watermark_branch: bool = True,
        image_prompt_strength: float = 1.0,
        subject_strengths: tuple[float, ...] | None = None,
        subject_regions: tuple[tuple[float, float, float, float] | None, ...] | None = None,
    ) -> None:
        """Args:
            cond_text / null_text: (1, 77, d) text states.
            batch_passes: batch the unconditional and image-prompt passes into one UNet call (same math;
                False follows the official call order).
            single_frame_image_prompt: opt-in speed mode: run the image-prompt stream on one frame instead
                of all (an approximation: the official stream mixes its independently noised frames).
            watermark_branch: False skips the watermark-removal branch (opt-in speed mode, changes output).
            image_prompt_strength: scales the image prompt's injection (1 = official).
            subject_strengths: several subjects (None: one image prompt, the official path): one strength per
                subject; the exemplar given to :meth:`predict` then holds the subjects' streams stacked subject-major
                on the batch axis (s * b elements), all captured in one batched pass.
            subject_regions: per subject an (x1, y1, x2, y2) box in frame fractions limiting where its features
                act, or None (everywhere); None for no regions.
        """
        if guidance not in GUIDANCE_RULES:
            raise SamplingError(f"unknown guidance rule {guidance!r}; choose one of {GUIDANCE_RULES}")
        self.unet = unet
        self.cond_text = cond_text
        self.null_text = null_text
        self.cfg_scale = float(cfg_scale)
        self.guidance = guidance
        self.batch_passes = batch_passes
        self.single_frame_image_prompt = single_frame_image_prompt
        self.watermark_branch = watermark_branch
        self.image_prompt_strength = float(image_prompt_strength)
        self.subject_strengths = None if subject_strengths is None else tuple(float(s) for s in subject_strengths)
        self.subject_regions = subject_regions

    @property
    def image_prompt_streams(self) -> int:
        """Image-prompt streams per video (one per subject; 1 for the single image prompt)."""
        return 1 if self.subject_strengths is None else len(self.subject_strengths)

    def predict(
        self, x_t: torch.Tensor, timestep: int, exemplar_t: torch.Tensor | None, exemplar_timestep: int | None = None,
        image_prompt_features: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return (guided eps, eps_cond, eps_uncond) for x_t (b, 4, f, h, w) at an original timestep.

        ``exemplar_t`` is the noised exemplar (b, 4, f, h, w) or None (text only);
        ``exemplar_timestep`` defaults to ``timestep``. ``image_prompt_features``: this step's features from
        :meth:`capture`, shared by several calls (the windows of a long video); the exemplar is then not rerun.
        """
        unet = self.unet
        dtype = next(unet.parameters()).dtype
        batch = x_t.shape[0]
        x_in = x_t.to(dtype)
        null = self.null_text.to(dtype).expand(batch, -1, -1)
        cond = self.cond_text.to(dtype).expand(batch, -1, -1)
        t = torch.full((batch,), timestep, dtype=torch.long, device=x_t.device)
        need_uncond = self.cfg_scale != 1.0 or self.guidance == "official"
        features = image_prompt_features
        eps_uncond = None
        if features is not None:
            exemplar_t = None
        if exemplar_t is not None and self.single_frame_image_prompt:
            exemplar_t = exemplar_t[:, :, :1]
        if self.subject_strengths is not None and (exemplar_t is not None or features is not None):  # subjects
            return self._predict_subjects(x_in, t, cond, null, exemplar_t, exemplar_timestep, timestep, need_uncond,
                                          features)
        if exemplar_t is not None:
            te = torch.full((batch,), exemplar_timestep if exemplar_timestep is not None else timestep,
                            dtype=torch.long, device=x_t.device)
            # a stream of another frame count (single-frame mode) cannot share a batch with the video
            if self.batch_passes and need_uncond and exemplar_t.shape[2] == x_t.shape[2]:
                eps_uncond, features = unet.predict_and_capture(
                    x_in, t, null, exemplar_t.to(dtype), te, null, watermark_branch=self.watermark_branch
                )
            else:
                features = unet.capture_image_prompt_features(exemplar_t.to(dtype), te, null)
        eps_cond = unet(x_in, t, cond, image_prompt_features=features,
                        image_prompt_strength=self.image_prompt_strength, watermark_branch=self.watermark_branch)
        return self._guided(x_in, t, null, eps_cond, eps_uncond, need_uncond)

    def _guided(self, x_in: torch.Tensor, t: torch.Tensor, null: torch.Tensor, eps_cond: torch.Tensor,
                eps_uncond: torch.Tensor | None,
                need_uncond: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The unconditional pass if it is needed and was not batched with the capture, then the guidance, in fp32."""
        if need_uncond and eps_uncond is None:
            eps_uncond = self.unet(x_in, t, null, watermark_branch=self.watermark_branch)
        eps_cond = eps_cond.float()
        if eps_uncond is None:
            return eps_cond, eps_cond, None
        eps_uncond = eps_uncond.float()
        return guide(eps_cond, eps_uncond, self.cfg_scale, self.guidance), eps_cond, eps_uncond

    def capture(self, exemplar_t: torch.Tensor, timestep: int, exemplar_timestep: int | None = None,
                batch: int = 1) -> Any:
        """Step 1 alone: the image-prompt features of the noised exemplar (b, 4, f, h, w), for ``predict``'s
        ``image_prompt_features`` (captured once per step and shared by the windows of a long video)."""
        dtype = next(self.unet.parameters()).dtype
        if self.single_frame_image_prompt:
            exemplar_t = exemplar_t[:, :, :1]
        null = self.null_text.to(dtype).expand(batch, -1, -1)
        te = torch.full((batch,), exemplar_timestep if exemplar_timestep is not None else timestep,
                        dtype=torch.long, device=exemplar_t.device)
        return self.unet.capture_image_prompt_features(exemplar_t.to(dtype), te, null)

    def _predict_subjects(self, x_in: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, null: torch.Tensor,
                          exemplar_t: torch.Tensor | None, exemplar_timestep: int | None, timestep: int,
                          need_uncond: bool,
                          features: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`predict` with several subjects: ``exemplar_t`` (s * b, 4, f', h, w) subject-major (or ready
        ``features`` with s * b rows per site); the subjects' streams are captured together (batched with the
        unconditional pass when it can share it), and each subject's features are injected with its strength and
        region (:mod:`..models.subjects`)."""
        unet, batch, streams = self.unet, x_in.shape[0], self.image_prompt_streams
        eps_uncond = None
        if features is None:
            rows = exemplar_t.shape[0]
            if rows != streams * batch:
                raise SamplingError(f"{streams} subjects need {streams} image-prompt streams per video "
                                    f"({streams * batch} in all), got {rows}; stack one noised exemplar per subject")
            exemplar_t = exemplar_t.to(x_in.dtype)
            te = torch.full((rows,), exemplar_timestep if exemplar_timestep is not None else timestep,
                            dtype=torch.long, device=x_in.device)
            null_streams = null[:1].expand(rows, -1, -1)
            if self.batch_passes and need_uncond and exemplar_t.shape[2] == x_in.shape[2]:
                eps_uncond, features = unet.predict_and_capture(x_in, t, null, exemplar_t, te, null_streams,
                                                                watermark_branch=self.watermark_branch)
            else:
                features = unet.capture_image_prompt_features(exemplar_t, te, null_streams)
        per_subject = [{site: f[i * batch:(i + 1) * batch] for site, f in features.items()} for i in range(streams)]
        eps_cond = unet(x_in, t, cond, image_prompt_features=per_subject, image_prompt_strength=self.subject_strengths,
                        image_prompt_regions=self.subject_regions, watermark_branch=self.watermark_branch)
        return self._guided(x_in, t, null, eps_cond, eps_uncond, need_uncond)
