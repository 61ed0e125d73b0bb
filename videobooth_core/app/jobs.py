"""Batch generation: ``python -m videobooth_core generate --models DIR --jobs FILE.jsonl --out-dir OUT``.

The jobs file holds one JSON object per line, with keys named like the command line's flags::

    {"id": "dog", "prompt": "a dog running on the beach", "word": "dog", "image": "dog.jpg", "mask": "dog_mask.png"}
    {"prompt": "a cat sleeping on a sofa", "frames": 16, "steps": 50, "seed": 3, "out": "cat.mp4"}

Keys: ``prompt`` (required), ``word``, ``image``, ``mask``, ``bbox`` ([x1, y1, x2, y2]), ``negative``, ``frames``,
``width``, ``height``, ``steps``, ``sampler``, ``cfg``, ``guidance``, ``seed``, ``fps``, ``out`` and ``id``.
Settings a line leaves out come from the command line (``--steps 50`` sets every job's default). ``id``
defaults to the line number, zero-padded (``00001``); ``out`` defaults to ``<id>.gif`` and is relative to
``--out-dir`` (``.mp4``, ``.gif``, ``.webp``, or no suffix for a folder of PNG frames). Relative image and
mask paths are resolved against the jobs file's folder. Blank lines are ignored.

Every line is validated (JSON, keys, values, images, masks, subject words) before anything is written: the
first problem ends the run with exit code 2 and one line naming the line number.

Under ``torchrun`` the jobs are sharded across the ranks (job ``i`` goes to rank ``i % WORLD_SIZE``), one
device per rank (``--device cuda`` becomes ``cuda:LOCAL_RANK``; CPU ranks work too). Each rank loads the
pipeline once, and only if it has work left.

Resuming. Each finished item gets an output (written atomically by :func:`video_io.write_frames`) and then a
done-record ``OUT/.videobooth/done/<id>.json`` (written atomically: temporary file, ``os.replace``). An item
is skipped when its output and its done-record both exist and the record's settings match the job's, so a
killed run restarted with the same command redoes only unfinished items; a job whose line changed is redone.
``OUT/manifest.json`` lists every finished item of the jobs file (id, output, seed, settings, seconds, rank);
it is rebuilt from the done-records - under an exclusive file lock, after every item and at the end, and by
rank 0 once more after all ranks have finished - so concurrent ranks never lose each other's entries.
Temporary files left by a killed run (``.videobooth-*`` folders, ``*.partial`` files) are removed on start,
so one output folder serves one run at a time (the ranks of one torchrun launch count as one run).

A line whose problem only shows with the models loaded (a subject word past CLIP's 77 tokens) is reported
on its own ``error:`` line; the other jobs go on, the run exits with 1 and the next run retries that line.
Missing or broken weights end the run (exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..errors import VideoBoothError

logger = logging.getLogger(__name__)

STATE_DIR = ".videobooth"
"""Folder (inside --out-dir) holding the done-records and the manifest lock."""
DONE_DIR = f"{STATE_DIR}/done"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
TEMP_PREFIX = ".videobooth-"
"""Prefix of video_io.write_frames' temporary folders (and of this module's temporary files)."""
PARTIAL_SUFFIX = ".partial"
DEFAULT_SUFFIX = ".gif"
VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")
ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
DIST_TIMEOUT = timedelta(days=7)
"""Ranks wait for each other at the end; a shard can take hours with real weights (torchrun stops every
rank as soon as one fails, so a long timeout never leaves a rank hanging on a dead one)."""

# key -> (kind, CLI attribute giving its default, fallback default)
SETTINGS: dict[str, tuple[str, str, Any]] = {
    "negative": ("str", "negative", "None"),
    "frames": ("int", "frames", 16),
    "width": ("int", "width", 256),
    "height": ("int", "height", 256),
    "steps": ("int", "steps", 250),
    "sampler": ("str", "sampler", "ddpm"),
    "cfg": ("float", "cfg", 4.0),
    "guidance": ("str", "guidance", "official"),
    "seed": ("int", "seed", 10),
    "fps": ("float", "fps", 8.0),
}
# Optional request fields, accepted only when the pipeline's GenerationRequest has them.
OPTIONAL_SETTINGS: dict[str, tuple[str, str, Any]] = {
    "spacing": ("str", "spacing", "trailing"),
    "eta": ("float", "eta", 0.0),
}
SUBJECT_KEYS = ("prompt", "word", "image", "mask", "bbox")
CLI_ONLY_FLAGS = {"prompt": "--prompt", "word": "--word", "image": "--image", "mask": "--mask", "bbox": "--bbox", "out": "--out"}
PER_RUN_KEYS = ("dtype", "device", "models")


class JobsError(VideoBoothError):
    """The jobs file, or one of its lines, cannot be used."""


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
    """negative, frames, width, height, steps, sampler, cfg, guidance, seed, fps (+ spacing, eta)."""

    def describe(self) -> dict[str, Any]:
        """The job's full settings, as recorded in done-records and the manifest."""
        return {"prompt": self.prompt, "word": self.word, "image": self.image, "mask": self.mask,
                "bbox": list(self.bbox) if self.bbox else None, **self.settings}

    def fingerprint(self, dtype: str) -> str:
        """Hash of everything that determines the output (so a changed line is redone, not skipped)."""
        spec = {**self.describe(), "out": self.out, "dtype": dtype}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# -- reading and validating the jobs file -------------------------------------------------------------
def _request_fields() -> set[str]:
    from ..pipeline import GenerationRequest

    return {f.name for f in dataclasses.fields(GenerationRequest)}


def _setting_specs() -> dict[str, tuple[str, str, Any]]:
    fields = _request_fields()
    specs = dict(SETTINGS)
    specs.update({k: v for k, v in OPTIONAL_SETTINGS.items() if k in fields})
    return specs


def _check_value(key: str, kind: str, value: Any, where: str) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise JobsError(f"{where}: {key!r} must be a string, got {json.dumps(value)}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise JobsError(f"{where}: {key!r} must be a whole number, got {json.dumps(value)}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JobsError(f"{where}: {key!r} must be a number, got {json.dumps(value)}")
    return float(value)


def _check_out(out: Any, where: str) -> str:
    if not isinstance(out, str) or not out.strip():
        raise JobsError(f"{where}: 'out' must be a file name such as \"clip.mp4\", got {json.dumps(out)}")
    path = Path(out)
    if path.is_absolute() or ".." in path.parts or any(p.startswith(".") for p in path.parts):
        raise JobsError(f"{where}: 'out' must be a relative path inside --out-dir without '..' or hidden "
                        f"names, got {out!r}")
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
    specs = _setting_specs()
    allowed = ("id", "out", *SUBJECT_KEYS, *specs)
    for key in obj:
        if key in PER_RUN_KEYS:
            raise JobsError(f"{where}: {key!r} is set for the whole run: use --{key} on the command line")
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
    settings = {}
    for key, (kind, _attr, _fallback) in specs.items():
        settings[key] = _check_value(key, kind, obj[key], where) if key in obj else defaults[key]
    if settings["fps"] <= 0:
        raise JobsError(f"{where}: 'fps' must be positive, got {settings['fps']}")
    if not 0 <= settings["seed"] < 2**63:
        raise JobsError(f"{where}: 'seed' must be between 0 and 2**63 - 1, got {settings['seed']}")
    out = _check_out(obj.get("out", f"{job_id}{DEFAULT_SUFFIX}"), where)
    return Job(index=index, line=line, id=job_id, out=out, prompt=prompt, word=word, image=image, mask=mask,
               bbox=bbox, settings=settings)


def build_request(job: Job):
    """The pipeline request of ``job`` (images loaded from disk)."""
    from ..conditioning.image_prompt import load_image, load_mask
    from ..pipeline import GenerationRequest

    fields = _request_fields()
    extra = {k: job.settings[k] for k in ("sampler", *OPTIONAL_SETTINGS) if k in job.settings and k in fields}
    image = load_image(job.image) if job.image else None
    mask = load_mask(job.mask) if job.mask else None
    return GenerationRequest(
        prompt=job.prompt, subject_word=job.word, image=image, mask=mask, bbox=job.bbox,
        negative_prompt=job.settings["negative"], frames=job.settings["frames"], width=job.settings["width"],
        height=job.settings["height"], steps=job.settings["steps"], cfg_scale=job.settings["cfg"],
        guidance=job.settings["guidance"], seed=job.settings["seed"], **extra,
    )


def check_job(job: Job) -> None:
    """Everything that can be checked without the models: settings, images, masks, boxes, subject word."""
    from ..conditioning.image_prompt import prepare_image_prompt
    from ..conditioning.text import substitute_subject

    where = f"line {job.line} (job {job.id})"
    try:
        request = build_request(job)
        request.validate()
        if request.image is not None:
            prepare_image_prompt(request.image, request.mask, request.bbox)
            substitute_subject(job.prompt, job.word)
    except JobsError:
        raise
    except VideoBoothError as error:
        raise JobsError(f"{where}: {error}") from None


def load_jobs(path: str | os.PathLike, defaults: dict[str, Any] | None = None, check_files: bool = True) -> list[Job]:
    """Read and validate every line of a jobs file; JobsError names the first bad line."""
    path = Path(path)
    specs = _setting_specs()
    defaults = {k: (defaults or {}).get(k, fallback) for k, (_kind, _attr, fallback) in specs.items()}
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
            check_job(job)
        if any(job.out.lower().endswith(".mp4") for job in jobs):
            try:
                import imageio_ffmpeg  # noqa: F401
            except ImportError:
                raise JobsError("writing .mp4 needs the imageio-ffmpeg package: `pip install imageio-ffmpeg` "
                                "(or write .gif / .webp)") from None
    return jobs


# -- files -------------------------------------------------------------------------------------------------
def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` atomically (a synced temporary file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def done_record_path(out_dir: Path, job_id: str) -> Path:
    return out_dir / DONE_DIR / f"{job_id}.json"


def read_done_record(out_dir: Path, job: Job) -> dict[str, Any] | None:
    try:
        record = json.loads(done_record_path(out_dir, job.id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("id") == job.id else None


def finished_record(out_dir: Path, job: Job, dtype: str) -> dict[str, Any] | None:
    """The job's done-record if the job is finished: record and output exist and the settings match."""
    record = read_done_record(out_dir, job)
    if record is None or record.get("fingerprint") != job.fingerprint(dtype) or record.get("output") != job.out:
        return None
    return record if (out_dir / job.out).exists() else None


def cleanup_stale(out_dir: Path, jobs: list[Job]) -> list[Path]:
    """Remove temporary files of an interrupted run: write_frames' ``.videobooth-*`` folders next to the
    outputs and this module's ``*.partial`` files. Call it before any rank starts writing."""
    folders = {out_dir, out_dir / DONE_DIR, *((out_dir / job.out).parent for job in jobs)}
    removed = []
    for folder in sorted(folders):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(TEMP_PREFIX) or entry.name.endswith(PARTIAL_SUFFIX):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()
                removed.append(entry)
    return removed


@contextlib.contextmanager
def _manifest_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive lock serialising manifest rebuilds across ranks (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path = out_dir / STATE_DIR / "manifest.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def rebuild_manifest(out_dir: Path, jobs: list[Job], jobs_file: Path, models: str, dtype: str) -> dict[str, Any]:
    """Rewrite ``manifest.json`` from the done-records (atomically, under the lock). Every rank writes its
    done-record before rebuilding, and rebuilds are serialised, so the last rebuild lists every item."""
    with _manifest_lock(out_dir):
        items, pending = [], []
        for job in jobs:
            record = finished_record(out_dir, job, dtype)
            if record is None:
                pending.append(job.id)
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
            "items": items,
            "updated_at": _now(),
        }
        atomic_write_json(out_dir / MANIFEST, manifest)
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
    import resource

    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


# -- the run ----------------------------------------------------------------------------------------------
def _defaults_from(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, attr, fallback) if getattr(args, attr, None) is not None else fallback
            for key, (_kind, attr, fallback) in _setting_specs().items()}


def _check_args(args: argparse.Namespace) -> None:
    for attr, flag in CLI_ONLY_FLAGS.items():
        if getattr(args, attr, None) is not None:
            raise JobsError(f"{flag} does not go with --jobs: put it on each line of the jobs file (key {attr!r})")


def run_jobs(args: argparse.Namespace) -> int:
    """Run a jobs file (see the module docstring). Returns 0 when every job of this rank finished, 1 when
    some failed (each failure is reported on its own line and retried by the next run)."""
    start = time.perf_counter()
    _check_args(args)
    rank, world, local_rank = rank_info()
    jobs_file = Path(args.jobs)
    out_dir = Path(args.out_dir)
    dtype = getattr(args, "dtype", "fp32") or "fp32"
    jobs = load_jobs(jobs_file, _defaults_from(args))  # validates every line before anything is written
    if out_dir.exists() and not out_dir.is_dir():
        raise JobsError(f"--out-dir {out_dir} exists and is not a folder")
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
        print(f"{tag}{len(jobs)} jobs, {len(mine)} on this rank ({device}): {len(skipped)} already done, "
              f"{len(todo)} to generate", file=sys.stderr, flush=True)
        # load the models before writing anything: missing or broken weights leave no trace
        pipe = _load_pipeline(args.models, dtype, device, tag, getattr(args, "stream_weights", False)) if todo else None

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
                                         rank, world, tag)
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


def _generate_all(pipe, models: str, todo: list[Job], n_mine: int, out_dir: Path, jobs: list[Job], jobs_file: Path,
                  dtype: str, device: str, rank: int, world: int, tag: str) -> tuple[int, int]:
    from .cli import _progress_callback
    from .video_io import write_frames

    done = failed = 0
    for number, job in enumerate(todo, start=1):
        item_start = time.perf_counter()
        try:
            request = build_request(job)
            result = pipe.generate(request, callback=_progress_callback(f"{tag}{job.id} ({number}/{len(todo)})"))
            output = out_dir / job.out
            output.parent.mkdir(parents=True, exist_ok=True)
            write_frames(result.frames, output, job.settings["fps"])
        except VideoBoothError as error:  # bad input only detectable with the models: report, go on
            failed += 1
            print(f"{tag}error: line {job.line} (job {job.id}): {error}", file=sys.stderr, flush=True)
            continue
        seconds = time.perf_counter() - item_start
        record = {
            "id": job.id, "line": job.line, "output": job.out, "seed": job.settings["seed"],
            "settings": job.describe(), "dtype": dtype, "prompt_used": result.prompt_used,
            "seconds": round(seconds, 2), "rank": rank, "world_size": world, "device": device,
            "finished_at": _now(), "fingerprint": job.fingerprint(dtype),
        }
        atomic_write_json(done_record_path(out_dir, job.id), record)  # after the output: done means done
        rebuild_manifest(out_dir, jobs, jobs_file, models, dtype)
        done += 1
        print(f"{tag}done {job.id} ({number}/{len(todo)}, {n_mine} on this rank): " + json.dumps({
            "output": str(out_dir / job.out), "seconds": round(seconds, 2), **_peak_memory(device),
            "frames": job.settings["frames"], "size": [job.settings["width"], job.settings["height"]],
            "steps": job.settings["steps"], "sampler": job.settings["sampler"], "cfg": job.settings["cfg"],
            "seed": job.settings["seed"], "prompt_used": result.prompt_used,
        }), flush=True)
    return done, failed
