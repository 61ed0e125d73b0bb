"""Several subjects on the command line and in batch jobs, read into the same entries.

Command line (repeatable)::

    --subject WORD IMAGE [MASK] [strength=S] [region=X1,Y1,X2,Y2] [bbox=X1,Y1,X2,Y2]

Jobs line: ``"subjects": [{"word": "dog", "image": "dog.png", "mask": "dog_mask.png", "strength": 0.8,
"region": [0, 0, 0.5, 1], "bbox": [10, 20, 200, 220]}, ...]`` (only ``word`` and ``image`` are required).

``strength``: the subject's image-prompt strength (default ``--image-prompt-strength``; 0 runs no image-prompt
stream for it, its word keeps the photo's vectors); ``region``: where in the video its features act, as fractions
of the frame (default: everywhere); ``bbox``: the subject's box in its photo, in pixels (default: from the mask).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ImagePromptError

SUBJECT_FIELDS = ("word", "image", "mask", "strength", "region", "bbox")
OPTION_KEYS = ("strength", "region", "bbox")
FLAG_FORMAT = "--subject WORD IMAGE [MASK] [strength=S] [region=X1,Y1,X2,Y2] [bbox=X1,Y1,X2,Y2]"


SubjectArgumentError = ImagePromptError
"""A ``--subject`` flag or a jobs line's ``subjects`` entry that cannot be read."""


def _numbers(value: Any, count: int, what: str) -> list[float]:
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != count
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise SubjectArgumentError(f"{what} must be {count} finite numbers, got {json.dumps(value, default=str)}")
    return [float(v) for v in value]


def parse_subject_argument(tokens: Sequence[str]) -> dict[str, Any]:
    """One ``--subject`` flag's values → an entry ``{word, image, mask?, strength?, region?, bbox?}``."""
    tokens = list(tokens)
    positional = [t for t in tokens if "=" not in t]
    options = [t for t in tokens if "=" in t]
    if not 2 <= len(positional) <= 3 or tokens[:len(positional)] != positional:
        raise SubjectArgumentError(
            f"--subject {' '.join(tokens)}: expected {FLAG_FORMAT}, e.g. --subject dog dog.png dog_mask.png "
            "strength=0.8 region=0,0,0.5,1")
    entry: dict[str, Any] = dict(zip(("word", "image", "mask"), positional))
    for option in options:
        key, _, value = option.partition("=")
        if key not in OPTION_KEYS:
            raise SubjectArgumentError(f"--subject {' '.join(tokens)}: unknown option {key!r}; the options are "
                                       f"{', '.join(k + '=' for k in OPTION_KEYS)} ({FLAG_FORMAT})")
        try:
            parsed = [float(v) for v in value.split(",")]
        except ValueError:
            raise SubjectArgumentError(f"--subject {' '.join(tokens)}: {key}={value} is not a number list; e.g. "
                                       "strength=0.8 or region=0,0,0.5,1") from None
        entry[key] = parsed[0] if key == "strength" and len(parsed) == 1 else parsed
    return check_subject_entry(entry, "--subject " + " ".join(tokens))


def check_subject_entry(entry: Any, where: str, resolve: Callable[[str], str] | None = None) -> dict[str, Any]:
    """A subjects entry's keys and value types (files are read later); paths through ``resolve``."""
    if not isinstance(entry, dict):
        raise SubjectArgumentError(f"{where}: each subject must be an object like {{\"word\": \"dog\", \"image\": "
                                   f"\"dog.png\"}}, got {json.dumps(entry, default=str)}")
    unknown = [key for key in entry if key not in SUBJECT_FIELDS]
    if unknown:
        raise SubjectArgumentError(f"{where}: unknown subject key {unknown[0]!r}; the keys are "
                                   f"{', '.join(SUBJECT_FIELDS)}")
    word = entry.get("word")
    if not isinstance(word, str) or not word.strip():
        raise SubjectArgumentError(f"{where}: a subject's 'word' must be the prompt's word naming it, got "
                                   f"{json.dumps(word, default=str)}")
    checked: dict[str, Any] = {"word": word}
    for key in ("image", "mask"):
        value = entry.get(key)
        if value is None:
            if key == "image":
                raise SubjectArgumentError(f"{where}: subject {word!r} needs its 'image' (the photo of the subject)")
            continue
        if not isinstance(value, str) or not value:
            raise SubjectArgumentError(f"{where}: subject {word!r}: {key!r} must be a file path, got "
                                       f"{json.dumps(value)}")
        checked[key] = resolve(value) if resolve is not None else value
    strength = entry.get("strength")
    if strength is not None:
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
            raise SubjectArgumentError(f"{where}: subject {word!r}: 'strength' must be a number, got "
                                       f"{json.dumps(strength)}")
        checked["strength"] = float(strength)
    if entry.get("region") is not None:
        checked["region"] = tuple(_numbers(entry["region"], 4, f"{where}: subject {word!r}: 'region' (x1, y1, x2, y2 "
                                                                   "fractions of the video frame)"))
    if entry.get("bbox") is not None:
        checked["bbox"] = tuple(_numbers(entry["bbox"], 4, f"{where}: subject {word!r}: 'bbox' (x1, y1, x2, y2 pixels "
                                                               "in its photo)"))
    return checked


def load_subjects(entries: Sequence[dict[str, Any]], resolve: Callable[[str], Any] | None = None) -> list[Any]:
    """Checked entries → :class:`~videobooth_core.conditioning.subjects.Subject` list (photos and masks read; a
    cut-out's alpha is its mask)."""
    from ..conditioning.image_prompt import load_subject
    from ..conditioning.subjects import Subject

    subjects = []
    for entry in entries:
        path = (lambda p: resolve(p) if resolve is not None and p is not None else p)
        image, mask = load_subject(path(entry["image"]), path(entry.get("mask")))
        subjects.append(Subject(entry["word"], image, mask, entry.get("bbox"), entry.get("strength"),
                                entry.get("region")))
    return subjects
