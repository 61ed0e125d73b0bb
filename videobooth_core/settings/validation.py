"""The one validation of a generation before any model loads (:func:`check_request`, every road calls it), the
tokenizer it measures prompts with, and :func:`log_once` for its warnings."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from ..errors import ImagePromptError, VideoBoothError
from ..sampling.known_frames import check_long_video
from .constants import TRAINED_FRAMES, TRAINED_SIZE
from .device import check_device
from .generation import SETTINGS, flag_names
from .table import Names


def load_prompt_tokenizer(models_dir: str | Path) -> Any:
    """The CLIP tokenizer of a models folder (cheap: two text files), to check prompts before any model loads."""
    from ..conditioning.tokenizer import load_clip_tokenizer
    from ..loading.models_dir import check_models_dir, find_tokenizer_dir

    return load_clip_tokenizer(find_tokenizer_dir(check_models_dir(models_dir)))


def check_request(request: Any, tokenizer: Any = None, device: Any = None, *, names: Names | None = None,
                  fine_injection: Any = None) -> list[str]:
    """Validate one generation before any model is loaded; return the warnings (not logged here). Every road
    calls it: the pipeline (:meth:`GenerationRequest.validate`), so the Python API; the command line and batch
    jobs through the one request builder (:func:`videobooth_core.app.request.build_request`); the Sampler node.

    ``request`` is a :class:`GenerationSettings` with ``prompt``, ``subject_word``, ``image``, ``mask``, ``bbox``
    and ``subjects`` (the pipeline's GenerationRequest). With ``tokenizer`` the prompts are checked against CLIP's
    77 tokens after the subject splice; with ``device`` the device must exist on this machine. The photos are
    prepared here, once per request (:func:`conditioning.subjects.prepare_photo` keeps them for the
    conditioning). ``names``: how the caller's road names the inputs in messages (:data:`Names`; the flags when
    None). ``fine_injection``: the plan of the image-prompt streams when the caller made it without photos (the
    Sampler node, from its exemplars); otherwise it is planned from the request's subjects.

    Raises:
        VideoBoothError: SamplingError, ImagePromptError or PromptError naming the value and the fix.
    """
    from ..conditioning.subjects import check_subjects, check_windowed_subjects, plan_request_injection, prepare_photo
    from ..conditioning.text import prompt_fit_warnings, substitute_subject

    def say(key: str) -> str:  # the road's name, else the setting's label; the flags when no road is named
        if names is None:
            return flag_names(key)
        return names(key) or (SETTINGS[key].label if key in SETTINGS else key)

    if device is not None:
        check_device(device)
    request.check(names)
    check_long_video(request, say)
    has_image, has_word = request.image is not None, request.subject_word is not None
    if has_image != has_word:
        raise ImagePromptError(
            "an image prompt needs both the image and the subject word (the prompt's word naming the subject); "
            f"got {'an image without a subject word' if has_image else f'the subject word {request.subject_word!r} without an image'}; "
            f"give both ({say('image')} and {say('word')}), or neither for text-to-video")
    if not has_image and (request.mask is not None or request.bbox is not None):
        given = " and ".join(n for n, v in (("a mask", request.mask), ("a bbox", request.bbox)) if v is not None)
        raise ImagePromptError(f"{given} without an image: the mask and the bbox select the subject in its photo; "
                               f"give the photo too ({say('image')} and {say('word')}), or drop them for "
                               "text-to-video")
    if not isinstance(request.prompt, str):
        raise VideoBoothError(f"the prompt must be a string, got {type(request.prompt).__name__}")
    if has_image:
        prepare_photo(request, request.image, request.mask, request.bbox)
        substitute_subject(request.prompt, request.subject_word, request.subject_match)
    warnings = []
    subjects = getattr(request, "subjects", None)
    if subjects:  # several subjects: each checked, the prompt measured after every splice
        warnings += check_subjects(request, tokenizer, SETTINGS["image_prompt_strength"].check)
    elif tokenizer is not None:
        warnings += prompt_fit_warnings(tokenizer, request.prompt, request.subject_word if has_image else None,
                                        request.subject_match)
    if fine_injection is None and subjects:
        fine_injection = plan_request_injection(request)
    if fine_injection is not None:
        check_windowed_subjects(fine_injection, request, say)
    if tokenizer is not None:
        warnings += prompt_fit_warnings(tokenizer, request.negative_prompt, what="negative prompt")
    if request.frames > max(TRAINED_FRAMES, request.context_window):
        warnings.append(f"{request.frames} frames: the model was trained on {TRAINED_FRAMES}, so the video is denoised "
                        f"in overlapping windows of {request.context_window} frames that all attend to frame 0 and the "
                        "image prompt (motion may drift or repeat from window to window; see "
                        f"{say('context_overlap')})")
    elif request.frames > TRAINED_FRAMES:
        warnings.append(f"{request.frames} frames: the model was trained on {TRAINED_FRAMES}, so longer videos are an "
                        f"extrapolation (they tend to repeat or lose the subject); {say('context_window')} "
                        f"{TRAINED_FRAMES} denoises them in windows of the trained length")
    if (request.width, request.height) != (TRAINED_SIZE, TRAINED_SIZE):
        warnings.append(f"{request.width}x{request.height}: the model was trained at {TRAINED_SIZE}x{TRAINED_SIZE}, "
                        "so other sizes are an extrapolation (expect less coherent frames)")
    return warnings


_PACKAGE = __name__.rpartition(".")[0]
"""``videobooth_core.settings``: the logger of the warnings that name no other (as before the package was split)."""


@functools.lru_cache(maxsize=1024)
def log_once(message: str, name: str = _PACKAGE) -> None:
    """Log a warning once per process: the command line validates before loading the models and the pipeline
    validates again before sampling, and the user needs to read each warning once."""
    logging.getLogger(name).warning(message)
