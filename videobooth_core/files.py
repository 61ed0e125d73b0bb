"""Writing files and folders so that nothing half-written survives and nothing the user made is lost.

Everything the project writes (converted weights, tiny model sets, videos, frame folders, done-records,
manifests, datasets, checkpoints) goes through :func:`atomic_path`: the content is written to a temporary
sibling (same folder, so the final ``os.replace`` is atomic on one file system), and only a complete result
is renamed into place. An existing target is refused unless the caller passes ``overwrite=True``, and even
then a folder is only replaced when it holds nothing but what this project writes into such a folder
(``replaceable``), so a user's folder is never deleted by mistake; a file is never replaced by a folder, nor
a folder by a file.

Every command checks its outputs before any model loads, with the same two functions: :func:`check_target` for a
file or frame folder it writes whole, :func:`check_output_folder` for a folder it fills and may come back to (a
training run, a dataset, a batch's ``--out-dir``). Both probe the place with :func:`check_writable`, so a
read-only folder or ``/proc`` fails in seconds, not after the generation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError, explain

PathLike = str | os.PathLike[str]
"""A path as every public function of the core takes it: a string or a path object."""
TEMP_PREFIX = ".videobooth-"
"""Prefix of every temporary file or folder this project writes (a killed run's leftovers are recognisable)."""
PARTIAL_SUFFIX = ".partial"


def check_target(path: str | os.PathLike, overwrite: bool = False,
                 replaceable: Callable[[Path], bool] | None = None, flag: str = "--overwrite",
                 folder: bool = False) -> Path:
    """Refuse a target that would destroy something, before any heavy work. Refused: the current, home or
    root folder; an existing folder where a file is to be written, or an existing file where a folder
    (``folder=True``) is to be written; an existing folder that ``replaceable`` does not accept (by default
    none is); any other existing target unless ``overwrite``. Returns the absolute path."""
    target = Path(path).expanduser()
    resolved = target.resolve()
    if resolved in {Path.cwd().resolve(), Path(resolved.anchor), Path.home().resolve()}:
        raise OutputError(explain("refusing to write the output over the current, home or root folder", path,
                                  "name a new file or folder, e.g. --out video.gif"))
    if target.is_dir() and not target.is_symlink():
        if not folder:
            raise OutputError(explain("the output is an existing folder (never deleted)", path,
                                      "name a new file, e.g. video.gif"))
        if not (replaceable and replaceable(target)):
            raise OutputError(explain("the output is an existing folder holding files this program did not "
                                      "write (never deleted)", path, "name a new folder"))
    elif folder and (target.is_symlink() or target.exists()):
        raise OutputError(explain("the output folder's name is taken by a file (never deleted)", path,
                                  "name a new folder, or give a suffix (.gif, .webp, .mp4) to write a video file"))
    if (target.is_symlink() or target.exists()) and not overwrite:
        raise OutputError(explain("the output already exists", path, f"choose a new name, or pass {flag} to "
                                  "replace it"))
    if target.parent.exists() and not target.parent.is_dir():
        raise OutputError(explain("cannot write the output: its parent is a file, not a folder", target.parent,
                                  "choose another place"))
    check_writable(target.parent, path)
    return resolved


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check, before any heavy work, a folder that a command fills and may come back to (a training run, a
    dataset, an evaluation, a batch's --out-dir, a cache): an existing folder is fine (it is resumed or added
    to), a file of that name is refused (never replaced), and the folder must be writable. Returns the absolute
    path; nothing is created."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise OutputError(explain(f"{flag} names a file, not a folder (never replaced)", path,
                                  f"give {flag} a new or existing folder"))
    check_writable(target if target.is_dir() else target.parent, path, flag)
    return target.resolve()


def check_writable(folder: str | os.PathLike, output: str | os.PathLike | None = None, flag: str = "--out") -> None:
    """Refuse an output that could not be written, before any heavy work: the nearest existing folder at or
    above ``folder`` must be a folder that accepts a new file. Probed by creating and removing an empty
    temporary file there (permission bits alone miss read-only file systems, /proc and root's powers), so
    nothing is left and no missing folder is created. ``output`` is the path named in the message."""
    shown = folder if output is None else output
    existing = Path(folder).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(explain(f"cannot write {flag}: {existing} is a file, not a folder", shown,
                                  "choose another place"))
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX + "probe.", suffix=PARTIAL_SUFFIX, dir=existing)
    except OSError as error:
        raise OutputError(explain(f"cannot write {flag} ({error.strerror or error}) in {existing}", shown,
                                  "choose a folder you can write to")) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _default_mode(folder: bool) -> int:
    """The permissions a plain ``open``/``mkdir`` would give (mkstemp/mkdtemp make private 0600/0700 files)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file path, or a created folder with ``folder=True``);
    when the block succeeds it is renamed onto ``path`` (a folder being replaced is removed only after the new
    one is complete), otherwise it is removed. Check the target with :func:`check_target` first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + path.name + ".", suffix=PARTIAL_SUFFIX, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", suffix=PARTIAL_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode(folder))
        if folder and path.is_dir() and not path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + path.name + ".old.", dir=path.parent))
            os.replace(path, old / "content")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (synced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())


def is_temporary(path: Path) -> bool:
    """True for a leftover of :func:`atomic_path` (a killed run's temporary file or folder)."""
    return path.name.startswith(TEMP_PREFIX) and (path.name.endswith(PARTIAL_SUFFIX) or ".old." in path.name)
