"""Token-replacement text encoding (with the image prompt) or plain text encoding (text-to-video)."""

from __future__ import annotations

import logging

from ..videobooth_core.conditioning.embeddings import encode_prompt
from ..videobooth_core.conditioning.text import NULL_PROMPT
from ..videobooth_core.conditioning.subjects import encode_subjects_prompt
from . import _bridge as bridge
from .subjects import SUBJECTS, subject_words
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
                "subjects": (SUBJECTS, {"tooltip": (
                    "More subjects from VideoBooth Subjects, each word replaced by its own photo's embeddings (after "
                    "the subject word above when image embeddings are connected).")}),
            },
        }

    def encode(self, clip: VideoBoothCLIP, prompt: str, subject_word: str, negative_prompt: str,
               image_embeds: ImageEmbeds | None = None, subjects: tuple | None = None) -> tuple[Conditioning]:
        if subjects:  # several subjects, each word spliced with its own photo's vectors
            words, vectors = subject_words(subject_word, image_embeds, subjects)
            bridge.activate([clip.managed])
            null, _ = encode_prompt(clip.text_encoder, clip.tokenizer, negative_prompt)
            cond, used = encode_subjects_prompt(clip.text_encoder, clip.tokenizer, prompt, words, vectors)
            return (Conditioning(cond.cpu(), null.cpu(), used, True),)
        words = None if image_embeds is None else image_embeds.words
        if words is None and subject_word.strip():
            logger.info("VideoBooth Text Encode: no image embeddings, so the subject word %r is not used", subject_word)
        bridge.activate([clip.managed])
        null, _ = encode_prompt(clip.text_encoder, clip.tokenizer, negative_prompt)
        cond, used = encode_prompt(clip.text_encoder, clip.tokenizer, prompt, subject_word, words)
        return (Conditioning(cond.cpu(), null.cpu(), used, words is not None),)


NODE_CLASS_MAPPINGS = {"VideoBoothTextEncode": VideoBoothTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"VideoBoothTextEncode": "VideoBooth Text Encode (token replacement)"}
