"""Reading and validating the jobs file (the format: :mod:`videobooth_core.app.jobs`), and turning a line into
the pipeline's request. Every check runs before anything is written or any model loads."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ...errors import JobsError, OutputError, VideoBoothError, explain
from ...settings import check_device, check_settings_values, flag_names, key_names
from ...video_io import WRITE_SUFFIXES
from .schema import (
    BEST_OF_KEYS,
    DEFAULT_SUFFIX,
    ID_PATTERN,
    LORA_KV_MODES,
    PER_RUN_KEYS,
    SD_MODEL_KEYS,
    SETTINGS,
    START_KEYS,
    SUBJECT_KEYS,
    VIDEOBOOTH,
    VIDEOCRAFTER_KEYS,
    Job,
    settings_of,
)


def _check_value(key: str, value: Any, where: str, table: dict | None = None) -> Any:
    """A line's JSON value checked by its setting's rule (:meth:`videobooth_core.settings.Setting.check`, the
    message naming the key), in the setting's kind: JSON writes 16 as 16.0 and 6.0 as 6, and a pair as a list.
    ``table``: the family's settings (VideoBooth's by default)."""
    spec = (table or SETTINGS)[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif spec.kind == "float" and number:
        value = float(value)  # as recorded and fingerprinted since the first jobs format
    elif spec.kind == "pair" and isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        value = (float(value[0]), float(value[1]))
    try:
        return spec.check(value, key_names(key))
    except VideoBoothError as error:
        raise JobsError(f"{where}: {error}") from None


def _check_out(out: Any, where: str) -> str:
    if not isinstance(out, str) or not out.strip():
        raise JobsError(f"{where}: 'out' must be a file name such as \"clip.mp4\", got {json.dumps(out)}")
    path = Path(out)
    if not path.parts or path.is_absolute() or ".." in path.parts or any(p.startswith(".") for p in path.parts):
        raise JobsError(explain(f"{where}: 'out' must name a new path inside --out-dir (relative, not the folder "
                                "itself, no '..' or hidden names)", out, 'e.g. "out": "clip.gif"'))
    if path.suffix and path.suffix.lower() not in WRITE_SUFFIXES:
        raise JobsError(f"{where}: unsupported output {out!r}: use .mp4, .gif or .webp, or a name without a "
                        "suffix for a folder of PNG frames")
    return path.as_posix()


def _resolve(path: Any, key: str, base: Path, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise JobsError(f"{where}: {key!r} must be a file path, got {json.dumps(path)}")
    p = Path(path).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


def _unknown_key(obj: dict[str, Any], allowed: tuple[str, ...], where: str) -> str | None:
    """The first key of a line that its family does not take (None when all are known); a key that is set for
    the whole run is refused here, naming its command-line flag."""
    for key in obj:
        if key in PER_RUN_KEYS:
            raise JobsError(f"{where}: {key!r} is set for the whole run: use --{key.replace('_', '-')} on the command "
                            "line")
        if key not in allowed:
            return key
    return None


def _id_and_prompt(obj: dict[str, Any], line: int, where: str) -> tuple[str, str]:
    """A line's ``id`` (the line number, ``00007``, when absent; a whole number is read as its digits) and its
    ``prompt``, both checked: every family's line has them."""
    job_id = obj.get("id", f"{line:05d}")
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        job_id = str(job_id)
    if not isinstance(job_id, str) or not ID_PATTERN.match(job_id):
        raise JobsError(f"{where}: 'id' must be 1-100 letters, digits, '_', '-' or '.' (not starting with "
                        f"'.' or '-'), got {json.dumps(job_id)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise JobsError(f"{where}: 'prompt' is required: a non-empty string describing the video")
    return job_id, prompt


def parse_line(obj: Any, index: int, line: int, base: Path, defaults: dict[str, Any], family: str = VIDEOBOOTH,
               model: str | None = None) -> Job:
    """Validate one decoded line (keys and value types; files are checked by :func:`check_job`). ``family``:
    ``videobooth``, or the kind of the VideoCrafter checkpoint ``model`` (file name) that runs the lines."""
    where = f"line {line}"
    if not isinstance(obj, dict):
        raise JobsError(f"{where}: expected a JSON object such as {{\"prompt\": \"...\"}}, got {type(obj).__name__}")
    if family != VIDEOBOOTH:
        return _parse_videocrafter_line(obj, index, line, base, defaults, family, model)
    allowed = ("id", "out", *SUBJECT_KEYS, *START_KEYS, *SETTINGS, *BEST_OF_KEYS, *SD_MODEL_KEYS.values())
    unknown = _unknown_key(obj, allowed, where)
    if unknown is not None:
        raise JobsError(f"{where}: unknown key {unknown!r}; the keys are {', '.join(allowed)}")
    job_id, prompt = _id_and_prompt(obj, line, where)
    word = obj.get("word")
    if word is not None and (not isinstance(word, str) or not word.strip()):
        raise JobsError(f"{where}: 'word' must be the prompt's word naming the subject, got {json.dumps(word)}")
    image = _resolve(obj["image"], "image", base, where) if obj.get("image") is not None else None
    mask = _resolve(obj["mask"], "mask", base, where) if obj.get("mask") is not None else None
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


def _parse_videocrafter_line(obj: dict[str, Any], index: int, line: int, base: Path, defaults: dict[str, Any],
                             family: str, model: str | None) -> Job:
    """A line for a VideoCrafter model: ``prompt``, ``start_image`` (image-to-video), ``id``, ``out`` and the
    VideoCrafter settings; a VideoBooth-only key is refused by name."""
    where = f"line {line}"
    unknown = _unknown_key(obj, VIDEOCRAFTER_KEYS, where)
    if unknown is not None:
        raise JobsError(f"{where}: {unknown!r} does not apply to a VideoCrafter model ({family}); its keys are "
                        f"{', '.join(VIDEOCRAFTER_KEYS)}")
    job_id, prompt = _id_and_prompt(obj, line, where)
    table = settings_of(family)
    settings = {key: _check_value(key, obj[key], where, table) if obj.get(key) is not None else defaults[key]
                for key in table}
    start = _resolve(obj["start_image"], "start_image", base, where) if obj.get("start_image") is not None else None
    return Job(index=index, line=line, id=job_id, out=_check_out(obj.get("out", f"{job_id}{DEFAULT_SUFFIX}"), where),
               prompt=prompt, word=None, image=None, mask=None, bbox=None, settings=settings, start_image=start,
               family=family, model=model)


def _check_subjects(value: Any, base: Path, where: str) -> tuple[dict[str, Any], ...]:
    """A line's ``subjects``: a list of ``{word, image, mask?, strength?, region?, bbox?}`` (:mod:`.subjects`),
    paths resolved against the jobs file's folder."""
    from ..subjects import check_subject_entry

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
    from ...loading.lora import parse_lora_argument
    from ...settings import check_lora_strength

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
    return base_checkpoint, loras, lora_kv


def _check_best_of(best_of: Any, rank_by: Any, has_image: bool, where: str) -> tuple[int, str]:
    from ...evaluation.best_of import check_best_of

    try:
        return check_best_of(best_of, rank_by, has_image)
    except VideoBoothError as error:
        raise JobsError(f"{where}: {error} ('best_of', 'rank_by' or --best-of, --rank-by)") from None


def job_request(job: Job, tokenizer: Any = None, validate: bool = False):
    """The pipeline request of ``job``, from the one request builder (:func:`..request.build_request`, messages
    naming the line's keys); with ``validate`` checked as :meth:`GenerationRequest.validate` does (with
    ``tokenizer``, the prompts against CLIP's 77 tokens). A VideoCrafter line: ``build_videocrafter_request``,
    with ``validate`` checked against its checkpoint's kind (sizes, the start image) as the command line does."""
    from ..request import build_request, build_videocrafter_request

    if job.family != VIDEOBOOTH:
        from ...videocrafter_pipeline import check_request

        request = build_videocrafter_request(job.inputs(), names=key_names)
        if validate:  # the kind's size multiple (64 released) is checked again by the loaded model
            check_request(request, job.family, multiple=16, names=key_names)
        return request

    return build_request(job.inputs(), names=key_names, tokenizer=tokenizer, validate=validate)


def check_job(job: Job, tokenizer: Any = None) -> None:
    """Everything that can be checked without the models (:meth:`GenerationRequest.validate`): settings,
    images, masks, boxes, the subject word, with ``tokenizer`` the prompt's fit in CLIP's 77 tokens, and the
    line's base checkpoint and LoRAs by their headers."""
    from ...loading.inputs import check_weight_input

    where = f"line {job.line} (job {job.id})"
    try:
        job_request(job, tokenizer, validate=True)
    except JobsError:
        raise
    except VideoBoothError as error:
        raise JobsError(f"{where}: {error}") from None
    styles = [("base_checkpoint", job.base_checkpoint)] * bool(job.base_checkpoint)
    styles += [("loras", path) for path, _ in job.loras]
    for key, path in styles:
        try:  # readable and of its kind by its header, as on the command line (once per file version)
            check_weight_input(path, key, "lora" if key == "loras" else key)
        except VideoBoothError as error:
            raise JobsError(f"{where}: {error}") from None


def _whole(value: Any) -> Any:
    """A float flag's whole value as an int (``--fps 8`` is 8.0 on VideoBooth's command line)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _line_defaults(defaults: dict[str, Any] | None, family: str = VIDEOBOOTH) -> dict[str, Any]:
    """Every setting's default for the lines: the command line's value where given (checked, naming its flag),
    else the settings table's (a VideoCrafter family's: its own table, where None is the checkpoint kind's value)."""
    if family != VIDEOBOOTH:
        table = settings_of(family)
        try:
            return {key: spec.check(_whole(value) if spec.kind == "int" else value, spec.flag)
                    if (value := (defaults or {}).get(key)) is not None else spec.default
                    for key, spec in table.items()}
        except VideoBoothError as error:
            raise JobsError(f"{error} (the default of every job)") from None
    try:
        given = check_settings_values(defaults or {}, flag_names)
    except VideoBoothError as error:
        raise JobsError(f"{error} (the default of every job)") from None
    merged = {key: given.get(key, spec.default) for key, spec in SETTINGS.items()}
    merged.update({key: (defaults or {})[key] for key in ("base_checkpoint", "loras", "lora_kv")
                   if (defaults or {}).get(key) is not None})
    merged["best_of"] = (defaults or {}).get("best_of", 1)
    merged["rank_by"] = (defaults or {}).get("rank_by", "dino")
    from ...evaluation.best_of import check_best_of

    try:  # the lines' image is checked with each line
        check_best_of(merged["best_of"], merged["rank_by"], has_image=True)
    except VideoBoothError as error:
        raise JobsError(f"--best-of / --rank-by (the default of every job): {error}") from None
    return merged


def load_jobs(path: str | os.PathLike, defaults: dict[str, Any] | None = None, check_files: bool = True,
              tokenizer: Any = None, device: Any = None, *, family: str = VIDEOBOOTH,
              model: str | None = None) -> list[Job]:
    """Read and validate every line of a jobs file; JobsError names the first bad line.

    ``defaults``: settings by key (the command line's flags). With ``check_files`` every job is also checked as
    :func:`check_job` does (with ``tokenizer``, the prompts against CLIP's 77 tokens); ``device`` must exist.
    ``family``: ``videobooth``, or the kind of the VideoCrafter checkpoint ``model`` (its file name) that runs
    every line (a VideoCrafter models folder)."""
    path = Path(path)
    if device is not None:
        check_device(device)
    defaults = _line_defaults(defaults, family)
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
        job = parse_line(obj, len(jobs), number, base, defaults, family, model)
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
            from ...video_io import check_mp4_writer

            try:
                check_mp4_writer()
            except OutputError as error:
                raise JobsError(str(error)) from None
    return jobs

