"""What each stage trains, how it is initialised, and the training loss - on the inference model code.

The loss of one clip (reference §7.1-7.3):

1. the coarse embedding: ``injected = mapper(CLIP vision features of the augmented image prompt)``, spliced over
   the subject word by :func:`conditioning.text.encode_text` (the inference splice), giving the text states;
   stage 2 replaces them, with the condition dropout, by the "None" prompt's states;
2. stage 2, the fine embedding: the image prompt's VAE latent (or, dropped, a mid-grey image's), repeated over
   the frames, noised at the video's timestep with fresh per-frame noise, through
   ``UNet3DModel.capture_image_prompt_features`` with the "None" text;
3. ``eps_hat = UNet3DModel.forward(x_t, t, text states, image_prompt_features)`` - the conditional prediction
   of the sampler's denoiser;
4. ``MSE(eps_hat, eps) + reg_weight * mean|injected|``.

Everything random in a clip's loss (timestep, dropout, posterior samples, noise) comes from a generator seeded
by (seed, sample number): a clip's loss does not depend on the rank or the batch it lands in, so data-parallel
runs equal single-process ones and resumed runs equal uninterrupted ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..conditioning.clip import clip_vision_features
from ..conditioning.text import NULL_PROMPT, encode_text, prepare_subject_prompt, tokenize
from ..conditioning.vae import vae_encode
from ..errors import PromptError, explain
from ..models.config import mapper_stem_from_site_prefix
from ..models.mapper import Mapper
from ..models.unet_3d import UNet3DModel
from ..pipeline import fit_exemplar
from ..sampling.schedule import RespacedDDPM, q_sample
from .config import TrainConfig, TrainingError

STAGE1_PROJECTIONS = ("attn2_to_k", "attn2_to_v")


def trainable_names(mapper: Mapper, stage: int) -> list[str]:
    """The mapper parameters a stage trains: stage 1 the MLPs (``mapping_*``, ``mapping_patch_*``) and the attn2
    global K/V (§7.2); stage 2 every mapper parameter (§7.3). Everything else is frozen."""
    names = []
    for name, _ in mapper.named_parameters():
        if stage == 2 or name.startswith("mapping_") or name.removesuffix(".weight").endswith(STAGE1_PROJECTIONS):
            names.append(name)
    return names


@torch.no_grad()
def init_projections(unet: UNet3DModel, mapper: Mapper, stage: int) -> None:
    """The official initialisation from the UNet's own projections (fresh copies).

    Stage 1: the attn2 ``to_k``/``to_v`` (the global K/V it trains) and, frozen, the attn1 ones (so attn1 attends
    exactly as the plain UNet, as the official stage 1 without an image-prompt branch). Stage 2: the attn1
    ``_new``/``_exemplar`` K/V, from attn1 ``to_k``/``to_v``; attn2 keeps the stage-1 mapper's.
    """
    for site in unet.attention_sites:
        block = site.transformer_blocks[0]
        if block.attn1.to_k is None:
            raise TrainingError(explain("the UNet's own attn1/attn2 projections were released; site", site.site,
                                        "load the UNet with load_unet (not load_unet_and_mapper) for training"))
        stem = mapper_stem_from_site_prefix(site.site) + "_transformer_blocks_0_"
        copies = {"attn1_to_k_new": block.attn1.to_k, "attn1_to_v_new": block.attn1.to_v,
                  "attn1_to_k_exemplar": block.attn1.to_k, "attn1_to_v_exemplar": block.attn1.to_v}
        if stage == 1:
            copies.update({"attn2_to_k": block.attn2.to_k, "attn2_to_v": block.attn2.to_v})
        for suffix, source in copies.items():
            getattr(mapper, stem + suffix).weight.copy_(source.weight)


@dataclass
class TrainBatch:
    """A prepared micro-batch (frozen encoders already run; nothing here needs a gradient)."""

    clip_features: list[torch.Tensor]
    """5 x (b, 1 + patches, vision width): CLIP features of the augmented image prompts."""
    input_ids: torch.Tensor
    """(b, 77) token ids of the captions with the subject word replaced by the placeholder."""
    placeholder_ids: tuple[int, ...]
    keep_text: torch.Tensor
    """(b,) bool: False where the condition is dropped (the "None" prompt's states are used)."""
    null_states: torch.Tensor
    """(b, 77, text width) the "None" prompt's states."""
    noisy: torch.Tensor
    """(b, 4, f, h, w) the noised video latent."""
    timesteps: torch.Tensor
    """(b,) int64 timesteps on the 0..999 scale."""
    noise: torch.Tensor
    """(b, 4, f, h, w) the noise to predict."""
    exemplar: torch.Tensor | None
    """(b, 4, f, h, w) the noised image-prompt latent (stage 2), else None."""


class TrainingModule(nn.Module):
    """The mapper (registered: the only parameters data parallelism sees) and the frozen models it feeds.

    ``forward`` is the loss of the module docstring; it only composes inference code.
    """

    def __init__(self, mapper: Mapper, unet: UNet3DModel, text_encoder: Any, reg_weight: float) -> None:
        super().__init__()
        self.mapper = mapper
        # held outside the module tree: frozen, never wrapped, broadcast or saved with the trained parameters
        self._frozen = (unet, text_encoder)
        self.reg_weight = float(reg_weight)

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, MSE part (detached), mean|injected| (detached)) of the micro-batch, scalars."""
        unet, text_encoder = self._frozen
        dtype = next(unet.parameters()).dtype
        mapper_param = next(self.mapper.parameters())
        injected = self.mapper([f.to(mapper_param.device, mapper_param.dtype) for f in batch.clip_features])
        states = encode_text(text_encoder, batch.input_ids, injected, batch.placeholder_ids).last_hidden_state
        states = torch.where(batch.keep_text[:, None, None], states, batch.null_states.to(states.dtype))
        features = None
        if batch.exemplar is not None:
            features = unet.capture_image_prompt_features(batch.exemplar.to(dtype), batch.timesteps,
                                                          batch.null_states.to(dtype))
        prediction = unet(batch.noisy.to(dtype), batch.timesteps, states.to(dtype), image_prompt_features=features)
        mse = F.mse_loss(prediction.float(), batch.noise.float())
        reg = injected.float().abs().mean()
        return mse + self.reg_weight * reg, mse.detach(), reg.detach()


def sample_seed(seed: int, sample_number: int, purpose: int) -> int:
    """A 63-bit seed for (base seed, global sample number, purpose), independent across all three."""
    return int(np.random.SeedSequence([seed, sample_number, purpose]).generate_state(2, dtype=np.uint64)[0] >> 1)


NOISE_PURPOSE, DATA_PURPOSE, ORDER_PURPOSE = 1, 2, 3


class BatchMaker:
    """Runs the frozen encoders and draws the noise for a list of dataset samples (see :class:`TrainBatch`)."""

    def __init__(self, config: TrainConfig, vae: Any, vision_encoder: Any, text_encoder: Any, tokenizer: Any,
                 device: torch.device) -> None:
        self.config, self.vae, self.vision, self.tokenizer, self.device = config, vae, vision_encoder, tokenizer, device
        self.schedule = RespacedDDPM(config.timestep_grid)
        with torch.no_grad():
            self.null_states = encode_text(text_encoder, tokenize(tokenizer, NULL_PROMPT)).last_hidden_state.float()

    def subject_ids(self, caption: str, word: str, ident: str) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Token ids of ``caption`` with ``word`` replaced by the placeholder (the inference splice)."""
        try:
            subject = prepare_subject_prompt(self.tokenizer, caption, word)
        except PromptError as error:
            raise TrainingError(f"dataset entry {ident!r}: {error}; fix its caption or word in entry.json (or "
                                "rebuild it with `dataset build`)") from None
        return subject.input_ids, subject.placeholder_ids

    @torch.no_grad()
    def __call__(self, samples: Sequence[dict[str, Any]], sample_numbers: Sequence[int]) -> TrainBatch:
        cfg, device = self.config, self.device
        ids, placeholder = zip(*(self.subject_ids(s["caption"], s["word"], s["id"]) for s in samples))
        clip_pixels = torch.stack([s["image_prompt_clip_augmented"] for s in samples]).to(device)
        features = [f.float() for f in clip_vision_features(self.vision, clip_pixels)]
        keep, noisy, timesteps, noise, exemplars = [], [], [], [], []
        for sample, number in zip(samples, sample_numbers):
            generator = torch.Generator().manual_seed(sample_seed(cfg.seed, number, NOISE_PURPOSE))
            index = int(torch.randint(0, self.schedule.num_steps, (1,), generator=generator))
            dropped = bool(torch.rand((1,), generator=generator) < cfg.dropout)
            alpha_cumprod = float(self.schedule.alphas_cumprod[index])
            video = sample["video"].to(device)  # (3, f, H, W)
            latent = vae_encode(self.vae, video.permute(1, 0, 2, 3), generator=generator).float()  # (f, 4, h, w)
            latent = latent.permute(1, 0, 2, 3)  # (4, f, h, w)
            eps = torch.randn(latent.shape, generator=generator).to(device)
            noisy.append(q_sample(latent, eps, alpha_cumprod))
            noise.append(eps)
            timesteps.append(self.schedule.timestep_map[index])
            keep.append(not dropped)
            if cfg.stage == 2:
                frames, height, width = latent.shape[1], video.shape[-2], video.shape[-1]
                if dropped:  # the official "unconditional" exemplar: a mid-grey image, each frame its own sample
                    grey = torch.zeros((frames, 3, height, width), device=device)
                    clean = vae_encode(self.vae, grey, generator=generator).float().permute(1, 0, 2, 3)
                else:
                    prompt = sample["image_prompt_vae_augmented"][None].to(device)
                    one = vae_encode(self.vae, prompt, generator=generator).float()[:, :, None]  # (1, 4, 1, h', w')
                    clean = fit_exemplar(one, height, width)[0].expand(-1, frames, -1, -1)
                exemplar_noise = torch.randn(clean.shape, generator=generator).to(device)
                exemplars.append(q_sample(clean, exemplar_noise, alpha_cumprod))
        batch = len(samples)
        return TrainBatch(
            clip_features=features,
            input_ids=torch.cat(ids).to(device),
            placeholder_ids=placeholder[0],
            keep_text=torch.tensor(keep, device=device),
            null_states=self.null_states.to(device).expand(batch, -1, -1),
            noisy=torch.stack(noisy),
            timesteps=torch.tensor(timesteps, dtype=torch.long, device=device),
            noise=torch.stack(noise),
            exemplar=torch.stack(exemplars) if exemplars else None,
        )


__all__ = ["BatchMaker", "TrainBatch", "TrainingModule", "init_projections",
           "sample_seed", "trainable_names"]
