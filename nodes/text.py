"""Token-replacement text encoding (with the image prompt) or plain text encoding (text-to-video)."""

from __future__ import annotations

import logging

import torch

from ..videobooth_core.errors import PromptError
from ..videobooth_core.conditioning.text import NULL_PROMPT, encode_text, prepare_subject_prompt, tokenize
from . import _bridge as bridge
from ._types import CLIP, CONDITIONING, IMAGE_EMBEDS, Conditioning, ImageEmbeds, VideoBoothCLIP

logger = logging.getLogger(__name__)


class VideoBoothTextEncode:
    DESCRIPTION = ("Encodes the prompt for the VideoBooth sampler. With image embeddings, the subject word's tokens "
                   "are replaced by the image prompt's word vectors (the coarse embedding); without them it is plain "
                   "text-to-video with the base model. The negative prompt is the unconditional text of guidance.")
    CATEGORY = "VideoBooth/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The prompt and negative prompt states, for VideoBooth Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": (CLIP, {"tooltip": "The CLIP text encoder and tokenizer."}),
                "prompt": ("STRING", {"default": "a dog running on the beach", "multiline": True, "tooltip": (
                    "What happens in the video; with an image prompt it must contain the subject word.")}),
                "subject_word": ("STRING", {"default": "dog", "tooltip": (
                    "The prompt's word (or words) naming the subject, e.g. 'dog' or 'teddy bear'; any position. "
                    "Replaced by the image prompt's embedding; unused without image embeddings.")}),
                "negative_prompt": ("STRING", {"default": NULL_PROMPT, "multiline": True, "tooltip": (
                    "The unconditional text of classifier-free guidance; the official pipeline uses the literal "
                    "word 'None'.")}),
            },
            "optional": {
                "image_embeds": (IMAGE_EMBEDS, {"tooltip": (
                    "The subject's word vectors from VideoBooth Image Prompt Encode; leave unconnected for "
                    "text-to-video.")}),
            },
        }

    def encode(self, clip: VideoBoothCLIP, prompt: str, subject_word: str, negative_prompt: str,
               image_embeds: ImageEmbeds | None = None) -> tuple[Conditioning]:
        text_encoder, tokenizer = clip.text_encoder, clip.tokenizer
        if image_embeds is not None:
            width = text_encoder.config.hidden_size
            if image_embeds.words.shape[-1] != width:
                raise PromptError(
                    f"the image embeddings have width {image_embeds.words.shape[-1]} but the text encoder "
                    f"{clip.path.name} has width {width}; use the text encoder of the same model set as the mapper."
                )
            subject = prepare_subject_prompt(tokenizer, prompt, subject_word)  # fails early on a missing word
        elif subject_word.strip():
            logger.info("VideoBooth Text Encode: no image embeddings, so the subject word %r is not used", subject_word)
        bridge.activate([clip.managed])
        with torch.no_grad():
            null = encode_text(text_encoder, tokenize(tokenizer, negative_prompt)).last_hidden_state
            if image_embeds is None:
                cond = encode_text(text_encoder, tokenize(tokenizer, prompt)).last_hidden_state
                used = prompt
            else:
                encoded = encode_text(text_encoder, subject.input_ids, image_embeds.words, subject.placeholder_ids)
                cond = encoded.last_hidden_state
                used = subject.text
        return (Conditioning(cond.float().cpu(), null.float().cpu(), used, image_embeds is not None),)


NODE_CLASS_MAPPINGS = {"VideoBoothTextEncode": VideoBoothTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"VideoBoothTextEncode": "VideoBooth Text Encode (token replacement)"}
