"""What a run leaves in ``--out-dir`` besides the outputs: claims, done-records and failure records under
``.videobooth/``, the output checks made before any model loads, the clean-up of an interrupted run's temporary
files, and ``manifest.json`` rebuilt from the records under a lock."""

from __future__ import annotations

import contextlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...errors import OutputError, explain
from ...files import check_target, is_temporary, write_json_atomic
from .schema import Job

STATE_DIR = ".videobooth"
"""Folder (inside --out-dir) holding the done-records, claims, failure records and the manifest lock."""
DONE_DIR = f"{STATE_DIR}/done"
CLAIMS_DIR = f"{STATE_DIR}/claims"
"""Written before an item's output: proves on a rerun that an output without a done-record is this job's."""
FAILED_DIR = f"{STATE_DIR}/failed"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
"""2: the manifest gained the ``failed`` list."""


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
    """The job's done-record if the job is finished: record and output (and with ``save_latents`` its latents
    file) exist and the settings match; a job whose latents file is gone is redone."""
    record = read_done_record(out_dir, job)
    if record is None or record.get("fingerprint") != job.fingerprint(dtype) or record.get("output") != job.out:
        return None
    if job.latents is not None and not (out_dir / job.latents).is_file():
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
    from ...video_io import is_frame_folder

    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(explain("--out-dir is a file, not a folder", out_dir, "name a folder for the outputs"))
    replace: set[str] = set()
    for job in jobs:
        # the output, and with save_latents its latents file (written with it, so owned with it)
        taken = [name for name in (job.out, job.latents) if name is not None
                 and ((out_dir / name).exists() or (out_dir / name).is_symlink())]
        if not taken or finished_record(out_dir, job, dtype) is not None:
            continue
        owned = owns_output(out_dir, job)
        if not (owned or overwrite):
            what = "its output" if taken[0] == job.out else "its latents file"
            raise OutputError(explain(f"line {job.line} (job {job.id}): {what} already exists in --out-dir and "
                                      "was not written by this job", taken[0],
                                      "choose another 'out', or pass --overwrite to replace it"))
        for name in taken:
            try:
                check_target(out_dir / name, overwrite=True, replaceable=is_frame_folder,
                             folder=name == job.out and not Path(job.out).suffix)
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
            "updated_at": now(),
        }
        write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

