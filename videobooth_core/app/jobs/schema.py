"""The jobs file's schema: the keys a line may hold, and :class:`Job`, one validated line (its settings, its
record of what was asked, and the fingerprint a resume compares)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...settings import SETTINGS as GENERATION_SETTINGS
from ...settings import VIDEOCRAFTER_SETTINGS, Setting

DEFAULT_SUFFIX = ".gif"
ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")

SETTINGS: dict[str, Setting] = GENERATION_SETTINGS
"""Every setting a line may set, by key (``cfg``, ``steps``, ``single_frame_image_prompt``...): the command
line's flags, derived from :mod:`videobooth_core.settings`; a flag given with --jobs is every line's default."""
FINGERPRINT_V1_KEYS = ("negative", "frames", "width", "height", "steps", "sampler", "cfg", "guidance", "seed", "fps",
                       "spacing", "eta")
"""Settings of the first jobs format. Later settings enter a job's fingerprint only when they differ from their
default, so the done-records of earlier runs stay valid (a resume does not redo finished items)."""
SUBJECT_KEYS = ("prompt", "word", "image", "mask", "bbox", "subjects")
CLI_ONLY_FLAGS = {"prompt": "--prompt", "word": "--word", "image": "--image", "mask": "--mask", "bbox": "--bbox",
                  "out": "--out", "subject": "--subject"}
START_KEYS = {"start_image": "--start-image", "extend": "--extend"}
"""The video's first frames (image-to-video, extension): file paths on the lines, like ``image``."""
CLI_ONLY_FLAGS.update(START_KEYS)
PER_RUN_KEYS = ("dtype", "device", "models", "stream_weights", "allocator", "attention", "clip", "dino")
BEST_OF_KEYS = ("best_of", "rank_by")
"""Best of N, per line or from ``--best-of`` / ``--rank-by``; in the fingerprint only when N > 1 (so the
done-records of earlier runs stay valid)."""
SD_MODEL_KEYS = {"base_checkpoint": "base_checkpoint", "lora": "loras", "lora_kv": "lora_kv"}
"""``generate``'s SD 1.x flags (dest) and their jobs keys: every line's default, or set per line."""
LORA_KV_MODES = ("mapper", "ignore")
REFUSED_FLAGS: tuple[str, ...] = ()
"""Flags of ``generate`` that batch jobs refuse (none at present)."""
VIDEOBOOTH = "videobooth"
"""The family of a VideoBooth models folder; a VideoCrafter folder's jobs have its checkpoint's kind instead."""
VIDEOCRAFTER_KEYS = ("id", "out", "prompt", "start_image", *VIDEOCRAFTER_SETTINGS)
"""The keys of a jobs line for a VideoCrafter model: its prompt, its start image (image-to-video) and its settings
(:data:`videobooth_core.settings.VIDEOCRAFTER_SETTINGS`)."""
VIDEOCRAFTER_LATER_KEYS = ("context_window", "context_overlap", "context_fuse")
"""VideoCrafter settings added after its first jobs format: in a fingerprint only when they differ from their
default (as :data:`FINGERPRINT_V1_KEYS` for VideoBooth), so earlier runs' done-records stay valid."""


def settings_of(family: str) -> dict[str, Setting]:
    """The settings table of a family's lines: VideoBooth's, or VideoCrafter's for any VideoCrafter kind."""
    return SETTINGS if family == VIDEOBOOTH else VIDEOCRAFTER_SETTINGS


@dataclass(frozen=True)
class Job:
    """One validated line of the jobs file."""

    index: int
    """Position among the jobs (0-based); sharding uses it."""
    line: int
    """1-based line number in the jobs file."""
    id: str
    out: str
    """Output path relative to --out-dir (posix separators)."""
    prompt: str
    word: str | None
    image: str | None
    """Absolute path."""
    mask: str | None
    bbox: tuple[float, float, float, float] | None
    settings: dict[str, Any]
    """Every key of :data:`SETTINGS` (the line's value, else the command line's, else the default)."""
    best_of: int = 1
    """Candidates generated (seeds seed, seed + 1, ...); the best by ``rank_by`` is written. 1: plain."""
    rank_by: str = "dino"
    base_checkpoint: str | None = None
    """Absolute path of an SD 1.x checkpoint (file or diffusers UNet folder) for the spatial layers."""
    loras: tuple[tuple[str, float], ...] = ()
    """(absolute path, strength) of each LoRA, applied in order."""
    lora_kv: str | None = None
    """``mapper``, ``ignore`` or None (each loader's default, see ``--lora-kv``)."""
    subjects: tuple[dict[str, Any], ...] = ()
    """More subjects (:mod:`.subjects` entries: word, absolute image/mask paths, strength, region, bbox)."""
    start_image: str | None = None
    """Absolute path of the image the video starts with (image-to-video)."""
    extend: str | None = None
    """Absolute path of the video continued from its last ``extend_frames`` frames."""
    family: str = VIDEOBOOTH
    """``videobooth``, or the kind of the VideoCrafter checkpoint that runs the line (``videocrafter2``...)."""
    model: str | None = None
    """A VideoCrafter line: the checkpoint's file name (in the fingerprint: another model redoes the line)."""

    def inputs(self) -> dict[str, Any]:
        """The line's inputs for the one request builder (:func:`videobooth_core.app.request.build_request`, or
        ``build_videocrafter_request`` for a VideoCrafter line): prompt, subject, start frames (absolute paths)
        and every setting, by key."""
        if self.family != VIDEOBOOTH:
            return {"prompt": self.prompt, "start_image": self.start_image, **self.settings}
        return {"prompt": self.prompt, "word": self.word, "image": self.image, "mask": self.mask, "bbox": self.bbox,
                "subjects": list(self.subjects), "start_image": self.start_image, "extend": self.extend,
                **self.settings}

    @property
    def latents(self) -> str | None:
        """The latents file the job writes beside its output (``save_latents``; posix, relative to --out-dir), or
        None."""
        if not self.settings.get("save_latents"):
            return None
        from ...latents_file import latents_path

        return latents_path(self.out).as_posix()

    @property
    def styled(self) -> bool:
        return self.base_checkpoint is not None or bool(self.loras)

    def describe(self) -> dict[str, Any]:
        """The job's full settings, as recorded in done-records and the manifest (best of N only when N > 1,
        the SD 1.x style files only when some are set)."""
        if self.family != VIDEOBOOTH:
            start = {"start_image": self.start_image} if self.start_image else {}
            # save_latents only when on: the records (and fingerprints) of earlier runs stay valid
            settings = {key: value for key, value in self.settings.items() if key != "save_latents" or value}
            return {"family": self.family, "model": self.model, "prompt": self.prompt, **start, **settings}
        best_of = {"best_of": self.best_of, "rank_by": self.rank_by} if self.best_of > 1 else {}
        styles = {"base_checkpoint": self.base_checkpoint, "loras": [list(lora) for lora in self.loras],
                  "lora_kv": self.lora_kv} if self.styled else {}
        subjects = {"subjects": [{key: list(v) if isinstance(v, tuple) else v for key, v in entry.items()}
                                 for entry in self.subjects]} if self.subjects else {}  # old records stay valid
        start = {key: getattr(self, key) for key in START_KEYS if getattr(self, key)}  # old records stay valid
        return {"prompt": self.prompt, "word": self.word, "image": self.image, "mask": self.mask,
                "bbox": list(self.bbox) if self.bbox else None, **subjects, **start, **self.settings, **best_of, **styles}

    def fingerprint(self, dtype: str) -> str:
        """Hash of everything that determines the output (so a changed line is redone, not skipped); a style
        file counts by its size and modification time (cheap, and a replaced file is noticed)."""
        spec = {key: value for key, value in self.describe().items()
                if self.family != VIDEOBOOTH or key not in SETTINGS or key in FINGERPRINT_V1_KEYS
                or value != SETTINGS[key].default}
        if self.family != VIDEOBOOTH:
            spec = {key: value for key, value in spec.items()
                    if key not in VIDEOCRAFTER_LATER_KEYS or value != VIDEOCRAFTER_SETTINGS[key].default}
        spec.update(out=self.out, dtype=dtype)
        if self.styled:
            files = [self.base_checkpoint] * bool(self.base_checkpoint) + [path for path, _ in self.loras]
            spec["style_files"] = [_file_signature(path) for path in files]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _file_signature(path: str) -> list[Any]:
    """[[name in the folder or "", size, mtime_ns]] of a file or of every file of a (diffusers) folder; [] when it
    is gone (the job is then redone)."""
    p = Path(path)
    try:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        return [[f.relative_to(p).as_posix() if p.is_dir() else "", f.stat().st_size, f.stat().st_mtime_ns]
                for f in files]
    except OSError:
        return []

