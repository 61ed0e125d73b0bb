"""What each stage trains, how it is initialised, and the training loss - on the inference model code.

The loss of one clip (reference §7.1-7.3):

1. the coarse embedding: ``injected = mapper(CLIP vision features of the augmented image prompt)``, spliced by
   :func:`conditioning.text.encode_text` over the subject word's own tokens in the caption (the official
   training's class-word splice: every position holding the word's first token starts a splice, in the
   caption's original positions, so a word that occurs twice is spliced twice and the second splice overwrites
   the tail of the first, as the official code; for a word that occurs once this equals the inference splice
   over the placeholder ``sdksd``), giving the text states; stage 2 replaces them, with the condition dropout,
   by the "None" prompt's states;
2. stage 2, the fine embedding: the image prompt's VAE latent (or, dropped, a mid-grey image's), repeated over
   the frames, noised at the video's timestep with fresh per-frame noise, through
   ``UNet3DModel.capture_image_prompt_features`` with the "None" text;
3. ``eps_hat = UNet3DModel.forward(x_t, t, text states, image_prompt_features)`` - the conditional prediction
   of the sampler's denoiser;
4. ``MSE(eps_hat, eps) + reg_weight * mean|injected|`` (+ ``reg_text_weight * mean|states - caption's plain
   states|``, the official scripts' optional text regulariser, on the states after the dropout; off by default as
   in the official README's commands).

Stage 2's dropped clips share one VAE sample of the mid-grey exemplar per optimizer step (official; drawn from
(seed, step)), or draw one each with ``grey_exemplar="per-clip"``.

Everything random in a clip's loss (timestep, dropout, posterior samples, noise) comes from a generator seeded
by (seed, sample number), and the shared grey exemplar from one seeded by (seed, step): a clip's loss does not
depend on the rank or the micro-batch it lands in, so data-parallel runs equal single-process ones and resumed
runs equal uninterrupted ones.
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
from ..conditioning.text import (NULL_PROMPT, TextEncoding, encode_text, prompt_fit, splice_subject_embeddings,
                                 substitute_subject, tokenize)
from ..conditioning.vae import vae_scaling_factor, vae_encode
from ..errors import PromptError, explain
from ..models.config import mapper_stem_from_site_prefix
from ..models.mapper import Mapper
from ..models.unet_3d import UNet3DModel
from ..sampling.schedule import RespacedDDPM, q_sample
from ..sampling.seeded import fit_exemplar
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


def check_elite_start(config: TrainConfig, weights: dict[str, torch.Tensor]) -> None:
    """Refuse, before any model is loaded, an ELITE-layout start that cannot give the run what it asks for."""
    from ..loading.checkpoint import has_elite_projections

    if has_elite_projections(weights):
        return
    if config.stage == 2:
        raise TrainingError(explain("stage 2 continues the attn2 to_k/to_v of a stage-1 mapper, and this ELITE "
                                    "global mapper holds the MLPs only", config.mapper,
                                    "train stage 1 from it first (--stage 1 --mapper FILE), then pass its "
                                    "videobooth_mapper.safetensors to stage 2"))
    if not config.reinit_projections:
        raise TrainingError(explain("--keep-mapper-projections keeps the starting mapper's attn2 to_k/to_v, and this "
                                    "ELITE global mapper holds the MLPs only", config.mapper,
                                    "leave out --keep-mapper-projections (the official start copies the UNet's)"))


def start_from_elite(config: TrainConfig, weights: dict[str, torch.Tensor], unet: Any, vision: Any, text: Any,
                     sites: tuple[tuple[str, int], ...], device: torch.device, dtype: torch.dtype) -> Mapper:
    """The mapper a run starts with from ELITE's global mapper layout (official ``--global-mapper-path``).

    Every projection is first a copy of the UNet's (attn1 ``_new``/``_exemplar`` are in no ELITE file), then the
    file's MLPs and, when it has them, its attn2 ``to_k``/``to_v`` are copied in, strictly. The official stage 1
    then overwrites those K/V with the UNet's own again (``reinit_projections``, the default); stage 2 (from an
    official stage-1 checkpoint, the same layout under ``ema``) keeps them and copies only attn1 from the UNet.
    """
    from ..loading.checkpoint import assign_elite_mapper, elite_mapper_config

    mapper_config = elite_mapper_config(weights, sites)
    widths = (vision.config.hidden_size, text.config.hidden_size)
    if (mapper_config.input_dim, mapper_config.output_dim) != widths:
        raise TrainingError(explain("the ELITE global mapper's MLPs map (CLIP vision width, text width)",
                                    (mapper_config.input_dim, mapper_config.output_dim),
                                    f"these CLIP towers need {widths}: pass the mapper trained for them "
                                    f"({config.mapper})"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        mapper = Mapper(mapper_config).to(device, dtype)
    init_projections(unet, mapper, 1)
    assign_elite_mapper(mapper, weights, config.mapper)
    return mapper


@dataclass
class TrainBatch:
    """A prepared micro-batch (frozen encoders already run; nothing here needs a gradient)."""

    clip_features: list[torch.Tensor]
    """5 x (b, 1 + patches, vision width): CLIP features of the augmented image prompts."""
    input_ids: torch.Tensor
    """(b, 77) token ids of the captions (as written: the class word itself is spliced over)."""
    placeholder_ids: tuple[int, ...] | tuple[tuple[int, ...], ...]
    """The token ids spliced over: one tuple shared by every row, or one tuple per row (each caption's subject
    word)."""
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
    original_states: torch.Tensor | None = None
    """(b, 77, text width) the captions' plain text states (no splice), for the text regulariser; else None."""
    clean: torch.Tensor | None = None
    """(b, 4, f, h, w) the clean video latent (the distillation stage noises it itself)."""
    exemplar_clean: torch.Tensor | None = None
    """(b, 4, f, h, w) the clean image-prompt latent over the frames (stage 2 batches), else None."""


def spliced_text(text_encoder: Any, input_ids: torch.Tensor,
                 placeholder_ids: tuple[int, ...] | tuple[tuple[int, ...], ...],
                 injected: torch.Tensor) -> TextEncoding:
    """The training's text encoding: ``injected`` (b, k, d) spliced over ``placeholder_ids`` in ``input_ids``
    (b, 77): one id tuple for every row, or one per row (the official ``inj_index``, a list per row)."""
    if all(isinstance(i, int) for i in placeholder_ids):
        return encode_text(text_encoder, input_ids, injected, tuple(placeholder_ids))

    def splice(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = [splice_subject_embeddings(tokens[i:i + 1], ids[i:i + 1], tuple(placeholder_ids[i]),
                                          injected[i:i + 1].to(tokens.device)) for i in range(tokens.shape[0])]
        return torch.cat(rows)

    return encode_text(text_encoder, input_ids, splice=splice)


class TrainingModule(nn.Module):
    """The mapper (registered: the only parameters data parallelism sees) and the frozen models it feeds.

    ``forward`` is the loss of the module docstring; it only composes inference code.
    """

    def __init__(self, mapper: Mapper, unet: UNet3DModel, text_encoder: Any, reg_weight: float,
                 reg_text_weight: float = 0.0) -> None:
        super().__init__()
        self.mapper = mapper
        # held outside the module tree: frozen, never wrapped, broadcast or saved with the trained parameters
        self._frozen = (unet, text_encoder)
        self.reg_weight = float(reg_weight)
        self.reg_text_weight = float(reg_text_weight)
        self.last_reg_text: torch.Tensor | None = None
        """mean|states - plain states| of the last forward (detached), when the text regulariser is on."""

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, MSE part (detached), mean|injected| (detached)) of the micro-batch, scalars."""
        unet, text_encoder = self._frozen
        dtype = next(unet.parameters()).dtype
        mapper_param = next(self.mapper.parameters())
        injected = self.mapper([f.to(mapper_param.device, mapper_param.dtype) for f in batch.clip_features])
        states = spliced_text(text_encoder, batch.input_ids, batch.placeholder_ids, injected).last_hidden_state
        states = torch.where(batch.keep_text[:, None, None], states, batch.null_states.to(states.dtype))
        features = None
        if batch.exemplar is not None:
            features = unet.capture_image_prompt_features(batch.exemplar.to(dtype), batch.timesteps,
                                                          batch.null_states.to(dtype))
        prediction = unet(batch.noisy.to(dtype), batch.timesteps, states.to(dtype), image_prompt_features=features)
        loss_dtype = torch.promote_types(dtype, torch.float32)  # float32 under bf16 weights, float64 when checking
        mse = F.mse_loss(prediction.to(loss_dtype), batch.noise.to(loss_dtype))
        reg = injected.to(loss_dtype).abs().mean()
        loss = mse + self.reg_weight * reg
        if self.reg_text_weight > 0:
            if batch.original_states is None:
                raise TrainingError("the text regulariser needs the captions' plain states: make the batch with a "
                                    "BatchMaker whose config has reg_text_weight > 0")
            # official: on the states after the dropout (a dropped row's "None" states count, without gradient)
            reg_text = (states.to(loss_dtype) - batch.original_states.to(states.device, loss_dtype)).abs().mean()
            loss = loss + self.reg_text_weight * reg_text
            self.last_reg_text = reg_text.detach()
        return loss, mse.detach(), reg.detach()


def sample_seed(seed: int, sample_number: int, purpose: int) -> int:
    """A 63-bit seed for (base seed, global sample number, purpose), independent across all three."""
    return int(np.random.SeedSequence([seed, sample_number, purpose]).generate_state(2, dtype=np.uint64)[0] >> 1)


NOISE_PURPOSE, DATA_PURPOSE, ORDER_PURPOSE, GREY_PURPOSE = 1, 2, 3, 4


def compute_dtype(config: TrainConfig) -> torch.dtype:
    """The weights' and inputs' dtype of a run (``--dtype``)."""
    return torch.float64 if config.dtype == "float64" else torch.float32


class BatchMaker:
    """Runs the frozen encoders and draws the noise for a list of dataset samples (see :class:`TrainBatch`).

    ``cache`` (an :class:`.cache.EncoderCache`): samples read without their clip (``video`` None) take the
    frames' VAE posterior parameters from it and sample them with the same generator draws as ``vae_encode``.
    """

    def __init__(self, config: TrainConfig, vae: Any, vision_encoder: Any, text_encoder: Any, tokenizer: Any,
                 device: torch.device, cache: Any = None) -> None:
        self.config, self.vae, self.vision, self.tokenizer, self.device = config, vae, vision_encoder, tokenizer, device
        self.cache, self.dtype = cache, compute_dtype(config)
        self.schedule = RespacedDDPM(config.timestep_grid)
        self.text = text_encoder
        self._ids: dict[tuple[str, str], tuple[torch.Tensor, tuple[int, ...]]] = {}
        self._grey: tuple[torch.Tensor, torch.Tensor] | None = None
        with torch.no_grad():
            null = encode_text(text_encoder, tokenize(tokenizer, NULL_PROMPT)).last_hidden_state
        self.null_states = null.to(self.dtype)

    def subject_ids(self, caption: str, word: str, ident: str) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(1, 77) token ids of ``caption`` as written and the token ids of ``word`` (no start/end tokens), the
        official training's splice over the class word itself; once per (caption, word).

        Checked as at inference: the word must be a whole word of the caption, and no splice may be cut by
        CLIP's 77 tokens."""
        key = (caption, word)
        if key not in self._ids:
            word_ids = tuple(int(i) for i in self.tokenizer(word, add_special_tokens=False).input_ids)
            try:
                substitute_subject(caption, word)  # the word as a whole word of the caption, or a named error
                prompt_fit(self.tokenizer, caption.lower(), word_ids, subject_word=word)
                ids = tokenize(self.tokenizer, caption)
                if not word_ids or not bool((ids[0] == word_ids[0]).any()):
                    raise PromptError(explain(f"the subject word {word!r} does not tokenise as in the caption",
                                              caption, "name the subject with the caption's own word"))
            except PromptError as error:
                raise TrainingError(f"dataset entry {ident!r}: {error}; fix its caption or word in entry.json (or "
                                    "rebuild it with `dataset build`)") from None
            self._ids[key] = (ids, word_ids)
        return self._ids[key]

    def _sample_posterior(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``vae_encode``'s sampling of posterior parameters: the same draws, the same arithmetic."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        mean, std = mean.to(self.device), std.to(self.device)
        return (mean + std * noise.to(self.device)) * vae_scaling_factor(self.vae, None)

    def _grey_posterior(self, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters of ``frames`` mid-grey images (the dropped exemplar), encoded once per run."""
        if self._grey is None or self._grey[0].shape[0] != frames:
            param = next(self.vae.parameters())
            grey = torch.zeros((frames, 3, height, width), device=param.device, dtype=param.dtype)
            dist = self.vae.encode(grey).latent_dist
            self._grey = (dist.mean, dist.std)
        return self._grey

    @torch.no_grad()
    def __call__(self, samples: Sequence[dict[str, Any]], sample_numbers: Sequence[int],
                 step: int | None = None) -> TrainBatch:
        """The micro-batch of ``samples`` (global numbers ``sample_numbers``) in optimizer step ``step`` (index
        from 0; None: ``min(sample_numbers) // (batch_size * grad_accum)``, a single process's step)."""
        cfg, device, dtype = self.config, self.device, self.dtype
        if step is None:
            step = min(int(n) for n in sample_numbers) // (cfg.batch_size * cfg.grad_accum)
        ids, placeholder = zip(*(self.subject_ids(s["caption"], s["word"], s["id"]) for s in samples))
        shared_grey: torch.Tensor | None = None
        clip_pixels = torch.stack([s["image_prompt_clip_augmented"] for s in samples]).to(device)
        features = [f.to(dtype) for f in clip_vision_features(self.vision, clip_pixels)]
        keep, noisy, timesteps, noise, exemplars, cleans, exemplar_cleans = [], [], [], [], [], [], []
        for sample, number in zip(samples, sample_numbers):
            generator = torch.Generator().manual_seed(sample_seed(cfg.seed, number, NOISE_PURPOSE))
            index = int(torch.randint(0, self.schedule.num_steps, (1,), generator=generator))
            dropped = bool(torch.rand((1,), generator=generator) < cfg.dropout)
            alpha_cumprod = float(self.schedule.alphas_cumprod[index])
            if sample["video"] is None:  # cached: the frames' posterior parameters, sampled here
                if self.cache is None:
                    raise TrainingError("a sample without its clip needs the encoder cache (--cache)")
                mean, std = self.cache.posterior(sample["id"], sample["frame_indices"], bool(sample["flip"]))
                latent = self._sample_posterior(mean.to(dtype), std.to(dtype), generator)  # (f, 4, h, w)
                height = width = cfg.size
            else:
                video = sample["video"].to(device)  # (3, f, H, W)
                latent = vae_encode(self.vae, video.permute(1, 0, 2, 3), generator=generator)  # (f, 4, h, w)
                height, width = video.shape[-2], video.shape[-1]
            latent = latent.to(dtype).permute(1, 0, 2, 3)  # (4, f, h, w)
            eps = torch.randn(latent.shape, generator=generator).to(device, dtype)
            noisy.append(q_sample(latent, eps, alpha_cumprod))
            cleans.append(latent)
            noise.append(eps)
            timesteps.append(self.schedule.timestep_map[index])
            keep.append(not dropped)
            if cfg.stage == 2:
                frames = latent.shape[1]
                if dropped and cfg.grey_exemplar == "per-clip":  # a mid-grey image, each frame its own sample
                    clean = self._sample_posterior(*self._grey_posterior(frames, height, width), generator)
                    clean = clean.to(dtype).permute(1, 0, 2, 3)
                elif dropped:  # official: one VAE sample of the grey frames per step, shared by the dropped clips
                    if shared_grey is None:
                        grey_generator = torch.Generator().manual_seed(sample_seed(cfg.seed, step, GREY_PURPOSE))
                        shared_grey = self._sample_posterior(*self._grey_posterior(frames, height, width),
                                                             grey_generator).to(dtype).permute(1, 0, 2, 3)
                    clean = shared_grey
                else:
                    prompt = sample["image_prompt_vae_augmented"][None].to(device)
                    one = vae_encode(self.vae, prompt, generator=generator).to(dtype)[:, :, None]  # (1, 4, 1, h', w')
                    clean = fit_exemplar(one, height, width)[0].expand(-1, frames, -1, -1)
                exemplar_noise = torch.randn(clean.shape, generator=generator).to(device, dtype)
                exemplars.append(q_sample(clean, exemplar_noise, alpha_cumprod))
                exemplar_cleans.append(clean)
        batch = len(samples)
        input_ids = torch.cat(ids).to(device)
        original = None
        if cfg.reg_text_weight > 0:  # the captions' plain states, the text regulariser's reference
            original = encode_text(self.text, input_ids).last_hidden_state.to(dtype)
        shared = all(p == placeholder[0] for p in placeholder)
        return TrainBatch(
            clip_features=features,
            input_ids=input_ids,
            placeholder_ids=placeholder[0] if shared else tuple(placeholder),
            keep_text=torch.tensor(keep, device=device),
            null_states=self.null_states.to(device).expand(batch, -1, -1),
            noisy=torch.stack(noisy),
            timesteps=torch.tensor(timesteps, dtype=torch.long, device=device),
            noise=torch.stack(noise),
            exemplar=torch.stack(exemplars) if exemplars else None,
            original_states=original,
            clean=torch.stack(cleans),
            exemplar_clean=torch.stack(exemplar_cleans) if exemplar_cleans else None,
        )


__all__ = ["BatchMaker", "TrainBatch", "TrainingModule", "check_elite_start", "compute_dtype", "init_projections",
           "sample_seed", "spliced_text", "start_from_elite", "trainable_names"]
