"""Several subjects in one video, each photo bound to its own word of the prompt.

* Coarse: every subject word is replaced by the placeholder (as for one subject) and each occurrence's tokens by
  *that subject's* 5 mapper vectors, in prompt order, the rest of the prompt shifting right (:func:`splice_subjects`).
* Fine: each subject's image-prompt stream is captured and injected into frame 0's cross-frame attention with its
  own strength and optional region (:mod:`..models.subjects`); :func:`plan_fine_injection` decides which streams run.

One subject always takes the official single-subject code (:mod:`.text`, the single image-prompt stream), so it is
bit-identical to ``image``/``subject_word``; this module's own paths run only for two or more.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ImagePromptError, PromptError, SamplingError, explain
from ..models.config import NUM_MAPPER_LEVELS
from ..models.subjects import FULL_FRAME, Region
from .text import (
    MAX_TOKENS, OFFICIAL_SUBSTRING, PLACEHOLDER_WORD, SUBJECT_MATCHES, WHOLE_WORD, dropped_words, encode_text,
    placeholder_token_ids, prompt_fit_warnings, substitute_subject, tokenize,
)

if TYPE_CHECKING:
    from .image_prompt import PreparedImagePrompt

DROPPED_WORDS_SHOWN = 20


@dataclass(frozen=True)
class Subject:
    """One subject of a generation: its word in the prompt and its photo.

    ``image`` (H, W, 3) uint8 or float in [0, 1]; ``mask`` (H, W) nonzero = subject, or None; ``bbox`` the
    subject's box in the photo in pixels (default: the mask's); ``strength`` of its fine injection (None: the
    request's ``image_prompt_strength``; 0 removes its image-prompt stream, its word keeps the photo's vectors);
    ``region`` (x1, y1, x2, y2) fractions of the video frame where its features act (None: everywhere).
    """

    word: str
    image: torch.Tensor
    mask: torch.Tensor | None = None
    bbox: tuple[float, float, float, float] | None = None
    strength: float | None = None
    region: Region | None = None


def request_subjects(request: Any) -> list[Subject]:
    """Every subject of a request, in order: the single ``image``/``subject_word`` (if given) first, then
    ``request.subjects``."""
    subjects = []
    if getattr(request, "image", None) is not None:
        subjects.append(Subject(request.subject_word, request.image, request.mask, request.bbox))
    for item in getattr(request, "subjects", None) or ():
        if not isinstance(item, Subject):
            raise ImagePromptError(explain("each of subjects must be a Subject(word, image, mask, bbox, strength, "
                                           "region); got", type(item).__name__,
                                           "build them with videobooth_core.conditioning.subjects.Subject"))
        subjects.append(item)
    return subjects


def check_region(region: Any, what: str = "region") -> Region | None:
    """``region`` as four floats 0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1 (None and the full frame: None)."""
    if region is None:
        return None
    if (isinstance(region, (str, bytes)) or not hasattr(region, "__len__") or len(region) != 4
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in region)):
        raise ImagePromptError(explain(f"the {what} must be four numbers x1, y1, x2, y2 (fractions of the video frame)",
                                       region, "e.g. 0,0,0.5,1 for the left half"))
    x1, y1, x2, y2 = (float(v) for v in region)
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise ImagePromptError(explain(f"the {what} needs 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 (fractions of the "
                                       "video frame, left/top = 0); got", region, "e.g. 0,0,0.5,1 for the left half"))
    return None if (x1, y1, x2, y2) == FULL_FRAME else (x1, y1, x2, y2)


# -- coarse: the prompt ------------------------------------------------------------------------------------------------
def _word_key(word: str) -> str:
    return " ".join(word.strip().lower().split())


def substitute_subjects(prompt: str, words: Sequence[str], match: str = WHOLE_WORD) -> tuple[str, tuple[int, ...]]:
    """Lower-case ``prompt`` and replace every subject word by the placeholder.

    Returns:
        (the text, the subject index of each placeholder in prompt order). Each word is found as by
        :func:`.text.substitute_subject` (whole words, or the official substring rule).

    Raises:
        PromptError: a word not in the prompt (listing the prompt's words), the same word given twice, or two
        words whose matches overlap ("bear" inside "teddy bear").
    """
    seen: dict[str, int] = {}
    for index, word in enumerate(words):
        substitute_subject(prompt, word, match)  # the single-subject checks: a string, not empty, in the prompt
        key = _word_key(word)
        if key in seen:
            raise PromptError(
                f"the subject word {word!r} is given twice (subjects {seen[key] + 1} and {index + 1}); each subject "
                f"needs its own word of the prompt {prompt!r}: name them differently, e.g. 'a black dog and a white "
                "puppy' with the words 'dog' and 'puppy'")
        seen[key] = index
    lowered = prompt.lower()
    spans = []
    for index, word in enumerate(words):
        key = _word_key(word)
        if match == OFFICIAL_SUBSTRING:
            pattern = re.escape(word.strip().lower())
        else:
            pattern = r"(?<!\w)" + r"\s+".join(re.escape(part) for part in key.split()) + r"(?!\w)"
        spans += [(m.start(), m.end(), index) for m in re.finditer(pattern, lowered)]
    spans.sort()
    for (start, end, a), (next_start, _, b) in zip(spans, spans[1:]):
        if next_start < end:
            raise PromptError(
                f"the subject words {words[a]!r} and {words[b]!r} overlap in the prompt {prompt!r} (at "
                f"{lowered[start:end]!r}); give words that name different parts of the prompt")
    pieces, cursor = [], 0
    for start, end, _ in spans:
        pieces += [lowered[cursor:start], PLACEHOLDER_WORD]
        cursor = end
    pieces.append(lowered[cursor:])
    return "".join(pieces), tuple(index for _, _, index in spans)


def _shown(prompt: str, limit: int = 80) -> str:
    return prompt if len(prompt) <= limit else prompt[:limit] + "..."


def placeholder_starts(ids: Sequence[int], placeholder_ids: Sequence[int]) -> list[int]:
    """Positions where the whole placeholder token sequence starts (one per placeholder word)."""
    n = len(placeholder_ids)
    ids = list(ids)
    return [i for i in range(len(ids) - n + 1) if ids[i:i + n] == list(placeholder_ids)]


@dataclass(frozen=True)
class SubjectsPrompt:
    """A prompt with several subjects, ready for encoding."""

    text: str
    """As tokenised (lower-cased, every subject word replaced by the placeholder)."""
    input_ids: torch.Tensor
    """(1, 77) int64."""
    placeholder_ids: tuple[int, ...]
    order: tuple[int, ...]
    """The subject index of each placeholder, in prompt order."""


def prepare_subjects_prompt(tokenizer: Any, prompt: str, words: Sequence[str], match: str = WHOLE_WORD,
                            vectors: int = NUM_MAPPER_LEVELS) -> SubjectsPrompt:
    """Substitute every subject word and tokenise; PromptError when any subject's vectors would not fit in CLIP's
    77 tokens after the splice (see :func:`subjects_prompt_fit`)."""
    text, order = substitute_subjects(prompt, words, match)
    placeholder = placeholder_token_ids(tokenizer)
    subjects_prompt_fit(tokenizer, text, placeholder, order, words, prompt, vectors)
    return SubjectsPrompt(text, tokenize(tokenizer, text), placeholder, order)


def subjects_prompt_fit(tokenizer: Any, text: str, placeholder_ids: tuple[int, ...], order: Sequence[int],
                        words: Sequence[str], prompt: str, vectors: int = NUM_MAPPER_LEVELS) -> list[str]:
    """The words of ``text`` that never reach the text encoder after every subject's splice (each placeholder's
    n tokens become ``vectors`` vectors, shifting the rest right), as a list (empty when everything fits).

    Raises:
        PromptError: the placeholder count differs from the subject words' (the prompt itself holds the
            placeholder word), or some subject's vectors would be cut at 77 tokens (naming the first such word).
    """
    full = [int(i) for i in tokenizer(text, verbose=False).input_ids]  # start, tokens, end
    starts = placeholder_starts(full, placeholder_ids)
    if len(starts) != len(order):
        raise PromptError(explain(f"the prompt must not contain the placeholder word {PLACEHOLDER_WORD!r} itself; got",
                                  prompt, f"remove {PLACEHOLDER_WORD!r} from the prompt"))
    grow = vectors - len(placeholder_ids)
    for k, (start, subject) in enumerate(zip(starts, order)):
        first = start + k * grow
        if first + vectors > MAX_TOKENS:
            raise PromptError(
                f"the prompt no longer fits CLIP's {MAX_TOKENS} tokens after splicing the subjects: the subject word "
                f"{words[subject]!r} (subject {subject + 1}) would get its {vectors} word vectors at tokens {first}-"
                f"{first + vectors - 1} (every subject word becomes {vectors} tokens; {len(full)} tokens before the "
                f"splice); shorten the prompt {_shown(prompt)!r} or mention the subjects earlier")
    lost = set()
    for position in range(1, len(full) - 1):
        if any(start <= position < start + len(placeholder_ids) for start in starts):
            continue
        shifted = position + grow * sum(start < position for start in starts)
        if shifted >= MAX_TOKENS:
            lost.add(position)
    if not lost:
        return []
    return dropped_words(tokenizer, full, lost)


def subjects_fit_warnings(tokenizer: Any, prompt: str, words: Sequence[str], match: str = WHOLE_WORD,
                          vectors: int = NUM_MAPPER_LEVELS) -> list[str]:
    """A warning naming the words CLIP never sees after the splice (empty when all fits); PromptError when a
    subject's vectors would be cut. One word: the single-subject rule (:func:`.text.prompt_fit_warnings`)."""
    if len(words) == 1:
        return prompt_fit_warnings(tokenizer, prompt, words[0], match, vectors)
    text, order = substitute_subjects(prompt, words, match)
    dropped = subjects_prompt_fit(tokenizer, text, placeholder_token_ids(tokenizer), order, words, prompt, vectors)
    if not dropped:
        return []
    shown = " ".join(dropped[:DROPPED_WORDS_SHOWN]) + (" ..." if len(dropped) > DROPPED_WORDS_SHOWN else "")
    return [f"the prompt does not fit CLIP's {MAX_TOKENS} tokens after splicing the subjects: {len(dropped)} word(s) "
            f"are dropped: '{shown}'; shorten the prompt to keep them"]


def splice_subjects(token_embeds: torch.Tensor, input_ids: torch.Tensor, placeholder_ids: Sequence[int],
                    order: Sequence[int], injected: Sequence[torch.Tensor]) -> torch.Tensor:
    """Replace each placeholder's tokens by its subject's word vectors, in prompt order.

    Args:
        token_embeds: (b, 77, d) token embeddings (before position embeddings).
        input_ids: (b, 77) token ids.
        placeholder_ids: the n token ids of the placeholder word.
        order: the subject index of each placeholder, in prompt order.
        injected: per subject (b, k, d) word vectors.

    Returns:
        (b, 77, d): the tokens with every placeholder's n tokens replaced by its subject's k vectors, the rest
        shifted right by k - n per earlier placeholder and truncated to 77 (refilled from the end when shorter).
    """
    total, n = token_embeds.shape[1], len(placeholder_ids)
    rows = []
    for b in range(token_embeds.shape[0]):
        starts = placeholder_starts(input_ids[b].tolist(), placeholder_ids)
        if len(starts) != len(order):
            raise PromptError(explain("placeholders found in the token ids vs subjects in the prompt",
                                      (len(starts), len(order)), "tokenise with prepare_subjects_prompt(...)"))
        pieces, cursor = [], 0
        for start, subject in zip(starts, order):
            pieces += [token_embeds[b, cursor:start], injected[subject][b].to(token_embeds.dtype)]
            cursor = start + n
        pieces.append(token_embeds[b, cursor:])
        row = torch.cat(pieces)[:total]
        if row.shape[0] < total:
            row = torch.cat([row, token_embeds[b, row.shape[0] - total:]])
        rows.append(row)
    return torch.stack(rows)


def spliced_subjects_positions(input_ids: torch.Tensor, placeholder_ids: Sequence[int], order: Sequence[int],
                               vectors: int) -> list[int]:
    """Where each of the 77 positions of the several-subjects splice comes from, by :func:`splice_subjects` itself:
    ``p >= 0`` the token at position ``p`` of ``input_ids``, ``-(i * vectors + j + 1)`` word vector ``j`` of subject
    ``i`` (the several-subjects twin of :func:`.text.spliced_positions`, for hosts that splice by token lists).

    Args:
        input_ids: (77,) or (1, 77) token ids of the substituted prompt; order: the subject of each placeholder.
    """
    ids = input_ids.reshape(1, -1)
    positions = torch.arange(ids.shape[1], dtype=torch.float64).view(1, -1, 1)
    markers = [-(torch.arange(vectors, dtype=torch.float64) + i * vectors + 1).view(1, vectors, 1)
               for i in range(max(order, default=-1) + 1)]
    return [int(p) for p in splice_subjects(positions, ids, placeholder_ids, order, markers).flatten().tolist()]


@torch.no_grad()
def encode_subjects_prompt(text_encoder: Any, tokenizer: Any, prompt: str, words: Sequence[str],
                           image_words: Sequence[torch.Tensor], match: str = WHOLE_WORD) -> tuple[torch.Tensor, str]:
    """Text states with every subject word replaced by its photo's word vectors.

    Args:
        words: the subject words; image_words: per subject (1, k, text width) from ``encode_image_prompt``.

    Returns:
        ((1, 77, text width) float32 states on the encoder's device, the text as tokenised). One subject: exactly
        :func:`.embeddings.encode_prompt` (the official splice).
    """
    from .embeddings import encode_prompt

    if len(words) != len(image_words):
        raise PromptError(explain("one set of word vectors per subject word; got (words, vector sets)",
                                  (len(words), len(image_words)), "encode every subject's photo"))
    if len(words) == 1:
        return encode_prompt(text_encoder, tokenizer, prompt, words[0], image_words[0], match)
    width = text_encoder.config.hidden_size
    for word, vectors in zip(words, image_words):
        if vectors.shape[-1] != width:
            raise PromptError(explain(f"the image embeddings of {word!r} have width {vectors.shape[-1]} but the text "
                                      "encoder has width", width, "use the text encoder of the mapper's model set"))
    spliced = prepare_subjects_prompt(tokenizer, prompt, words, match, image_words[0].shape[1])

    def splice(tokens: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return splice_subjects(tokens, input_ids, spliced.placeholder_ids, spliced.order,
                               [vectors.to(tokens.device) for vectors in image_words])

    states = encode_text(text_encoder, spliced.input_ids, splice=splice).last_hidden_state
    return states.float(), spliced.text


# -- fine: which image-prompt streams run ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FineInjection:
    """Which subjects' image-prompt streams run, and how.

    ``indices``: the subjects that contribute (strength not 0), in order. With one of them and no region,
    ``subject_strengths`` is None and ``strength`` is its strength: the official single-stream path, bit for bit.
    Otherwise ``subject_strengths``/``subject_regions`` hold one entry per index (the denoiser's several-subjects path).
    """

    indices: tuple[int, ...]
    strength: float = 1.0
    subject_strengths: tuple[float, ...] | None = None
    subject_regions: tuple[Region | None, ...] | None = None

    @property
    def image_prompt(self) -> bool:
        return bool(self.indices)


def plan_fine_injection(strengths: Sequence[float], regions: Sequence[Region | None]) -> FineInjection:
    """The fine injection of subjects with these strengths and regions (a subject with strength 0 runs no stream,
    so the result equals the run without it)."""
    indices = tuple(i for i, strength in enumerate(strengths) if float(strength) != 0.0)
    if len(indices) == 1 and regions[indices[0]] is None:
        return FineInjection(indices, strength=float(strengths[indices[0]]))
    if not indices:
        return FineInjection(())
    return FineInjection(indices, subject_strengths=tuple(float(strengths[i]) for i in indices),
                         subject_regions=tuple(regions[i] for i in indices))


def check_subjects(request: Any, tokenizer: Any = None,
                   check_strength: Callable[[Any], Any] | None = None) -> list[str]:
    """Validate a request's subjects (words, photos, masks, boxes, strengths, regions, the prompt's splice) before
    any model loads; returns the prompt-fit warnings (with ``tokenizer``). ``check_strength`` checks one strength
    (the settings table's ``image_prompt_strength`` rule)."""
    subjects = request_subjects(request)
    if request.subject_match not in SUBJECT_MATCHES:
        raise PromptError(f"unknown subject_match {request.subject_match!r}; choose one of "
                          f"{', '.join(SUBJECT_MATCHES)}")
    for number, subject in enumerate(subjects, start=1):
        if not isinstance(subject.word, str) or not subject.word.strip():
            raise PromptError(explain(f"subject {number}'s word must be the prompt's word naming it; got", subject.word,
                                      "e.g. Subject('dog', image)"))
        if subject.image is None:
            raise ImagePromptError(explain(f"subject {number} ({subject.word!r}) needs its photo; got", None,
                                           "give the image of the subject"))
        prepare_photo(request, subject.image, subject.mask, subject.bbox)
        if subject.strength is not None and check_strength is not None:
            check_strength(subject.strength)
        check_region(subject.region, f"region of subject {number} ({subject.word!r})")
    words = [subject.word for subject in subjects]
    substitute_subjects(request.prompt, words, request.subject_match)
    if tokenizer is None or not words:
        return []
    return subjects_fit_warnings(tokenizer, request.prompt, words, request.subject_match)


def plan_request_injection(request: Any, options: Any = None) -> FineInjection:
    """The fine injection of a request's subjects (:func:`request_subjects`): each one's strength (``options``'s
    ``image_prompt_strength``, the request's by default, when it has none) and region."""
    options = options if options is not None else request.options
    default = 1.0 if options is None else options.image_prompt_strength
    subjects = request_subjects(request)
    return plan_fine_injection([default if s.strength is None else float(s.strength) for s in subjects],
                               [check_region(s.region) for s in subjects])


def check_windowed_subjects(plan: FineInjection, settings: Any, names: Callable[[str], str]) -> None:
    """Several subjects' image-prompt streams and a long video (context windows) do not go together yet: refused
    before any model loads, on every road, in its words (``names``: a key's flag, jobs key or widget).
    ``settings``: the generation's (``frames``, ``context_window``)."""
    if plan.subject_strengths is not None and settings.frames > settings.context_window:
        raise SamplingError(explain(
            f"several subjects' image prompts and a long video (context windows) do not go together yet; "
            f"{names('frames')}", settings.frames,
            f"use at most {settings.context_window} frames (or a {names('context_window')} of {settings.frames} or "
            f"more), or give one subject a nonzero image-prompt strength and the others strength 0 "
            f"({names('subject_strength')}; their words keep their photos' vectors)"))


def prepare_photo(request: Any, image: torch.Tensor, mask: torch.Tensor | None,
                  bbox: Any) -> PreparedImagePrompt:
    """One subject's photo of ``request`` prepared (:func:`.image_prompt.prepare_image_prompt` with the request's
    padding), once per request: validation prepares it before any model loads and the conditioning takes the
    same result. It is kept in ``request.prepared_photos`` (shared by copies made with ``dataclasses.replace``,
    e.g. best of N's seeds), keyed by the photo and mask (the objects and their in-place version counters), the
    box and the padding, so a changed input is prepared anew."""
    from .image_prompt import prepare_image_prompt

    padding = request.image_prompt_padding
    cache = getattr(request, "prepared_photos", None)
    key = (id(image), getattr(image, "_version", None), id(mask), getattr(mask, "_version", None),
           None if bbox is None else tuple(bbox), padding)
    if cache is not None and key in cache and cache[key][0] is image and cache[key][1] is mask:
        return cache[key][2]
    prepared = prepare_image_prompt(image, mask, bbox, padding)
    if cache is not None:  # the photo and mask are held with it, so their ids cannot be reused
        cache[key] = (image, mask, prepared)
    return prepared


def prepare_photos(request: Any) -> list[PreparedImagePrompt]:
    """Every subject's photo of ``request`` (:func:`request_subjects` order) prepared, each once per request."""
    return [prepare_photo(request, s.image, s.mask, s.bbox) for s in request_subjects(request)]
