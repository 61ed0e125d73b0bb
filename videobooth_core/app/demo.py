"""``python -m videobooth_core demo``: the whole pipeline end to end on any machine.

With real weights in the models folder it uses them; otherwise it writes the tiny random model set to a
cache folder and says so plainly. The image prompt is drawn here (a round subject on a textured
background, with its mask), so nothing has to be downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..errors import CheckpointError, OutputError, explain
from ..files import check_output_folder
from ..settings import DEFAULT_PRECISION, SETTINGS, check_number
from .common import cache_dir, progress_callback, run_summary

DEMO_PROMPT = "a ball rolling on the grass"
DEMO_WORD = "ball"


def synthetic_subject(width: int = 320, height: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A drawn subject photo (H, W, 3) uint8 on a textured background and its (H, W) bool mask."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    background = torch.stack([60 + 40 * torch.sin(xs / 17), 140 + 30 * torch.cos(ys / 11), 70 + 0 * xs], dim=-1)
    background = background + 12 * torch.randn(height, width, 3, generator=generator)
    cx, cy, radius = width * 0.55, height * 0.5, min(width, height) * 0.3
    distance = torch.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
    mask = distance <= radius
    angle = torch.atan2(ys - cy, xs - cx)
    stripes = (torch.sin(6 * angle) > 0).float()
    ball = torch.stack([230 - 30 * stripes, 80 + 150 * stripes, 40 + 170 * stripes], dim=-1)
    shade = (1.1 - 0.4 * (distance / radius)).clamp(0.5, 1.1)[..., None]
    image = torch.where(mask[..., None], ball * shade, background)
    return image.round().clamp(0, 255).to(torch.uint8), mask


def run_demo(args: argparse.Namespace) -> int:
    from ..loading.models_dir import ModelFiles
    from ..pipeline import GenerationRequest, VideoBoothPipeline
    from .tiny import MARKER_FILE, make_tiny
    from ..video_io import check_output_path, write_frames

    overwrite = getattr(args, "overwrite", False)
    out = check_output_path(args.out, overwrite=overwrite)  # before any model loads or is written
    steps_setting = SETTINGS["steps"]
    check_number("--steps", args.steps, 10, whole=True, minimum=steps_setting.minimum, maximum=steps_setting.maximum)
    models = Path(args.models)
    tiny = False
    try:
        files = ModelFiles.from_models_dir(models)
        tiny = (models / MARKER_FILE).exists()
    except CheckpointError as error:
        cache = cache_dir() / "tiny_models"
        if not (cache / MARKER_FILE).exists():
            try:  # before anything is said or written: the tiny set can be written there
                check_output_folder(cache, "the cache folder")
            except OutputError as refusal:  # e.g. a read-only HOME
                raise OutputError(explain(f"no VideoBooth weights in {str(models)!r} for the demo, and "
                                          f"{str(refusal).split(': ')[0]}", cache, "give --models a models folder, "
                                          "or set XDG_CACHE_HOME to a writable folder")) from None
        print(f"No VideoBooth weights in {models.resolve()} ({str(error).split(';')[0]}).", file=sys.stderr)
        print(f"Running the whole pipeline on TINY RANDOM weights written to {cache}: the video will be noise.\n"
              f"For real videos put the released weights in {models.resolve()} as the README describes "
              f"(videobooth/, vae/, clip_vision/, text_encoders/).", file=sys.stderr)
        if not (cache / MARKER_FILE).exists():
            make_tiny(cache)
        files = ModelFiles.from_models_dir(cache)
        tiny = True
    if tiny:
        print("Weights: tiny and random (this proves the pipeline runs, not what it can draw).", file=sys.stderr)

    image, mask = synthetic_subject()
    steps = args.steps or (10 if tiny else 250)
    # the official settings (the settings' defaults: 16 frames of 256 x 256, seed 10), fewer steps on tiny weights
    request = GenerationRequest(prompt=DEMO_PROMPT, subject_word=DEMO_WORD, image=image, mask=mask, steps=steps)
    start = time.perf_counter()
    pipe = VideoBoothPipeline.from_files(files, dtype=DEFAULT_PRECISION, device=args.device)
    result = pipe.generate(request, callback=progress_callback("sampling"))
    write_frames(result.frames, out, fps=request.fps, overwrite=overwrite)
    print("done: " + run_summary(result, request, time.perf_counter() - start, out, args))
    return 0
