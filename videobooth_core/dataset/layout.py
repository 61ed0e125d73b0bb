"""Our dataset layout, the captions file, and the choice of the subject word.

Layout written by ``dataset build`` and ``dataset synthetic`` (compatible with the official Grounded-SAM files)::

    OUT/
      dataset.json            {"format": "videobooth-dataset", "version": 1}
      build_report.json       the last build's summary: built, already done, skipped (with reasons)
      entries/<id>/           one folder per video, written atomically (complete or absent)
        video.<ext>           the source video, copied unchanged (hard link when possible)
        entry.json            {"id", "video", "source", "caption", "word", "frames", "width", "height", "fps"}
        mask.json             Grounded-SAM's list: [{"value": 0, "label": "background"},
                                                    {"value": 1, "label": "dog", "logit": 0.87, "box": [x1, y1, x2, y2]}]
        mask_1.png            palette PNG, index 1 = subject, 0 = background, same size as the video's frames

``<id>`` is the video file's stem. Boxes are detector boxes in pixels (floats, x2/y2 exclusive after int()), as
the official ``mask.json``; user masks get their tight box and logit 1.0.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import DatasetError

FORMAT = "videobooth-dataset"
VERSION = 1
ENTRIES = "entries"
DEFAULT_CLASSES = ("dog", "cat", "bear", "car", "panda", "tiger", "horse", "elephant", "lion")
"""The paper's nine subject classes (the official per-class CSVs)."""


@dataclass(frozen=True)
class CaptionRow:
    """One line of the captions file: the video's file name (inside --videos), its caption, its optional word."""

    video: str
    caption: str
    word: Optional[str] = None


def read_captions(path: str | os.PathLike) -> dict[str, CaptionRow]:
    """Read a captions CSV (header with ``video,caption[,word]``) or JSONL (one object per line) file.

    Returns rows by video file name. Duplicate names, a missing ``video`` column or a bad line raise DatasetError.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"captions file not found: '{path}'; give a .csv or .jsonl file with video and caption fields")
    records: list[tuple[int, dict[str, Any]]] = []
    try:
        if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise DatasetError(f"{path}:{number}: each line must be a JSON object, got {line.strip()[:60]!r}")
                        records.append((number, record))
        else:
            with open(path, encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames or "video" not in reader.fieldnames:
                    raise DatasetError(f"the captions CSV '{path}' needs a header row with the columns video,caption "
                                       f"(and optionally word); found {reader.fieldnames}")
                records = [(number, row) for number, row in enumerate(reader, 2)]
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot parse the captions file '{path}' ({exc}); use UTF-8 CSV or JSONL") from exc
    rows: dict[str, CaptionRow] = {}
    for number, record in records:
        video = str(record.get("video") or "").strip()
        if not video:
            raise DatasetError(f"{path}:{number}: the 'video' field is empty; give the video's file name inside --videos")
        if video in rows:
            raise DatasetError(f"{path}:{number}: the video {video!r} is listed twice; keep one caption per video")
        word = record.get("word")
        rows[video] = CaptionRow(video=video, caption=str(record.get("caption") or "").strip(),
                                 word=str(word).strip() or None if word is not None else None)
    return rows


def word_pattern(word: str) -> re.Pattern:
    """Whole-word, case-insensitive pattern of ``word`` (the subject splice's rule; several words match any spaces)."""
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(part) for part in word.lower().split()) + r"(?!\w)")


def choose_word(caption: str, word: Optional[str], classes: Sequence[str]) -> Optional[str]:
    """The subject word of a caption: ``word`` if given and in the caption, else the class word that occurs first
    in the caption (whole words, case-insensitive); None when there is none."""
    lowered = caption.lower()
    if word:
        return word.lower() if word_pattern(word).search(lowered) else None
    found = [(match.start(), cls.lower()) for cls in classes if (match := word_pattern(cls).search(lowered))]
    return min(found)[1] if found else None


def entry_id(video_name: str) -> str:
    """The entry folder's name: the video file's stem (also the name of its user mask PNG)."""
    return Path(video_name).stem


def write_mask_png(mask: torch.Tensor, path: Path) -> None:
    """Save a (H, W) bool mask as a palette PNG (index 1 = subject), the format of Grounded-SAM's ``mask_1.png``."""
    from PIL import Image

    image = Image.fromarray(mask.cpu().numpy().astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    image.save(path, optimize=False)


def mask_records(label: str, logit: float, box: Sequence[float]) -> list[dict[str, Any]]:
    """The ``mask.json`` list for one subject (value 1) after the background item (value 0), as Grounded-SAM."""
    return [{"value": 0, "label": "background"},
            {"value": 1, "label": label, "logit": round(float(logit), 4), "box": [round(float(v), 4) for v in box]}]


def write_entry(folder: Path, ident: str, source: Path, caption: str, word: str, info: Any, mask: torch.Tensor,
                records: list[dict[str, Any]]) -> None:
    """Fill an (empty, temporary) entry folder: the video (hard link, else a copy), entry.json, mask.json, mask PNG."""
    import shutil

    video = "video" + source.suffix.lower()
    try:
        os.link(source, folder / video)
    except OSError:
        shutil.copyfile(source, folder / video)
    write_mask_png(mask, folder / "mask_1.png")
    with open(folder / "mask.json", "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=2)
    entry = {"id": ident, "video": video, "source": source.name, "caption": caption, "word": word,
             "frames": info.frames, "width": info.width, "height": info.height, "fps": round(info.fps, 4)}
    with open(folder / "entry.json", "w", encoding="utf-8") as handle:
        json.dump(entry, handle, indent=2)


def is_dataset(root: Path) -> bool:
    """True for a folder written by ``dataset build``/``synthetic`` (it has dataset.json and entries/)."""
    return (root / "dataset.json").is_file() and (root / ENTRIES).is_dir()


def list_entries(root: str | os.PathLike) -> list[Path]:
    """The complete entry folders of one of our datasets, sorted by id (temporaries of a killed run excluded)."""
    from ..files import is_temporary

    root = Path(root)
    if not is_dataset(root):
        raise DatasetError(f"'{root}' is not a VideoBooth dataset (no dataset.json + entries/); build one with "
                           "`python -m videobooth_core dataset build` or `dataset synthetic`")
    return sorted(p for p in (root / ENTRIES).iterdir() if p.is_dir() and not is_temporary(p))


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, turning every failure into a DatasetError naming the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DatasetError(f"{what} missing: '{path}'; rebuild this entry (delete its folder and rerun the build)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{what} '{path}' is unreadable ({exc}); rebuild this entry") from exc


def subject_items(records: Any, where: Path) -> list[dict[str, Any]]:
    """The ``mask.json`` items that have a box (the background item has none), validated."""
    if not isinstance(records, list):
        raise DatasetError(f"'{where}' must hold a list of {{value, label, logit, box}} items; got {type(records).__name__}")
    items = [r for r in records if isinstance(r, dict) and r.get("box") is not None]
    for item in items:
        box = item.get("box")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise DatasetError(f"'{where}': the box {box!r} of item {item.get('value')!r} must be [x1, y1, x2, y2]")
        if not isinstance(item.get("value"), int):
            raise DatasetError(f"'{where}': item value {item.get('value')!r} must be an integer (mask_<value>.png)")
    if not items:
        raise DatasetError(f"'{where}' has no item with a box (only background); rebuild this entry")
    return items
