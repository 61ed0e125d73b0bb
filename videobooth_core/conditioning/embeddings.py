"""The conditioning stages, each written once (used by the pipeline, the ComfyUI nodes and the tests).

* :func:`encode_image_prompt` - the coarse embedding: CLIP vision features of the prepared image prompt,
  mapped to the word vectors that replace the subject word;
* :func:`encode_prompt` - text states of a prompt, with the subject word's tokens replaced by those vectors;
* :func:`encode_exemplar` - the fine embedding's source: the image prompt's VAE posterior sample.

:class:`Conditioning` holds what these stages give one generation (one subject or several), the input of the
generation skeleton (:meth:`videobooth_core.pipeline.VideoBoothPipeline.generate`).

Every function takes the models as arguments and works wherever they are: inputs are moved to the
model's device, outputs are float32 on that device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ImagePromptError, PromptError
from ..models.mapper import Mapper
from .clip import clip_vision_features
from .image_prompt import PreparedImagePrompt
from .text import WHOLE_WORD, encode_text, prepare_subject_prompt, tokenize
from .vae import vae_encode


@dataclass
class Conditioning:
    """What one generation is conditioned on, whatever the number of subjects."""

    cond_text: torch.Tensor
    """(1, 77, d) text states of the prompt, the subject words' tokens replaced by their photos' vectors."""
    null_text: torch.Tensor
    """(1, 77, d) text states of the negative prompt."""
    prompt_used: str
    """The prompt as tokenised (subject words replaced by the placeholder)."""
    image_prompt: PreparedImagePrompt | list[PreparedImagePrompt] | None = None
    """The fine injection's sources: one prepared photo, one per contributing subject (several streams), or
    None when no image-prompt stream runs."""
    image_prompt_strength: float = 1.0
    subject_strengths: tuple[float, ...] | None = None
    """Several subjects' streams (:func:`videobooth_core.conditioning.subjects.plan_fine_injection`)."""
    subject_regions: tuple[tuple[float, float, float, float] | None, ...] | None = None
    shown: PreparedImagePrompt | None = None
    """The prepared photo the result reports (the first subject's)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Added to the result's ``info`` (several subjects: their words)."""


@torch.no_grad()
def encode_image_prompt(vision_encoder: Any, mapper: Mapper, prepared: PreparedImagePrompt) -> torch.Tensor:
    """The coarse image-prompt embedding.

    Args:
        vision_encoder: a transformers ``CLIPVisionModel`` (CLIP ViT-L/14, at least 16 layers).
        mapper: the VideoBooth mapper (on any device, in any dtype).
        prepared: the prepared image prompt (its ``clip_pixels`` (1, 3, 224, 224) are used).

    Returns:
        (1, 5, text width) float32 word vectors, on the mapper's device.
    """
    width, expected = vision_encoder.config.hidden_size, mapper.config.input_dim
    if width != expected:
        raise ImagePromptError(
            f"the CLIP vision encoder has width {width} but the mapper expects {expected} (CLIP ViT-L/14); "
            "load the vision encoder that belongs to this VideoBooth model"
        )
    features = clip_vision_features(vision_encoder, prepared.clip_pixels)
    param = next(mapper.parameters())
    return mapper([feature.to(param.device, param.dtype) for feature in features]).float()


@torch.no_grad()
def encode_prompt(
    text_encoder: Any,
    tokenizer: Any,
    prompt: str,
    subject_word: str | None = None,
    image_words: torch.Tensor | None = None,
    subject_match: str = WHOLE_WORD,
) -> tuple[torch.Tensor, str]:
    """Text states of ``prompt``; with ``subject_word`` and ``image_words`` the subject's tokens are replaced
    by the image prompt's word vectors (VideoBooth's token replacement), otherwise a plain CLIP encoding.

    Args:
        text_encoder: a transformers ``CLIPTextModel``; tokenizer: its CLIP tokenizer.
        image_words: (1, k, text width) word vectors from :func:`encode_image_prompt`, or None.
        subject_match: how the subject word is found (see :func:`..conditioning.text.substitute_subject`).

    Returns:
        ((1, 77, text width) float32 states on the encoder's device, the text as tokenised).
    """
    if subject_word is None or image_words is None:
        return encode_text(text_encoder, tokenize(tokenizer, prompt)).last_hidden_state.float(), prompt
    width = text_encoder.config.hidden_size
    if image_words.shape[-1] != width:
        raise PromptError(
            f"the image embeddings have width {image_words.shape[-1]} but the text encoder has width {width}; "
            "use the text encoder of the same model set as the mapper"
        )
    subject = prepare_subject_prompt(tokenizer, prompt, subject_word, subject_match)
    states = encode_text(text_encoder, subject.input_ids, image_words, subject.placeholder_ids).last_hidden_state
    return states.float(), subject.text


@torch.no_grad()
def encode_exemplar(vae: Any, prepared: PreparedImagePrompt, generator: torch.Generator) -> torch.Tensor:
    """The fine embedding's source: the image prompt's VAE posterior sample x 0.18215, as the official code.

    Args:
        vae: the SD 1.x ``diffusers.AutoencoderKL``.
        prepared: the prepared image prompt (its ``vae_pixels`` (1, 3, 256, 256) in [-1, 1] are used).
        generator: draws the posterior noise; in a generation it is the video's generator, right after the
            initial noise (the official order).

    Returns:
        (1, 4, 1, 32, 32) float32 on the VAE's device.
    """
    latent = vae_encode(vae, prepared.vae_pixels, generator=generator, sample=True)
    return latent[:, :, None].float()
