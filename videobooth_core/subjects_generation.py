"""Generation with several subjects (``GenerationRequest.subjects``), each photo bound to its own word.

The stages are the single-subject pipeline's, once per subject where they concern the subject: every photo is
prepared and mapped to word vectors (coarse), the prompt spliced with each word's own vectors
(:func:`.conditioning.subjects.encode_subjects_prompt`), and every contributing subject's VAE latent becomes one
image-prompt stream (fine), all streams captured in one batched UNet pass per step.

Randomness, one CPU generator as always: the initial noise, then the VAE posterior sample of each contributing
subject in subject order, then per step one draw holding every subject's exemplar noise (subject-major) and the
step noise. With one subject (no region) the request is handed to the single-subject path unchanged, so it is
bit-identical to ``image``/``subject_word``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .conditioning.image_prompt import prepare_image_prompt
from .conditioning.subjects import check_region, encode_subjects_prompt, plan_fine_injection, request_subjects
from .errors import SamplingError, explain
from .sampling.denoiser import StepCallback
from .sampling.run import prepare_denoiser
from .settings import SamplingOptions


def generate_subjects(pipe: Any, request: Any, callback: StepCallback | None = None, decode: bool = True,
                      progress: bool = False) -> Any:
    """:meth:`VideoBoothPipeline.generate` for a request with ``subjects`` (same arguments and result; the
    result's ``image_prompt`` is the first subject's, ``info["subjects"]`` lists the words)."""
    from .pipeline import GenerationResult, latent_shape, progress_bar, sample_seeded
    from .sampling.windows import context_options, long_video_info

    request.validate(tokenizer=pipe.tokenizer)
    options = request.options or SamplingOptions()
    subjects = request_subjects(request)
    strengths = [options.image_prompt_strength if s.strength is None else float(s.strength) for s in subjects]
    regions = [check_region(s.region) for s in subjects]
    if len(subjects) == 1 and regions[0] is None:  # one subject: exactly the single-subject path
        only = subjects[0]
        return pipe.generate(dataclasses.replace(
            request, image=only.image, subject_word=only.word, mask=only.mask, bbox=only.bbox, subjects=[],
            options=dataclasses.replace(options, image_prompt_strength=strengths[0])), callback, decode, progress)

    shape = latent_shape(request.frames, request.height, request.width)
    prepared = [prepare_image_prompt(s.image, s.mask, s.bbox, request.image_prompt_padding) for s in subjects]
    null_text, _ = pipe.encode_prompt(request.negative_prompt)
    vectors = [pipe.encode_image_prompt(one) for one in prepared]
    cond_text, used = encode_subjects_prompt(pipe.text_encoder, pipe.tokenizer, request.prompt,
                                             [s.word for s in subjects], vectors, request.subject_match)
    plan = plan_fine_injection(strengths, regions)
    context = context_options(request)
    if plan.subject_strengths is not None and context.applies(request.frames):
        raise SamplingError(explain(
            f"several subjects' image prompts and a long video (context windows) do not go together yet; frames",
            request.frames, f"use at most {context.window} frames, or give one subject the image-prompt strength "
            "(the others strength 0: their words keep their photos' vectors)"))
    denoiser, estimate = prepare_denoiser(
        pipe.unet, cond_text, null_text, shape, pipe.device, image_prompt=plan.image_prompt,
        cfg_scale=request.cfg_scale, guidance=request.guidance, image_prompt_strength=plan.strength,
        single_frame_image_prompt=options.single_frame_image_prompt, watermark_branch=options.watermark_branch,
        batch_passes=options.batch_passes, context=context,
        resident_models=[pipe.mapper, pipe.vae, pipe.text_encoder, pipe.vision_encoder],
        subject_strengths=plan.subject_strengths, subject_regions=plan.subject_regions)
    pipe.check_memory(estimate)
    sources = [prepared[i] for i in plan.indices]
    image_prompt = None if not sources else sources[0] if plan.subject_strengths is None else sources
    start_latents = pipe.encode_start(request)
    with progress_bar(progress, callback) as report:
        latents = sample_seeded(
            denoiser, request.seed, shape, pipe.device, sampler=request.sampler, steps=request.steps,
            spacing=request.spacing, eta=request.eta, image_prompt_steps=options.image_prompt_steps,
            callback=report, vae=pipe.vae, image_prompt=image_prompt, context=context, start_latents=start_latents)
    frames = pipe.decode(latents) if decode else torch.empty(0)
    info = pipe.last_memory_estimate.as_dict() if pipe.last_memory_estimate else {}
    info.update(long_video_info(request.frames, context, start_latents))
    info["subjects"] = [s.word for s in subjects]
    return GenerationResult(latents=latents, frames=frames, prompt_used=used, image_prompt=prepared[0], info=info)
