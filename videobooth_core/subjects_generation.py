"""The conditioning of a generation with several subjects (``GenerationRequest.subjects``), each photo bound to its
own word; the rest of the generation is the pipeline's one skeleton (:meth:`VideoBoothPipeline.generate`).

The stages are the single-subject pipeline's, once per subject where they concern the subject: every photo is
prepared and mapped to word vectors (coarse), the prompt spliced with each word's own vectors
(:func:`.conditioning.subjects.encode_subjects_prompt`), and every contributing subject's VAE latent becomes one
image-prompt stream (fine), all streams captured in one batched UNet pass per step.

Randomness, one CPU generator as always: the initial noise, then the VAE posterior sample of each contributing
subject in subject order, then per step one draw holding every subject's exemplar noise (subject-major) and the
step noise. With one subject (no region) the request is rewritten to the single-subject form
(:func:`single_subject_request`), so it is bit-identical to ``image``/``subject_word``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .conditioning.embeddings import Conditioning
from .conditioning.subjects import (
    check_region,
    encode_subjects_prompt,
    plan_request_injection,
    prepare_photos,
    request_subjects,
)
from .settings import SamplingOptions


def single_subject_request(request: Any, options: SamplingOptions) -> Any | None:
    """The request with one subject (and no region) rewritten to ``image``/``subject_word`` with the subject's
    strength, or None when it needs the several-subjects path."""
    subjects = request_subjects(request)
    if len(subjects) != 1 or check_region(subjects[0].region) is not None:
        return None
    only = subjects[0]
    strength = options.image_prompt_strength if only.strength is None else float(only.strength)
    return dataclasses.replace(  # the prepared photos stay shared: the same photo is not prepared again
        request, image=only.image, subject_word=only.word, mask=only.mask, bbox=only.bbox, subjects=[],
        options=dataclasses.replace(options, image_prompt_strength=strength))


def subjects_conditioning(pipe: Any, request: Any, options: SamplingOptions) -> Conditioning:
    """Every subject's photo prepared and mapped to its word's vectors, the prompt spliced with them, and the
    plan of the image-prompt streams (``pipe``: a :class:`videobooth_core.pipeline.VideoBoothPipeline`). The
    request was validated (:func:`videobooth_core.settings.check_request`), which prepared the photos once."""
    subjects = request_subjects(request)
    plan = plan_request_injection(request, options)
    prepared = prepare_photos(request)
    null_text, _ = pipe.encode_prompt(request.negative_prompt)
    vectors = [pipe.encode_image_prompt(one) for one in prepared]
    cond_text, used = encode_subjects_prompt(pipe.text_encoder, pipe.tokenizer, request.prompt,
                                             [s.word for s in subjects], vectors, request.subject_match)
    sources = [prepared[i] for i in plan.indices]
    return Conditioning(
        cond_text=cond_text, null_text=null_text, prompt_used=used,
        image_prompt=None if not sources else sources[0] if plan.subject_strengths is None else sources,
        image_prompt_strength=plan.strength, subject_strengths=plan.subject_strengths,
        subject_regions=plan.subject_regions, shown=prepared[0], info={"subjects": [s.word for s in subjects]})
