"""``dataset build``: turn a folder of videos and a captions file into a VideoBooth dataset (layout: ``layout.py``).

Per video: choose the subject word, decode frame 0, segment the subject (Grounding DINO + SAM, or the user's mask),
write the entry folder atomically. Resumable: finished entries are kept and skipped; a killed run leaves only
complete entries (and temporaries that the next run removes). Skipped videos are reported with their reason and
tried again by the next run (the user may have fixed them).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import DatasetError, ImagePromptError, VideoError
from ..files import atomic_path, is_temporary, write_json_atomic
from ..video_io import read_frames, video_info
from . import layout
from .segment import Segmenter
from .video import VIDEO_SUFFIXES

logger = logging.getLogger(__name__)

MIN_FRAMES = 16


@dataclass
class BuildOptions:
    """Settings of a build. ``segmenter_factory`` makes the Grounding DINO + SAM segmenter on first need."""

    classes: Sequence[str] = layout.DEFAULT_CLASSES
    masks_dir: Optional[Path] = None
    min_frames: int = MIN_FRAMES
    workers: int = 1
    segmenter_factory: Optional[Callable[[], Segmenter]] = None
    progress: bool = True


@dataclass
class BuildReport:
    """What a build did: entry ids written now, entry ids already present, skipped video file names -> reason."""

    built: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"built": sorted(self.built), "already_done": sorted(self.already_done),
                "skipped": dict(sorted(self.skipped.items()))}

    def summary(self) -> str:
        lines = [f"{len(self.built)} entries built, {len(self.already_done)} already done, {len(self.skipped)} skipped"]
        lines += [f"  skipped {name}: {reason}" for name, reason in sorted(self.skipped.items())]
        return "\n".join(lines)


class _Skip(Exception):
    """A video that cannot become an entry; the message is the reason shown in the report."""


def _prepare_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out '{out}' is a file; give a folder for the dataset")
    if out.is_dir() and any(out.iterdir()) and not layout.is_dataset(out):
        raise DatasetError(f"--out '{out}' is a non-empty folder that is not a VideoBooth dataset; choose a new or "
                           "empty folder (or an earlier build's folder to resume it)")
    entries = out / layout.ENTRIES
    entries.mkdir(parents=True, exist_ok=True)
    for leftover in entries.iterdir():  # a killed run's half-written entries
        if is_temporary(leftover):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    if not (out / "dataset.json").is_file():
        write_json_atomic(out / "dataset.json", {"format": layout.FORMAT, "version": layout.VERSION})
    return entries


def _work_list(videos_dir: Path, captions: dict[str, layout.CaptionRow]) -> list[str]:
    if not videos_dir.is_dir():
        raise DatasetError(f"--videos '{videos_dir}' is not a folder; give the folder that holds the videos")
    on_disk = {p.name for p in videos_dir.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES}
    return sorted(on_disk | set(captions))


class _Builder:
    def __init__(self, videos_dir: Path, captions: dict[str, layout.CaptionRow], entries: Path, options: BuildOptions):
        self.videos_dir, self.captions, self.entries, self.options = videos_dir, captions, entries, options
        self._segmenter: Optional[Segmenter] = None
        self._lock = threading.Lock()

    def segmenter(self) -> Segmenter:
        with self._lock:
            if self._segmenter is None:
                if self.options.segmenter_factory is None:
                    raise DatasetError("no segmenter: give --masks or the Grounding DINO and SAM model folders")
                self._segmenter = self.options.segmenter_factory()
            return self._segmenter

    def subject(self, name: str, frame, word: str):
        """(mask, mask.json records) of the subject in frame 0: the user's mask, or Grounding DINO + SAM."""
        from ..conditioning.image_prompt import load_mask, mask_bbox

        height, width = int(frame.shape[0]), int(frame.shape[1])
        if self.options.masks_dir is not None:
            path = self.options.masks_dir / (layout.entry_id(name) + ".png")
            if not path.is_file():
                raise _Skip(f"no mask file '{path.name}' in --masks")
            try:
                mask = load_mask(path)
            except ImagePromptError as exc:
                raise _Skip(f"unreadable mask ({exc})") from exc
            if tuple(mask.shape) != (height, width):
                raise _Skip(f"mask size {tuple(mask.shape[::-1])} differs from the video's {(width, height)} (W, H)")
            if not bool(mask.any()):
                raise _Skip("no subject found (the mask is empty)")
            return mask, layout.mask_records(word, 1.0, mask_bbox(mask))
        found = self.segmenter()(frame, word)
        if found is None:
            raise _Skip(f"no subject found (no '{word}' detected in frame 0)")
        if not bool(found.mask.any()):
            raise _Skip(f"no subject found (the segmentation of the '{word}' box is empty)")
        return found.mask, layout.mask_records(found.label, found.logit, found.box)

    def process(self, name: str) -> str:
        """Build one entry; returns its id, or raises _Skip with the reason."""
        row = self.captions.get(name)
        if row is None or not row.caption:
            raise _Skip("missing caption")
        source = self.videos_dir / name
        if not source.is_file():
            raise _Skip("missing video file")
        word = layout.choose_word(row.caption, row.word, self.options.classes)
        if word is None:
            wanted = f"the word {row.word!r}" if row.word else f"a class word ({', '.join(self.options.classes)})"
            raise _Skip(f"caption without {wanted}")
        try:
            info = video_info(source)
            frame = read_frames(source, [0])[0]
        except (DatasetError, VideoError) as exc:
            raise _Skip(f"unreadable ({exc})") from exc
        if info.frames < self.options.min_frames:
            raise _Skip(f"too short ({info.frames} frames < {self.options.min_frames})")
        mask, records = self.subject(name, frame, word)
        ident = layout.entry_id(name)
        with atomic_path(self.entries / ident, folder=True) as tmp:
            layout.write_entry(tmp, ident, source, row.caption, word, info, mask, records)
        return ident


def build_dataset(videos_dir: str | os.PathLike, captions_file: str | os.PathLike, out: str | os.PathLike,
                  options: Optional[BuildOptions] = None) -> BuildReport:
    """Build (or resume building) a dataset in ``out``; returns the report (also written to build_report.json)."""
    from tqdm import tqdm

    options = options or BuildOptions()
    if options.workers < 1:
        raise DatasetError(f"--workers must be >= 1; got {options.workers}")
    if options.masks_dir is not None and not Path(options.masks_dir).is_dir():
        raise DatasetError(f"--masks '{options.masks_dir}' is not a folder; give the folder of <video stem>.png masks")
    videos_dir, out = Path(videos_dir), Path(out)
    captions = layout.read_captions(captions_file)
    names = _work_list(videos_dir, captions)
    entries = _prepare_out(out)
    report = BuildReport()
    ids: dict[str, str] = {}
    todo = []
    for name in names:
        ident = layout.entry_id(name)
        if ident in ids:
            report.skipped[name] = f"same file stem as '{ids[ident]}' (entries and masks are named by the stem)"
            continue
        ids[ident] = name
        if (entries / ident / "entry.json").is_file():
            report.already_done.append(ident)
        else:
            todo.append(name)
    builder = _Builder(videos_dir, captions, entries, options)
    bar = tqdm(total=len(todo), desc="building", unit="video", file=sys.stderr, disable=not options.progress)
    with ThreadPoolExecutor(max_workers=options.workers) as pool:
        futures = {pool.submit(builder.process, name): name for name in todo}
        try:
            for future in as_completed(futures):
                name = futures[future]
                try:
                    report.built.append(future.result())
                except _Skip as skip:
                    report.skipped[name] = str(skip)
                    logger.info("skipped %s: %s", name, skip)
                bar.update(1)
        except BaseException:
            for pending in futures:
                pending.cancel()
            raise
        finally:
            bar.close()
    write_json_atomic(out / "build_report.json", report.as_dict())
    return report
