"""The one request builder: a generation's inputs, named as the jobs lines' keys and the command line's flags'
dests name them, become a validated :class:`~videobooth_core.pipeline.GenerationRequest`. The command line, batch
jobs and the Python API build their requests here, so they read the same files the same way and refuse the same
things before any model loads; only the words of their messages differ (``names``: flags, jobs keys).

    # this module's build_request, as the README's Python API section imports it
    request = build_request({"prompt": "a dog running on the beach", "word": "dog", "image": "dog.png", "cfg": 6,
                             "subjects": [{"word": "cat", "image": "cat.png", "strength": 0.8}]})
    pipe.generate(request)

The inputs (:data:`INPUT_KEYS`): ``prompt``, ``word``, ``image``, ``mask`` (file paths; a cut-out's alpha is its
mask), ``bbox`` (x1, y1, x2, y2 pixels), ``subjects`` (entries ``{word, image, mask?, strength?, region?, bbox?}``,
see :mod:`.subjects`), ``start_image`` and ``extend`` (the video's first frames, see :mod:`.long_video`), and every
setting of :data:`videobooth_core.settings.SETTINGS` by its key; a missing or None input keeps its default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import PromptError, VideoBoothError
from ..settings import SETTINGS, Names, check_settings_values, flag_names, settings_kwargs

INPUT_KEYS = ("prompt", "word", "image", "mask", "bbox", "subjects", "start_image", "extend")
"""A generation's inputs besides its settings, by jobs key (the command line's dests, ``--subject`` aside)."""


def build_request(values: Mapping[str, Any], *, names: Names = flag_names,
                  resolve: Callable[[str], str | Path] | None = None, tokenizer: Any = None, device: Any = None,
                  validate: bool = True):
    """The :class:`~videobooth_core.pipeline.GenerationRequest` of ``values`` (:data:`INPUT_KEYS` and settings by
    key): every given setting checked on its own before any file is read, the photos, masks, subjects and start
    frames read (relative paths through ``resolve``), then, with ``validate``, the one validation
    (:meth:`GenerationRequest.validate`: with ``tokenizer`` the prompts' fit in CLIP's 77 tokens, with ``device``
    that it exists here), which prepares the photos once for the generation.

    Raises:
        VideoBoothError: naming the input as ``names`` calls it (``--cfg`` on the command line, ``'cfg'`` on a jobs
        line) and the fix.
    """
    from ..conditioning.image_prompt import load_mask, load_subject
    from ..pipeline import GenerationRequest

    unknown = sorted(set(values) - set(INPUT_KEYS) - set(SETTINGS))
    if unknown:
        raise VideoBoothError(f"unknown input(s) {', '.join(unknown)}; the inputs are {', '.join(INPUT_KEYS)} and "
                              f"the settings {', '.join(SETTINGS)}")
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"{names('prompt')} is required: describe the video, e.g. 'a dog running on the beach'")
    settings = check_settings_values({key: values[key] for key in SETTINGS if values.get(key) is not None}, names)

    def path(given: Any) -> Any:
        return given if given is None or resolve is None else resolve(given)

    image, mask = values.get("image"), values.get("mask")
    if image is not None:
        image, mask = load_subject(path(image), path(mask))
    elif mask is not None:  # refused by the validation, which names the missing photo
        mask = load_mask(path(mask))
    bbox = values.get("bbox")
    request = GenerationRequest(prompt=prompt, subject_word=values.get("word"), image=image, mask=mask,
                                bbox=None if bbox is None else tuple(bbox), **settings_kwargs(settings))
    if values.get("subjects"):
        from .subjects import load_subjects

        request.subjects = load_subjects(values["subjects"], resolve)
    if values.get("start_image") is not None or values.get("extend") is not None:
        from .long_video import start_frames_from

        request.start_frames = start_frames_from(path(values.get("start_image")), path(values.get("extend")),
                                                 request.extend_frames, names)
    if validate:
        request.validate(tokenizer, device, names=names)
    return request


VIDEOCRAFTER_INPUT_KEYS = ("prompt", "start_image")
"""A VideoCrafter generation's inputs besides its settings (:data:`~videobooth_core.settings.VIDEOCRAFTER_SETTINGS`):
the prompt, and for the image-to-video model the start image (a file path)."""


def build_videocrafter_request(values: Mapping[str, Any], *, names: Names = flag_names,
                               resolve: Callable[[str], str | Path] | None = None):
    """The :class:`~videobooth_core.videocrafter_pipeline.VideoCrafterRequest` of ``values``
    (:data:`VIDEOCRAFTER_INPUT_KEYS` and the VideoCrafter settings by key; a missing or None setting takes the
    family's own default, the checkpoint kind's for width, height and fps): every setting checked by its range
    before the start image is read (a relative path through ``resolve``). What depends on the checkpoint kind
    (the size multiple, a start image for image-to-video only) is checked by ``videocrafter_pipeline.check_request``.

    Raises:
        VideoBoothError: naming the input as ``names`` calls it and the fix.
    """
    from ..settings import VIDEOCRAFTER_SETTINGS
    from ..videocrafter_pipeline import VideoCrafterRequest

    unknown = sorted(set(values) - set(VIDEOCRAFTER_INPUT_KEYS) - set(VIDEOCRAFTER_SETTINGS))
    if unknown:
        raise VideoBoothError(f"unknown input(s) of a VideoCrafter model {', '.join(map(names, unknown))}; its inputs "
                              f"are {', '.join(VIDEOCRAFTER_INPUT_KEYS)} and the settings "
                              f"{', '.join(VIDEOCRAFTER_SETTINGS)}")
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"{names('prompt')} is required: describe the video, e.g. 'a panda playing guitar'")
    settings = {VIDEOCRAFTER_SETTINGS[key].name: value for key, value in values.items()
                if key in VIDEOCRAFTER_SETTINGS and value is not None}
    request = VideoCrafterRequest(prompt=prompt, **settings)
    request.check(names)
    start = values.get("start_image")
    if start is not None:
        from ..conditioning.image_prompt import load_image

        request.start_image = load_image(start if resolve is None else resolve(start))
    return request
