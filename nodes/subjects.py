"""Several subjects in one video: *VideoBooth Subjects* collects one image prompt per subject word (chainable, like
ComfyUI's conditioning combiners); VideoBooth Text Encode and VideoBooth Sampler take the list on their optional
``subjects`` input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..videobooth_core.conditioning.subjects import FineInjection, check_region, plan_fine_injection
from ..videobooth_core.errors import ImagePromptError, SamplingError, explain
from ._types import EXEMPLAR, IMAGE_EMBEDS, Exemplar, ImageEmbeds

SUBJECTS = "VIDEOBOOTH_SUBJECTS"
"""A tuple of :class:`NodeSubject` (socket type name: public API, never rename)."""


@dataclass(frozen=True)
class NodeSubject:
    """One subject: its word, its photo's word vectors (coarse), its exemplar (fine, optional) and region."""

    word: str
    words: torch.Tensor
    exemplar: Exemplar | None
    region: tuple[float, float, float, float] | None


class VideoBoothSubjects:
    DESCRIPTION = ("Adds one subject to a list of subjects: the prompt's word naming it, its photo's image embeddings "
                   "(coarse: they replace that word) and its exemplar (fine: injected into frame 0 with the exemplar's "
                   "strength), optionally limited to a region of the video. Chain one node per subject and connect the "
                   "last to the subjects input of VideoBooth Text Encode and VideoBooth Sampler.")
    CATEGORY = "VideoBooth/image prompt"
    FUNCTION = "add"
    RETURN_TYPES = (SUBJECTS,)
    RETURN_NAMES = ("subjects",)
    OUTPUT_TOOLTIPS = ("The subjects so far plus this one, for the subjects input of Text Encode and Sampler (or the "
                       "next VideoBooth Subjects node).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        def edge(default: float, what: str) -> tuple:
            return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                f"{what} of the region where this subject's features act, as a fraction of the video frame (the "
                "default region 0, 0, 1, 1 is the whole frame).")})

        return {
            "required": {
                "subject_word": ("STRING", {"default": "cat", "tooltip": (
                    "The prompt's word (or words) naming this subject, e.g. 'cat'; each subject needs its own word.")}),
                "image_embeds": (IMAGE_EMBEDS, {"tooltip": (
                    "This subject's word vectors from VideoBooth Image Prompt Encode (they replace its word).")}),
                "region_x1": edge(0.0, "Left edge"),
                "region_y1": edge(0.0, "Top edge"),
                "region_x2": edge(1.0, "Right edge"),
                "region_y2": edge(1.0, "Bottom edge"),
            },
            "optional": {
                "subjects": (SUBJECTS, {"tooltip": (
                    "The subjects of an earlier VideoBooth Subjects node; this one is added after them.")}),
                "exemplar": (EXEMPLAR, {"tooltip": (
                    "This subject's image-prompt latent from VideoBooth Latent Injection (its strength applies to this "
                    "subject; strength 0 or unconnected: no fine injection, its word still gets the embeddings).")}),
            },
        }

    def add(self, subject_word: str, image_embeds: ImageEmbeds, region_x1: float, region_y1: float, region_x2: float,
            region_y2: float, subjects: tuple[NodeSubject, ...] | None = None,
            exemplar: Exemplar | None = None) -> tuple[tuple[NodeSubject, ...]]:
        if not subject_word.strip():
            raise ImagePromptError("VideoBooth Subjects needs the prompt's word naming this subject, e.g. 'cat'.")
        region = check_region((region_x1, region_y1, region_x2, region_y2), f"region of the subject {subject_word!r}")
        return ((*(subjects or ()), NodeSubject(subject_word, image_embeds.words, exemplar, region)),)


def subject_words(subject_word: str, image_embeds: ImageEmbeds | None,
                  subjects: tuple[NodeSubject, ...]) -> tuple[list[str], list[torch.Tensor]]:
    """Text Encode's subject words and word vectors: its own (when embeds are connected) first, then the list's."""
    words = [subject_word] if image_embeds is not None else []
    vectors = [image_embeds.words] if image_embeds is not None else []
    return words + [s.word for s in subjects], vectors + [s.words for s in subjects]


@dataclass(frozen=True)
class SamplerSubjects:
    """What the sampler needs of every exemplar (its own and the subjects'): which streams run and their sources."""

    plan: FineInjection
    sources: list[Any]
    """Per running stream: a clean latent, or (VAE module, prepared image prompt)."""
    source: dict[str, Any]
    """``sample_seeded`` keyword arguments: one stream as the single exemplar, several as a list, or none."""
    window: tuple[float, float]
    vaes: list[Any]
    """The VideoBooth VAEs to load (managed models)."""


def sampler_subjects(exemplar: Exemplar | None, subjects: tuple[NodeSubject, ...]) -> SamplerSubjects:
    """Every exemplar of a Sampler with a ``subjects`` input, planned (strength 0: no stream)."""
    entries = ([(exemplar, None)] if exemplar is not None else []) + [(s.exemplar, s.region) for s in subjects
                                                                      if s.exemplar is not None]
    windows = {(e.start, e.end) for e, _ in entries}
    if len(windows) > 1:
        raise SamplingError(explain("the subjects' exemplars must share one injection window (start, end); got",
                                    sorted(windows), "give every VideoBooth Latent Injection the same start and end"))
    plan = plan_fine_injection([e.strength for e, _ in entries], [region for _, region in entries])
    chosen = [entries[i][0] for i in plan.indices]
    sources = [e.latent if e.latent is not None else (e.vae.vae, e.image_prompt) for e in chosen]
    vaes = list({id(e.vae): e.vae.managed for e in chosen if e.latent is None}.values())
    if not sources:
        source: dict[str, Any] = {}
    elif plan.subject_strengths is not None:
        source = {"image_prompt": sources}
    elif isinstance(sources[0], torch.Tensor):  # one stream: exactly the single-exemplar path
        source = {"exemplar_latent": sources[0]}
    else:
        source = {"vae": sources[0][0], "image_prompt": sources[0][1]}
    return SamplerSubjects(plan, sources, source, windows.pop() if windows else (0.0, 1.0), vaes)


NODE_CLASS_MAPPINGS = {"VideoBoothSubjects": VideoBoothSubjects}
NODE_DISPLAY_NAME_MAPPINGS = {"VideoBoothSubjects": "VideoBooth Subjects"}
