"""Batch generation: ``python -m videobooth_core generate --models DIR --jobs FILE.jsonl --out-dir OUT``.

The jobs file holds one JSON object per line, with keys named like the command line's flags::

    {"id": "dog", "prompt": "a dog running on the beach", "word": "dog", "image": "dog.jpg", "mask": "dog_mask.png"}
    {"prompt": "a cat sleeping on a sofa", "frames": 16, "steps": 50, "seed": 3, "out": "cat.mp4"}

Keys: ``prompt`` (required), ``word``, ``image``, ``mask``, ``bbox`` ([x1, y1, x2, y2]), ``subjects`` (several
subjects: ``[{"word", "image", "mask"?, "strength"?, "region"?, "bbox"?}, ...]``, see :mod:`.subjects`), ``out``, ``id``, and
every setting of :data:`videobooth_core.settings.SETTINGS` under its flag's name: ``negative``, ``frames``,
``width``, ``height``, ``steps``, ``sampler``, ``spacing``, ``eta``, ``cfg``, ``guidance``, ``seed``, ``padding``,
``subject_match``, ``fps``, ``single_frame_image_prompt`` (true/false), ``image_prompt_steps`` ([start, end]),
``watermark_branch`` (false = ``--no-watermark-branch``) and ``image_prompt_strength``; and best of N,
``best_of`` (N seeds: seed, seed + 1, ...; the best is written) and ``rank_by`` (``dino``, ``clip-i``,
``clip-t``); and SD 1.x styles, ``base_checkpoint`` (a file or diffusers UNet folder), ``loras`` (a list of
``[path, strength]`` or ``"path:strength"``) and ``lora_kv`` (``mapper`` or ``ignore``), applied before the
line generates and undone exactly after it, so lines never leak styles into each other (the files' sizes and
modification times enter the resume fingerprint; ``--base-checkpoint``, ``--lora`` and ``--lora-kv`` set every
line's default). Settings a line leaves out come from the command line (``--steps 50`` sets every job's default);
``--dtype``, ``--device``, ``--stream-weights`` and the metric models ``--clip`` and ``--dino`` hold for the
whole run (the metric models load once per rank, and only if some job of the rank ranks by them). ``id``
defaults to the line number, zero-padded (``00001``); ``out`` defaults to ``<id>.gif`` and is relative to
``--out-dir`` (``.mp4``, ``.gif``, ``.webp``, or no suffix for a folder of PNG frames). Relative image and
mask, checkpoint and LoRA paths are resolved against the jobs file's folder. Blank lines are ignored.
Long videos: ``context_window``, ``context_overlap``, ``context_fuse``, ``noise_reuse`` (settings), and the
first frames, ``start_image`` (an image) or ``extend`` (a video continued from its last ``extend_frames``
frames), paths like ``image``.

Every line is validated (JSON, keys, values, images, masks, style files' existence, subject words, the
prompt's fit in CLIP's 77 tokens with the models folder's tokenizer) and the device checked before anything is
written or any model loads: the first problem ends the run with exit code 2 and one line naming the line number.

Under ``torchrun`` the jobs are sharded across the ranks (job ``i`` goes to rank ``i % WORLD_SIZE``), one
device per rank (``--device cuda`` becomes ``cuda:LOCAL_RANK``; CPU ranks work too). Each rank loads the
pipeline once, and only if it has work left.

Outputs. ``out`` names a new path inside ``--out-dir`` (relative, no ``..``, no hidden names, not the folder
itself). Before any model loads, every output that already exists is refused unless this job wrote it (its
done-record or its claim, see below, names it) or ``--overwrite`` is given; even then a folder is replaced
only when it holds nothing but PNG frames, so other jobs' and the user's files are never replaced.

Resuming. Before writing its output an item records a claim ``OUT/.videobooth/claims/<id>.json``; the output
is written atomically by :func:`video_io.write_frames`, then the done-record ``OUT/.videobooth/done/<id>.json``
(written atomically: temporary file, ``os.replace``). An item is skipped when its output and its done-record
both exist and the record's settings match the job's, so a killed run restarted with the same command redoes
only unfinished items; a job whose line changed is redone (replacing its own earlier output).
``OUT/manifest.json`` lists every finished item of the jobs file (id, output, seed, settings, seconds, rank; for
best of N, ``seed`` is the winner's, which alone reproduces the output, and ``best_of`` lists every candidate's
seed and scores, best first)
and every failed one (id, line, output, error); it is rebuilt from the records - under an exclusive file lock
(``filelock``), after every item and at the end, and by rank 0 once more after all ranks have finished - so
concurrent ranks never lose each other's entries. Temporary files left by a killed run (``.videobooth-*.partial``
files and folders) are removed on start, so one output folder serves one run at a time (the ranks of one
torchrun launch count as one run).

A job that fails at run time (out of memory; a failed write; a problem only visible with the models loaded) is
reported on its own ``error:`` line and recorded with its reason in ``OUT/.videobooth/failed/<id>.json`` and the
manifest's ``failed`` list; the other jobs go on, the run exits with 1 and the next run retries it. Missing or
broken weights end the run (exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..errors import JobsError, OutputError, VideoBoothError, explain, out_of_memory
from ..files import check_target, is_temporary, write_json_atomic
from ..settings import SETTINGS as GENERATION_SETTINGS
from ..settings import Setting, check_device, load_prompt_tokenizer, settings_kwargs

logger = logging.getLogger(__name__)

STATE_DIR = ".videobooth"
"""Folder (inside --out-dir) holding the done-records, claims, failure records and the manifest lock."""
DONE_DIR = f"{STATE_DIR}/done"
CLAIMS_DIR = f"{STATE_DIR}/claims"
"""Written before an item's output: proves on a rerun that an output without a done-record is this job's."""
FAILED_DIR = f"{STATE_DIR}/failed"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
"""2: the manifest gained the ``failed`` list."""
DEFAULT_SUFFIX = ".gif"
VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")
ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
DIST_TIMEOUT = timedelta(days=7)
"""Ranks wait for each other at the end; a shard can take hours with real weights (torchrun stops every
rank as soon as one fails, so a long timeout never leaves a rank hanging on a dead one)."""

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

    @property
    def styled(self) -> bool:
        return self.base_checkpoint is not None or bool(self.loras)

    def describe(self) -> dict[str, Any]:
        """The job's full settings, as recorded in done-records and the manifest (best of N only when N > 1,
        the SD 1.x style files only when some are set)."""
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
                if key not in SETTINGS or key in FINGERPRINT_V1_KEYS or value != SETTINGS[key].default}
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


# -- reading and validating the jobs file -------------------------------------------------------------
def _check_value(key: str, value: Any, where: str) -> Any:
    """A line's JSON value converted to the setting's kind and checked against its range (settings.py)."""
    spec = SETTINGS[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.kind == "int":
        if not number or (isinstance(value, float) and not value.is_integer()):
            raise JobsError(f"{where}: {key!r} must be a whole number, got {json.dumps(value)}")
        value = int(value)
    elif spec.kind == "float":
        if not number:
            raise JobsError(f"{where}: {key!r} must be a number, got {json.dumps(value)}")
        value = float(value)
    elif spec.kind == "bool" and not isinstance(value, bool):
        raise JobsError(f"{where}: {key!r} must be true or false, got {json.dumps(value)}")
    elif spec.kind == "str" and not isinstance(value, str):
        raise JobsError(f"{where}: {key!r} must be a string, got {json.dumps(value)}")
    elif spec.kind == "pair":
        if not isinstance(value, list) or len(value) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise JobsError(f"{where}: {key!r} must be two numbers [start, end], got {json.dumps(value)}")
        value = (float(value[0]), float(value[1]))
    try:
        return spec.check(value)
    except VideoBoothError as error:
        raise JobsError(f"{where}: {error}") from None


def _check_out(out: Any, where: str) -> str:
    if not isinstance(out, str) or not out.strip():
        raise JobsError(f"{where}: 'out' must be a file name such as \"clip.mp4\", got {json.dumps(out)}")
    path = Path(out)
    if not path.parts or path.is_absolute() or ".." in path.parts or any(p.startswith(".") for p in path.parts):
        raise JobsError(explain(f"{where}: 'out' must name a new path inside --out-dir (relative, not the folder "
                                "itself, no '..' or hidden names)", out, 'e.g. "out": "clip.gif"'))
    if path.suffix and path.suffix.lower() not in VIDEO_SUFFIXES:
        raise JobsError(f"{where}: unsupported output {out!r}: use .mp4, .gif or .webp, or a name without a "
                        "suffix for a folder of PNG frames")
    return path.as_posix()


def _resolve(path: Any, key: str, base: Path, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise JobsError(f"{where}: {key!r} must be a file path, got {json.dumps(path)}")
    p = Path(path).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


def parse_line(obj: Any, index: int, line: int, base: Path, defaults: dict[str, Any]) -> Job:
    """Validate one decoded line (keys and value types; files are checked by :func:`check_job`)."""
    where = f"line {line}"
    if not isinstance(obj, dict):
        raise JobsError(f"{where}: expected a JSON object such as {{\"prompt\": \"...\"}}, got {type(obj).__name__}")
    allowed = ("id", "out", *SUBJECT_KEYS, *START_KEYS, *SETTINGS, *BEST_OF_KEYS, *SD_MODEL_KEYS.values())
    for key in obj:
        if key in PER_RUN_KEYS:
            raise JobsError(f"{where}: {key!r} is set for the whole run: use --{key.replace('_', '-')} on the command "
                            "line")
        if key not in allowed:
            raise JobsError(f"{where}: unknown key {key!r}; the keys are {', '.join(allowed)}")
    job_id = obj.get("id", f"{line:05d}")
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        job_id = str(job_id)
    if not isinstance(job_id, str) or not ID_PATTERN.match(job_id):
        raise JobsError(f"{where}: 'id' must be 1-100 letters, digits, '_', '-' or '.' (not starting with "
                        f"'.' or '-'), got {json.dumps(job_id)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise JobsError(f"{where}: 'prompt' is required: a non-empty string describing the video")
    word = obj.get("word")
    if word is not None and (not isinstance(word, str) or not word.strip()):
        raise JobsError(f"{where}: 'word' must be the prompt's word naming the subject, got {json.dumps(word)}")
    image = _resolve(obj["image"], "image", base, where) if obj.get("image") is not None else None
    mask = _resolve(obj["mask"], "mask", base, where) if obj.get("mask") is not None else None
    if (image is None) != (word is None):
        raise JobsError(f"{where}: 'image' and 'word' go together: give the subject's photo and the prompt's "
                        "word naming it, or neither for text-to-video")
    if image is None and (mask is not None or obj.get("bbox") is not None):
        raise JobsError(f"{where}: 'mask' and 'bbox' need an 'image'")
    bbox = obj.get("bbox")
    if bbox is not None:
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
            raise JobsError(f"{where}: 'bbox' must be 4 numbers [x1, y1, x2, y2] in pixels, got {json.dumps(bbox)}")
        bbox = tuple(float(v) for v in bbox)
    settings = {key: _check_value(key, obj[key], where) if key in obj else defaults[key] for key in SETTINGS}
    out = _check_out(obj.get("out", f"{job_id}{DEFAULT_SUFFIX}"), where)
    best_of, rank_by = _check_best_of(obj.get("best_of", defaults["best_of"]), obj.get("rank_by", defaults["rank_by"]),
                                      image is not None, where)
    base_checkpoint, loras, lora_kv = _check_sd_models(obj, base, defaults, where)
    subjects = _check_subjects(obj.get("subjects"), base, where)
    return Job(index=index, line=line, id=job_id, out=out, prompt=prompt, word=word, image=image, mask=mask,
               bbox=bbox, settings=settings, best_of=best_of, rank_by=rank_by, base_checkpoint=base_checkpoint,
               loras=loras, lora_kv=lora_kv, subjects=subjects,
               **{key: _resolve(obj[key], key, base, where) for key in START_KEYS if obj.get(key) is not None})


def _check_subjects(value: Any, base: Path, where: str) -> tuple[dict[str, Any], ...]:
    """A line's ``subjects``: a list of ``{word, image, mask?, strength?, region?, bbox?}`` (:mod:`.subjects`),
    paths resolved against the jobs file's folder."""
    from .subjects import check_subject_entry

    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise JobsError(f"{where}: 'subjects' must be a list of objects like {{\"word\": \"dog\", \"image\": "
                        f"\"dog.png\"}}, got {json.dumps(value)}")
    try:
        return tuple(check_subject_entry(entry, f"{where}: subjects[{i}]",
                                         lambda path: _resolve(path, "subjects", base, where))
                     for i, entry in enumerate(value))
    except JobsError:
        raise
    except VideoBoothError as error:
        raise JobsError(str(error)) from None


def _check_sd_models(obj: dict[str, Any], base: Path, defaults: dict[str, Any],
                     where: str) -> tuple[str | None, tuple[tuple[str, float], ...], str | None]:
    """A line's ``base_checkpoint``, ``loras`` and ``lora_kv`` (else the command line's), the files resolved
    against the jobs file's folder and checked to exist, so a typo fails before any model loads."""
    from ..loading.inputs import check_weight_input
    from ..loading.lora import parse_lora_argument
    from ..settings import check_lora_strength

    base_checkpoint = defaults.get("base_checkpoint")
    if "base_checkpoint" in obj and obj["base_checkpoint"] is not None:
        base_checkpoint = _resolve(obj["base_checkpoint"], "base_checkpoint", base, where)
    loras = defaults.get("loras", ())
    if "loras" in obj:
        value = obj["loras"]
        if not isinstance(value, list):
            raise JobsError(f"{where}: 'loras' must be a list of [path, strength] or \"path:strength\", got "
                            f"{json.dumps(value)}")
        parsed = []
        for item in value:
            if isinstance(item, str) and item:
                path, strength = parse_lora_argument(item)
            elif (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                  and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)):
                path, strength = item[0], float(item[1])
            else:
                raise JobsError(f"{where}: each of 'loras' must be [path, strength] or \"path:strength\", e.g. "
                                f"[\"style.safetensors\", 0.8], got {json.dumps(item)}")
            try:  # finite and in range, as on the command line (1e30 merged is a black video)
                check_lora_strength(strength, f"the strength of LoRA {path!r}")
            except VideoBoothError as error:
                raise JobsError(f"{where}: {error}") from None
            parsed.append((_resolve(path, "loras", base, where), strength))
        loras = tuple(parsed)
    lora_kv = obj.get("lora_kv", defaults.get("lora_kv"))
    if lora_kv is not None and lora_kv not in LORA_KV_MODES:
        raise JobsError(f"{where}: 'lora_kv' must be one of {', '.join(LORA_KV_MODES)}, got {json.dumps(lora_kv)}")
    for key, path in [("base_checkpoint", base_checkpoint)] * bool(base_checkpoint) + [("loras", p) for p, _ in loras]:
        if not Path(path).exists():
            raise JobsError(explain(f"{where}: {key!r} names a path that does not exist", path,
                                    "give the file's path (relative paths start at the jobs file's folder)"))
        try:  # readable and of its kind by its header, as on the command line (once per file)
            check_weight_input(path, key, "lora" if key == "loras" else key)
        except VideoBoothError as error:
            raise JobsError(f"{where}: {error}") from None
    return base_checkpoint, loras, lora_kv


def _check_best_of(best_of: Any, rank_by: Any, has_image: bool, where: str) -> tuple[int, str]:
    from ..evaluation.best_of import check_best_of

    try:
        return check_best_of(best_of, rank_by, has_image)
    except VideoBoothError as error:
        raise JobsError(f"{where}: {error} ('best_of', 'rank_by' or --best-of, --rank-by)") from None


def build_request(job: Job):
    """The pipeline request of ``job`` (images and masks loaded from disk; a cut-out's alpha is its mask)."""
    from ..conditioning.image_prompt import load_subject
    from ..pipeline import GenerationRequest

    image, mask = load_subject(job.image, job.mask) if job.image else (None, None)
    request = GenerationRequest(prompt=job.prompt, subject_word=job.word, image=image, mask=mask, bbox=job.bbox,
                                **settings_kwargs(job.settings))
    if job.subjects:
        from .subjects import load_subjects

        request.subjects = load_subjects(job.subjects)
    if job.start_image or job.extend:
        from .long_video import start_frames_from

        request.start_frames = start_frames_from(job.start_image, job.extend, request.extend_frames)
    return request


def check_job(job: Job, tokenizer: Any = None) -> None:
    """Everything that can be checked without the models (:meth:`GenerationRequest.validate`): settings,
    images, masks, boxes, the subject word, and with ``tokenizer`` the prompt's fit in CLIP's 77 tokens."""
    where = f"line {job.line} (job {job.id})"
    try:
        build_request(job).validate(tokenizer)
    except JobsError:
        raise
    except VideoBoothError as error:
        raise JobsError(f"{where}: {error}") from None


def _line_defaults(defaults: dict[str, Any] | None) -> dict[str, Any]:
    """Every setting's default for the lines: the command line's value where given (checked), else settings.py's."""
    merged = {}
    for key, spec in SETTINGS.items():
        value = (defaults or {}).get(key)
        if value is None:
            merged[key] = spec.default
            continue
        try:
            merged[key] = spec.check(tuple(value) if spec.kind == "pair" else value)
        except VideoBoothError as error:
            raise JobsError(f"{spec.flag} (the default of every job): {error}") from None
    merged.update({key: (defaults or {})[key] for key in ("base_checkpoint", "loras", "lora_kv")
                   if (defaults or {}).get(key) is not None})
    merged["best_of"] = (defaults or {}).get("best_of", 1)
    merged["rank_by"] = (defaults or {}).get("rank_by", "dino")
    from ..evaluation.best_of import check_best_of

    try:  # the lines' image is checked with each line
        check_best_of(merged["best_of"], merged["rank_by"], has_image=True)
    except VideoBoothError as error:
        raise JobsError(f"--best-of / --rank-by (the default of every job): {error}") from None
    return merged


def load_jobs(path: str | os.PathLike, defaults: dict[str, Any] | None = None, check_files: bool = True,
              tokenizer: Any = None, device: Any = None) -> list[Job]:
    """Read and validate every line of a jobs file; JobsError names the first bad line.

    ``defaults``: settings by key (the command line's flags). With ``check_files`` every job is also checked as
    :func:`check_job` does (with ``tokenizer``, the prompts against CLIP's 77 tokens); ``device`` must exist."""
    path = Path(path)
    if device is not None:
        check_device(device)
    defaults = _line_defaults(defaults)
    if not path.is_file():
        raise JobsError(f"jobs file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise JobsError(f"cannot read the jobs file {path} ({error}); it must be UTF-8 text, one JSON object per line") from None
    base = path.resolve().parent
    jobs: list[Job] = []
    ids: dict[str, int] = {}
    outs: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as error:
            raise JobsError(f"line {number} of {path.name} is not valid JSON ({error.msg} at column {error.colno})") from None
        job = parse_line(obj, len(jobs), number, base, defaults)
        if job.id in ids:
            raise JobsError(f"line {number}: id {job.id!r} is already used on line {ids[job.id]}; ids must be unique")
        out_key = job.out.lower()
        if out_key in outs:
            raise JobsError(f"line {number}: output {job.out!r} is already written by line {outs[out_key]}; "
                            "give each job its own 'out'")
        ids[job.id], outs[out_key] = number, number
        jobs.append(job)
    if not jobs:
        raise JobsError(f"the jobs file {path} holds no jobs: write one JSON object per line, e.g. "
                        '{"prompt": "a dog running on the beach"}')
    for out, number in outs.items():  # "clip" as a PNG folder and "clip/x.gif" inside it cannot both exist
        for parent in Path(out).parents:
            if parent.as_posix() in outs:
                raise JobsError(f"line {number}: output {out!r} lies inside the PNG folder {parent.as_posix()!r} "
                                f"of line {outs[parent.as_posix()]}")
    if check_files:
        for job in jobs:
            check_job(job, tokenizer)
        if any(job.out.lower().endswith(".mp4") for job in jobs):
            try:
                import imageio_ffmpeg  # noqa: F401
            except ImportError:
                raise JobsError("writing .mp4 needs the imageio-ffmpeg package: `pip install imageio-ffmpeg` "
                                "(or write .gif / .webp)") from None
    return jobs


# -- files -------------------------------------------------------------------------------------------------
def done_record_path(out_dir: Path, job_id: str) -> Path:
    return out_dir / DONE_DIR / f"{job_id}.json"


def _read_record(path: Path, job: Job) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("id") == job.id else None


def read_done_record(out_dir: Path, job: Job) -> dict[str, Any] | None:
    return _read_record(done_record_path(out_dir, job.id), job)


def finished_record(out_dir: Path, job: Job, dtype: str) -> dict[str, Any] | None:
    """The job's done-record if the job is finished: record and output exist and the settings match."""
    record = read_done_record(out_dir, job)
    if record is None or record.get("fingerprint") != job.fingerprint(dtype) or record.get("output") != job.out:
        return None
    return record if (out_dir / job.out).exists() else None


def failed_record(out_dir: Path, job: Job, dtype: str) -> dict[str, Any] | None:
    """The job's failure record if its last run failed with the job's current settings."""
    record = _read_record(out_dir / FAILED_DIR / f"{job.id}.json", job)
    return record if record is not None and record.get("fingerprint") == job.fingerprint(dtype) else None


def owns_output(out_dir: Path, job: Job) -> bool:
    """True if ``job`` (same id, same ``out``) wrote its existing output: its done-record or its claim names it."""
    for folder in (DONE_DIR, CLAIMS_DIR):
        record = _read_record(out_dir / folder / f"{job.id}.json", job)
        if record is not None and record.get("output") == job.out:
            return True
    return False


def check_outputs(out_dir: Path, jobs: list[Job], dtype: str, overwrite: bool = False) -> set[str]:
    """Refuse, before any model loads, every unfinished job whose output would replace something it did not
    write (a user's file or folder, another job's output) unless ``overwrite``, and any folder holding more than
    PNG frames. Returns the ids of the jobs allowed to replace their existing output."""
    from .video_io import is_frame_folder

    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(explain("--out-dir is a file, not a folder", out_dir, "name a folder for the outputs"))
    replace: set[str] = set()
    for job in jobs:
        target = out_dir / job.out
        if not (target.exists() or target.is_symlink()) or finished_record(out_dir, job, dtype) is not None:
            continue
        owned = owns_output(out_dir, job)
        if not (owned or overwrite):
            raise OutputError(explain(f"line {job.line} (job {job.id}): its output already exists in --out-dir and "
                                      "was not written by this job", job.out,
                                      "choose another 'out', or pass --overwrite to replace it"))
        try:
            check_target(target, overwrite=True, replaceable=is_frame_folder, folder=not Path(job.out).suffix)
        except OutputError as error:
            raise OutputError(f"line {job.line} (job {job.id}): {error}") from None
        replace.add(job.id)
    return replace


def cleanup_stale(out_dir: Path, jobs: list[Job]) -> list[Path]:
    """Remove temporary files of an interrupted run (``files.atomic_path``'s ``.videobooth-*.partial`` files and
    folders) next to the outputs and in the state folders. Call it before any rank starts writing."""
    folders = {out_dir, out_dir / DONE_DIR, out_dir / CLAIMS_DIR, out_dir / FAILED_DIR,
               *((out_dir / job.out).parent for job in jobs)}
    removed = []
    for folder in sorted(folders):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if is_temporary(entry):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()
                removed.append(entry)
    return removed


def _manifest_lock(out_dir: Path):
    """An exclusive lock serialising manifest rebuilds across ranks (and processes)."""
    from filelock import FileLock

    lock_path = out_dir / STATE_DIR / "manifest.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_path))


def rebuild_manifest(out_dir: Path, jobs: list[Job], jobs_file: Path, models: str, dtype: str) -> dict[str, Any]:
    """Rewrite ``manifest.json`` from the done- and failure records (atomically, under the lock). Every rank
    writes its records before rebuilding, and rebuilds are serialised, so the last rebuild lists every item."""
    with _manifest_lock(out_dir):
        items, pending, failed = [], [], []
        for job in jobs:
            record = finished_record(out_dir, job, dtype)
            if record is None:
                pending.append(job.id)
                failure = failed_record(out_dir, job, dtype)
                if failure is not None:
                    failed.append({k: failure.get(k) for k in ("id", "line", "output", "error", "failed_at")})
            else:
                items.append({k: v for k, v in record.items() if k != "fingerprint"})
        manifest = {
            "version": MANIFEST_VERSION,
            "jobs_file": str(jobs_file.resolve()),
            "models": str(Path(models).resolve()),
            "dtype": dtype,
            "total": len(jobs),
            "finished": len(items),
            "complete": not pending,
            "pending": pending,
            "failed": failed,
            "items": items,
            "updated_at": _now(),
        }
        write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- ranks and devices ------------------------------------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise JobsError(f"environment variable {name}={value!r} is not a whole number") from None


def rank_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when run directly."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise JobsError(f"inconsistent distributed environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def rank_device(device: str, local_rank: int, world: int) -> str:
    """``cuda`` (or ``cuda`` with several ranks) becomes ``cuda:LOCAL_RANK``; other devices stay as given."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise JobsError("--device cuda was given but no CUDA device is available; use --device cpu")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise JobsError(f"local rank {local_rank} has no GPU of its own: this machine has {count}; start at most "
                            f"{count} processes per node (torchrun --nproc_per_node {count})")
        return f"cuda:{local_rank}"
    if world > 1 and device.startswith("cuda:"):
        logger.warning("every rank uses %s; give --device cuda to use one GPU per rank", device)
    return device


@contextlib.contextmanager
def _process_group(world: int) -> Iterator[Any]:
    """torch.distributed (gloo: only barriers are needed, on CPU and GPU ranks alike) when WORLD_SIZE > 1."""
    if world <= 1:
        yield None
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise JobsError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise JobsError(f"WORLD_SIZE > 1 but {', '.join(missing)} is not set: launch with torchrun")
    dist.init_process_group(backend="gloo", timeout=DIST_TIMEOUT)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def _peak_memory(device: str) -> dict[str, float]:
    from .common import peak_memory_mb

    peak = {"peak_rss_mb": round(peak_memory_mb(), 1)}
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


# -- the run ----------------------------------------------------------------------------------------------
def _defaults_from(args: argparse.Namespace) -> dict[str, Any]:
    """Every line's defaults: the command line's setting flags (each setting's dest is its jobs key) and its
    SD 1.x style files (relative to the current folder, as every path on the command line)."""
    from ..loading.lora import parse_lora_argument

    defaults = {key: getattr(args, key) for key in (*SETTINGS, *BEST_OF_KEYS) if getattr(args, key, None) is not None}
    if getattr(args, "base_checkpoint", None):
        defaults["base_checkpoint"] = str(Path(args.base_checkpoint).expanduser().resolve())
    if getattr(args, "lora", None):
        defaults["loras"] = tuple((str(Path(path).expanduser().resolve()), strength)
                                  for path, strength in map(parse_lora_argument, args.lora))
    if getattr(args, "lora_kv", None):
        defaults["lora_kv"] = args.lora_kv
    return defaults


def _check_args(args: argparse.Namespace) -> None:
    for attr, flag in CLI_ONLY_FLAGS.items():
        if getattr(args, attr, None) is not None:
            raise JobsError(f"{flag} does not go with --jobs: put it on each line of the jobs file (key {attr!r})")


def run_jobs(args: argparse.Namespace) -> int:
    """Run a jobs file (see the module docstring). Returns 0 when every job of this rank finished, 1 when
    some failed (each failure is reported on its own line and retried by the next run)."""
    start = time.perf_counter()
    _check_args(args)
    from ..evaluation.cli import find_metric_models

    rank, world, local_rank = rank_info()
    jobs_file = Path(args.jobs)
    out_dir = Path(args.out_dir)
    dtype = getattr(args, "dtype", "fp32") or "fp32"
    # validates every line (with the models folder's tokenizer, cheap) and the device before anything is written
    jobs = load_jobs(jobs_file, _defaults_from(args), tokenizer=load_prompt_tokenizer(args.models),
                     device=getattr(args, "device", None))
    # before any model loads: no output replaces what this batch did not write (unless --overwrite)
    replace = check_outputs(out_dir, jobs, dtype, overwrite=getattr(args, "overwrite", False))
    device = rank_device(getattr(args, "device", "cpu") or "cpu", local_rank, world)
    tag = f"[rank {rank}/{world}] " if world > 1 else ""

    with _process_group(world) as dist:
        mine = [job for job in jobs if job.index % world == rank]
        todo, skipped = [], []
        for job in mine:  # read-only: a finished item has its output and a matching done-record
            if finished_record(out_dir, job, dtype) is not None:
                skipped.append(job)
                continue
            todo.append(job)
            if read_done_record(out_dir, job) is not None:
                print(f"{tag}redoing {job.id}: its line changed or its output is missing", file=sys.stderr)
        find_metric_models(args, _metric_needs(todo))  # best of N ranks with them: fail before any model loads
        print(f"{tag}{len(jobs)} jobs, {len(mine)} on this rank ({device}): {len(skipped)} already done, "
              f"{len(todo)} to generate", file=sys.stderr, flush=True)
        # load the models before writing anything: missing or broken weights leave no trace
        pipe = _load_pipeline(args.models, dtype, device, tag, getattr(args, "stream_weights", False)) if todo else None
        if pipe is not None and getattr(args, "attention", "sdpa") != "sdpa":
            pipe.unet.set_attention_backend(args.attention)
        scorer = _load_scorer(args, todo, device, tag)

        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / DONE_DIR).mkdir(parents=True, exist_ok=True)
            for path in cleanup_stale(out_dir, jobs):
                print(f"{tag}removed {path} (left by an interrupted run)", file=sys.stderr)
        if dist is not None:
            dist.barrier()  # nobody writes before rank 0 has cleaned up

        done = failed = 0
        if todo:
            done, failed = _generate_all(pipe, args.models, todo, len(mine), out_dir, jobs, jobs_file, dtype, device,
                                         rank, world, tag, replace, scorer)
        rebuild_manifest(out_dir, jobs, jobs_file, args.models, dtype)
        if dist is not None:
            dist.barrier()  # every rank's done-records are written
        manifest = rebuild_manifest(out_dir, jobs, jobs_file, args.models, dtype) if rank == 0 else None

    summary = {"rank": rank, "world_size": world, "device": device, "jobs": len(mine), "done": done,
               "skipped": len(skipped), "failed": failed, "seconds": round(time.perf_counter() - start, 2),
               **_peak_memory(device), "dtype": dtype}
    if manifest is not None:
        summary.update(manifest=str(out_dir / MANIFEST), finished=manifest["finished"], total=manifest["total"])
    print(f"{tag}finished: " + json.dumps(summary), flush=True)
    return 1 if failed else 0


def _load_pipeline(models: str, dtype: str, device: str, tag: str, stream_weights: bool = False):
    import torch

    from ..pipeline import VideoBoothPipeline

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    load_start = time.perf_counter()
    pipe = VideoBoothPipeline.from_models_dir(models, dtype=dtype, device=device, stream_weights=stream_weights)
    print(f"{tag}models loaded from {models} in {time.perf_counter() - load_start:.1f} s", file=sys.stderr, flush=True)
    return pipe


def _metric_needs(todo: list[Job]) -> tuple[str, ...]:
    from ..evaluation.metrics import RANK_CHOICES

    return tuple(sorted({"clip" if RANK_CHOICES[job.rank_by] != "dino" else "dino" for job in todo
                         if job.best_of > 1}))


def _load_scorer(args: argparse.Namespace, todo: list[Job], device: str, tag: str):
    """The metric models the best-of jobs of this rank rank by, loaded once (None when no job needs one)."""
    need = _metric_needs(todo)
    if not need:
        return None
    from ..evaluation.cli import load_scorer

    scorer = load_scorer(args, need, device=device, strict=True)
    print(f"{tag}metric models loaded for best of N: " + ", ".join(
        m.source for m in (scorer.clip, scorer.dino) if m is not None), file=sys.stderr, flush=True)
    return scorer


def _generate_all(pipe, models: str, todo: list[Job], n_mine: int, out_dir: Path, jobs: list[Job], jobs_file: Path,
                  dtype: str, device: str, rank: int, world: int, tag: str,
                  replace: set[str] | None = None, scorer: Any = None) -> tuple[int, int]:
    """Generate and write ``todo`` in order; a job that fails at run time is recorded and the rest go on.
    Returns (done, failed)."""
    done = failed = 0
    for number, job in enumerate(todo, start=1):
        item_start = time.perf_counter()
        memory = False
        try:
            result, seed, best_of = _generate_one(pipe, job, out_dir, f"{tag}{job.id} ({number}/{len(todo)})",
                                                  overwrite=job.id in (replace or ()), scorer=scorer)
        except Exception as error:  # noqa: BLE001 - classified below; anything unknown is re-raised
            reason = _failure_reason(error)
            if reason is None:
                raise
            memory = out_of_memory(error) is not None
        else:
            reason = None
        if reason is not None:
            if memory:
                _free_memory(device)
            failed += 1
            print(f"{tag}error: line {job.line} (job {job.id}): {reason}", file=sys.stderr, flush=True)
            write_json_atomic(out_dir / FAILED_DIR / f"{job.id}.json", {
                "id": job.id, "line": job.line, "output": job.out, "error": reason, "rank": rank,
                "failed_at": _now(), "fingerprint": job.fingerprint(dtype)})
            rebuild_manifest(out_dir, jobs, jobs_file, models, dtype)
            continue
        seconds = time.perf_counter() - item_start
        record = {
            "id": job.id, "line": job.line, "output": job.out, "seed": seed, **best_of,
            "settings": job.describe(), "dtype": dtype, "prompt_used": result.prompt_used,
            "seconds": round(seconds, 2), "rank": rank, "world_size": world, "device": device,
            "finished_at": _now(), "fingerprint": job.fingerprint(dtype),
        }
        write_json_atomic(done_record_path(out_dir, job.id), record)  # after the output: done means done
        for stale in (out_dir / CLAIMS_DIR / f"{job.id}.json", out_dir / FAILED_DIR / f"{job.id}.json"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        rebuild_manifest(out_dir, jobs, jobs_file, models, dtype)
        done += 1
        print(f"{tag}done {job.id} ({number}/{len(todo)}, {n_mine} on this rank): " + json.dumps({
            "output": str(out_dir / job.out), "seconds": round(seconds, 2), **_peak_memory(device),
            "frames": job.settings["frames"], "size": [job.settings["width"], job.settings["height"]],
            "steps": job.settings["steps"], "sampler": job.settings["sampler"], "cfg": job.settings["cfg"],
            "seed": seed, **best_of, "prompt_used": result.prompt_used,
        }), flush=True)
    return done, failed


def _generate_one(pipe, job: Job, out_dir: Path, label: str, overwrite: bool,
                  scorer: Any = None) -> tuple[Any, int, dict[str, Any]]:
    """Generate ``job`` and write its output (claimed first, so that a rerun after a kill between the output
    and its done-record knows the output is this job's). Returns the result, the seed that alone reproduces it,
    and for best of N ``{"best_of": {"n", "rank_by", "candidates": [{"seed", scores...}, best first]}}``."""
    request = build_request(job)
    try:  # the styles are undone in the finally, even after a failure, so the next line starts from plain weights
        if job.styled:
            for line in pipe.use_sd_models(job.base_checkpoint, job.loras, job.lora_kv):
                print(f"{label}: {line}", file=sys.stderr, flush=True)
        return _sample_and_write(pipe, job, request, out_dir, label, overwrite, scorer)
    finally:
        if job.styled:  # a plain line never touches the weights
            pipe.restore_weights()


def _sample_and_write(pipe, job: Job, request: Any, out_dir: Path, label: str, overwrite: bool,
                      scorer: Any) -> tuple[Any, int, dict[str, Any]]:
    from .common import progress_callback
    from .video_io import write_frames

    if job.best_of > 1:
        from ..evaluation.best_of import generate_best_of

        ranked = generate_best_of(pipe, request, job.best_of, job.rank_by, scorer,
                                  callback=_candidates_progress(label, job.best_of))
        result, seed = ranked[0].result, ranked[0].seed
        best_of = {"best_of": {"n": job.best_of, "rank_by": job.rank_by,
                               "candidates": [{"seed": c.seed, **c.scores} for c in ranked]}}
    else:
        result = pipe.generate(request, callback=progress_callback(label))
        seed, best_of = job.settings["seed"], {}
    output = out_dir / job.out
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / CLAIMS_DIR / f"{job.id}.json", {"id": job.id, "output": job.out, "claimed_at": _now()})
    write_frames(result.frames, output, job.settings["fps"], overwrite=overwrite)
    return result, seed, best_of


def _candidates_progress(label: str, n: int):
    """A progress bar per candidate of best of N (each sampling run counts its steps from 0)."""
    from .common import progress_callback

    state: dict[str, Any] = {"count": 0, "bar": None}

    def callback(step: int, total: int, output: Any) -> None:
        if step == 0 or state["bar"] is None:
            state["count"] += 1
            state["bar"] = progress_callback(f"{label} candidate {state['count']}/{n}")
        state["bar"](step, total, output)

    return callback


def _failure_reason(error: Exception) -> str | None:
    """One line saying why a job failed, for failures of one job (bad input only visible with the models loaded,
    out of memory, a failed write); None for anything else (a bug: the run stops and the CLI logs it)."""
    memory = out_of_memory(error)
    if memory is not None:
        return str(memory)
    if isinstance(error, VideoBoothError):
        return " ".join(str(error).split())
    if isinstance(error, OSError):
        return explain("a file could not be written", " ".join(str(error).split()),
                       "check free space and permissions of --out-dir")
    return None


def _free_memory(device: str) -> None:
    """Give back what a job that ran out of memory held, so that the next (perhaps smaller) job can run."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
