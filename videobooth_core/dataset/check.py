"""``dataset check`` (counts, frame counts, broken or missing files, empty or whole-frame masks) and
``dataset preview`` (a contact sheet: first frame, mask, image prompt, caption per entry)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import DatasetError, ImagePromptError, VideoError
from ..files import is_temporary
from . import layout


@dataclass
class CheckReport:
    """Per-class counts, frame-count range, and the problems found (entry id -> list of problems)."""

    entries: int = 0
    classes: Counter = field(default_factory=Counter)
    frames: list[int] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)

    def add(self, ident: str, problem: str) -> None:
        self.problems.setdefault(ident, []).append(problem)

    def summary(self) -> str:
        lines = [f"{self.entries} entries; per class: " + (", ".join(f"{k} {v}" for k, v in sorted(self.classes.items())) or "-")]
        if self.frames:
            lines.append(f"frames per video: min {min(self.frames)}, median {sorted(self.frames)[len(self.frames) // 2]}, "
                         f"max {max(self.frames)}")
        if self.leftovers:
            lines.append(f"{len(self.leftovers)} leftovers of an interrupted build (removed by the next build): "
                         + ", ".join(self.leftovers))
        for ident, problems in sorted(self.problems.items()):
            lines += [f"PROBLEM {ident}: {p}" for p in problems]
        lines.append(f"{len(self.problems)} entries with problems" if self.problems else "no problems found")
        return "\n".join(lines)


def check_dataset(root: str | os.PathLike, decode: bool = True) -> CheckReport:
    """Check every entry of one of our datasets; ``decode=False`` skips decoding the videos (faster)."""
    from ..conditioning.image_prompt import load_mask
    from ..video_io import video_info

    root = Path(root)
    report = CheckReport()
    entries = layout.list_entries(root)
    report.leftovers = sorted(p.name for p in (root / layout.ENTRIES).iterdir() if is_temporary(p))
    for folder in entries:
        ident = folder.name
        report.entries += 1
        try:
            entry = layout.read_json(folder / "entry.json", "entry.json")
            items = layout.subject_items(layout.read_json(folder / "mask.json", "mask.json"), folder / "mask.json")
        except DatasetError as exc:
            report.add(ident, str(exc))
            continue
        word = str(entry.get("word") or "?")
        report.classes[word] += 1
        if not str(entry.get("caption") or "").strip():
            report.add(ident, "empty caption")
        elif layout.choose_word(str(entry["caption"]), word, ()) is None:
            report.add(ident, f"the word {word!r} is not in the caption {entry['caption']!r}")
        video = folder / str(entry.get("video", ""))
        size: Optional[tuple[int, int]] = (entry.get("height"), entry.get("width"))
        if not video.is_file():
            report.add(ident, f"video file missing: {video.name}")
        elif decode:
            try:
                info = video_info(video)
                report.frames.append(info.frames)
                if info.frames != entry.get("frames"):
                    report.add(ident, f"decodes to {info.frames} frames, entry.json says {entry.get('frames')}")
                size = (info.height, info.width)
            except VideoError as exc:
                report.add(ident, f"broken video: {exc}")
        else:
            report.frames.append(int(entry.get("frames") or 0))
        for item in items:
            path = folder / f"mask_{item['value']}.png"
            try:
                mask = load_mask(path)
            except ImagePromptError as exc:
                report.add(ident, f"mask_{item['value']}.png: {exc}")
                continue
            if tuple(mask.shape) != tuple(size):
                report.add(ident, f"mask_{item['value']}.png is {tuple(mask.shape)} (H, W), the video {tuple(size)}")
            covered = float(mask.float().mean())
            if covered == 0.0:
                report.add(ident, f"mask_{item['value']}.png is empty")
            elif covered == 1.0:
                report.add(ident, f"mask_{item['value']}.png covers the whole frame")
            x1, y1, x2, y2 = (int(v) for v in item["box"])
            if not (0 <= x1 < x2 <= mask.shape[1] and 0 <= y1 < y2 <= mask.shape[0]):
                report.add(ident, f"box {item['box']} is empty or outside the {mask.shape[1]}x{mask.shape[0]} frame")
    return report


def preview_sheet(root: str | os.PathLike, out: str | os.PathLike, limit: int = 16, thumb: int = 128) -> Path:
    """Write a contact sheet PNG: one row per entry (first ``limit``): frame 0, mask overlay, image prompt
    (the 256 VAE input), caption and word. Returns ``out``."""
    from PIL import Image, ImageDraw

    from ..conditioning.image_prompt import load_mask, prepare_image_prompt
    from ..files import atomic_path
    from ..video_io import read_frames

    entries = layout.list_entries(root)[:limit]
    if not entries:
        raise DatasetError(f"'{root}' has no entries to preview; build the dataset first")
    text_width = 320
    sheet = Image.new("RGB", (3 * (thumb + 8) + text_width, len(entries) * (thumb + 8) + 8), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)

    def fit(image: Image.Image) -> Image.Image:
        image = image.copy()
        image.thumbnail((thumb, thumb))
        return image

    for row, folder in enumerate(entries):
        y = 8 + row * (thumb + 8)
        try:
            entry = layout.read_json(folder / "entry.json", "entry.json")
            item = layout.subject_items(layout.read_json(folder / "mask.json", "mask.json"), folder / "mask.json")[0]
            frame = read_frames(folder / entry["video"], [0])[0]
            mask = load_mask(folder / f"mask_{item['value']}.png")
            prompt = prepare_image_prompt(frame, mask, item["box"])
        except (DatasetError, ImagePromptError, VideoError) as exc:
            draw.text((8, y + 4), f"{folder.name}: {exc}"[:120], fill=(255, 90, 90))
            continue
        overlay = frame.clone()
        overlay[mask] = (overlay[mask].float() * 0.4 + torch.tensor([255.0, 0.0, 0.0]) * 0.6).to(torch.uint8)
        overlay_image = Image.fromarray(overlay.numpy())
        ImageDraw.Draw(overlay_image).rectangle([float(v) for v in item["box"]], outline=(0, 255, 0))
        prompt_image = Image.fromarray((prompt.preview()[0] * 255).round().to(torch.uint8).numpy())
        for column, image in enumerate((Image.fromarray(frame.numpy()), overlay_image, prompt_image)):
            sheet.paste(fit(image), (8 + column * (thumb + 8), y))
        x = 8 + 3 * (thumb + 8)
        draw.text((x, y + 4), folder.name, fill=(255, 255, 255))
        draw.text((x, y + 22), f"word: {entry.get('word')}   frames: {entry.get('frames')}", fill=(200, 200, 120))
        caption = str(entry.get("caption", ""))
        for k in range(0, min(len(caption), 200), 48):
            draw.text((x, y + 40 + k // 48 * 16), caption[k : k + 48], fill=(220, 220, 220))
    out = Path(out)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out
