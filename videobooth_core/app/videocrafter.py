"""The command line's VideoCrafter1/2 road: ``generate --models DIR`` runs a VideoCrafter model when ``DIR`` holds
one (``videocrafter/`` or ``checkpoints/``) and no VideoBooth UNet, or when ``--model`` names one; ``make-tiny
--family videocrafter...`` writes a tiny set of a family.

The generation flags keep their names (the settings of :data:`~videobooth_core.settings.VIDEOCRAFTER_SETTINGS`
share VideoBooth's flags); a flag not given takes the VideoCrafter model's official value (320x512 or 576x1024, 50
DDIM steps, eta 1, guidance 12, seed 123, the empty negative prompt, fps 28 / 8 as the conditioning), a given one
is used as given (``--steps 250`` is 250 steps). ``--sampler`` picks the official DDIM (``ddim``, the default) or
one of the pack's fast samplers on the model's own schedule (``dpmpp_2m``, ``euler``, ``euler_ancestral``,
``unipc``; ``lcm`` and ``ddpm`` are refused by name). The video file is written at ``--fps`` (default 8).
Long videos: ``--context-window/--context-overlap/--context-fuse`` denoise the frames in windows of consecutive
frames fused at every step (``videocrafter_pipeline.context_options``; every kind, README: VideoCrafter).
VideoBooth-only inputs (subject photos, LoRAs, SD checkpoints, ``--noise-reuse``, any other VideoBooth setting,
best of N, other attention kernels, streamed weights) are refused by name: they are not wired to this family.
``--jobs`` runs a jobs file with the folder's VideoCrafter model (``app.jobs``: a line takes ``prompt``,
``start_image`` and the VideoCrafter settings).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import OutputError, SamplingError, VideoBoothError, explain
from ..settings import SETTINGS, VIDEOCRAFTER_SETTINGS
from .common import progress_callback

_REFUSED = {"image": "--image", "word": "--word", "subject": "--subject", "extend": "--extend", "mask": "--mask",
            "bbox": "--bbox", "base_checkpoint": "--base-checkpoint", "lora": "--lora", "stream_weights": "--stream-weights"}


VIDEOCRAFTER_ONLY_FLAGS = ("model", "text_encoder", "image_encoder")
"""``generate``'s flags that only the VideoCrafter road reads (one video, and batch jobs of a VideoCrafter models
folder: ``app.jobs.run``)."""


def add_videocrafter_args(parser: argparse.ArgumentParser) -> None:
    official = "; ".join(f"{spec.flag} {spec.describe_default()}" for spec in VIDEOCRAFTER_SETTINGS.values())
    group = parser.add_argument_group(
        "VideoCrafter1/2 (when --models holds one; README: VideoCrafter)",
        f"The generation flags not given take the VideoCrafter model's official values ({official}), not the "
        "defaults shown above; VideoBooth-only flags are refused. --sampler: ddim is the official DDIM (exact); "
        "dpmpp_2m, euler, euler_ancestral, unipc the pack's fast samplers on the model's schedule (e.g. --sampler "
        "dpmpp_2m --steps 25); lcm and ddpm do not apply.")
    group.add_argument("--model", help="the VideoCrafter checkpoint to use when --models holds several: its file name "
                                       "or kind, e.g. videocrafter2 (default: the only one)")
    group.add_argument("--text-encoder", help="the OpenCLIP ViT-H/14 text encoder, for a checkpoint without "
                                              "cond_stage_model.*: SD 2.x text_encoder / ComfyUI clip_h, or "
                                              "open_clip_pytorch_model.bin (default: the checkpoint's)")
    group.add_argument("--image-encoder", help="image-to-video: the OpenCLIP ViT-H/14 image encoder for a checkpoint "
                                               "without embedder.*: ComfyUI's clip_vision_h (default: the checkpoint's)")


def uses_videocrafter(args: argparse.Namespace) -> bool:
    """Whether ``generate`` runs a VideoCrafter model: ``--model`` was given, or ``--models`` holds a VideoCrafter
    checkpoint and no VideoBooth UNet (a folder without ``videocrafter/`` or ``checkpoints/`` is never scanned)."""
    if getattr(args, "model", None):
        return True
    models = Path(args.models)
    if not any((models / sub).is_dir() for sub in ("videocrafter", "checkpoints")):
        return False
    from ..loading.weight_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
    from ..videocrafter_pipeline import find_videocrafter_models

    videobooth = models / "videobooth"
    has_videobooth = videobooth.is_dir() and any(p.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
                                                 for p in videobooth.iterdir())
    return bool(find_videocrafter_models(models)) and not has_videobooth


def _whole(value):
    """``--fps`` is a float flag (VideoBooth writes any fps); VideoCrafter's fps conditioning is a whole number."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def refuse_videobooth_flags(args: argparse.Namespace) -> None:
    """VideoBoothError naming every VideoBooth-only flag or setting given to a VideoCrafter run (one video or
    ``--jobs``), before anything is read."""
    from ..settings import DEFAULT_ATTENTION

    given = [flag for key, flag in _REFUSED.items() if getattr(args, key, None)]
    if getattr(args, "best_of", 1) and args.best_of > 1:
        given.append("--best-of")
    if getattr(args, "attention", DEFAULT_ATTENTION) != DEFAULT_ATTENTION:
        given.append("--attention")
    given += [spec.flag for key, spec in SETTINGS.items()
              if key not in VIDEOCRAFTER_SETTINGS and getattr(args, key, None) is not None]
    if given:
        raise VideoBoothError(explain("these flags are VideoBooth's and do not apply to a VideoCrafter model",
                                      " ".join(given), "leave them out (VideoCrafter runs from a prompt, and a "
                                      "--start-image for the image-to-video model)"))


def request_from(args: argparse.Namespace):
    """The VideoCrafter request of a command line through the one request builder
    (:func:`.request.build_videocrafter_request`): a flag not given (None) takes the family's own default, a
    given one is used as given; every VideoBooth-only flag or setting given is refused by name."""
    from .request import build_videocrafter_request

    refuse_videobooth_flags(args)
    values = {key: getattr(args, key, None) for key in VIDEOCRAFTER_SETTINGS}
    values["fps"] = _whole(values["fps"])
    return build_videocrafter_request({**values, "prompt": args.prompt, "start_image": args.start_image})


def run_videocrafter(args: argparse.Namespace) -> int:
    import torch

    from ..latents_file import check_latents_target, write_result
    from ..loading.checkpoint import parse_dtype
    from ..video_io import check_output_path
    from ..videocrafter_pipeline import VideoCrafterPipeline, check_request, pick_videocrafter_model

    if not args.out:
        raise OutputError("--out is required: a .mp4, .gif or .webp file, or a folder for PNG frames")
    write_fps = args.fps if args.fps is not None else SETTINGS["fps"].default  # the file's; not the conditioning's
    out = check_output_path(args.out, overwrite=args.overwrite, fps=write_fps)
    request = request_from(args)
    if request.save_latents:  # OUT.latents.safetensors, refused as the video is (latents_file)
        check_latents_target(out, overwrite=args.overwrite)
    path, kind = pick_videocrafter_model(args.models, args.model)
    check_request(request, kind, multiple=16)  # everything but the UNet's own size multiple, before any load
    start = time.perf_counter()
    pipe = VideoCrafterPipeline.from_models_dir(args.models, args.model, dtype=parse_dtype(args.dtype),
                                                device=torch.device(args.device),
                                                text_encoder=args.text_encoder, image_encoder=args.image_encoder)
    request = pipe.check(request)  # sizes, frames, steps and the start image against this model, before sampling
    print(pipe.estimate_memory(request).describe(), file=sys.stderr)
    result = pipe.generate(request, callback=progress_callback("sampling"))
    latents = write_result(result, out, write_fps, overwrite=args.overwrite, save=request.save_latents)
    r = result.request
    windows = _windows_note(r)
    sampler = f"{r.steps} DDIM steps, eta {r.eta}" if r.sampler == "ddim" else f"{r.steps} {r.sampler} steps"
    print(f"done: {out} ({path.name}, {kind}; {r.frames} frames {r.width}x{r.height}{windows}, {sampler}, guidance "
          f"{r.guidance}, fps {r.fps}, seed {r.seed}; {time.perf_counter() - start:.1f} s)"
          + (f"; latents {latents}" if latents is not None else ""))
    return 0


def _windows_note(request) -> str:
    """``" in 3 windows of 16 (overlap 4, pyramid)"`` when context windows split the video, else empty."""
    from ..sampling.windows import context_windows
    from ..videocrafter_pipeline import context_options

    options = context_options(request)
    if options is None or not options.applies(request.frames):
        return ""
    count = len(context_windows(request.frames, options.window, options.overlap, options.schedule))
    return f" in {count} windows of {options.window} (overlap {options.overlap}, {options.fuse})"


def cmd_make_tiny_videocrafter(args: argparse.Namespace) -> int:
    from .tiny_videocrafter import make_tiny_videocrafter

    path = make_tiny_videocrafter(args.out, args.family, seed=args.seed)
    print(f"wrote a tiny RANDOM {args.family} set to {args.out} ({path.relative_to(args.out)}; for tests and demos, "
          "it generates noise)", file=sys.stdout)
    return 0


def cmd_convert_videocrafter(args: argparse.Namespace, out: Path) -> int:
    """``convert --videocrafter model.ckpt --out DIR``: ``DIR/<kind>.safetensors`` (``--dtype``, fp16 by default)."""
    from ..loading.checkpoint import parse_dtype
    from ..loading.videocrafter import convert_videocrafter_checkpoint, read_videocrafter_checkpoint

    if args.unet or args.mapper:
        raise VideoBoothError("convert --videocrafter converts one VideoCrafter checkpoint; run --unet/--mapper "
                              "(VideoBooth's files) as a separate command")
    kind, _ = read_videocrafter_checkpoint(args.videocrafter)
    written = convert_videocrafter_checkpoint(args.videocrafter, out / f"{kind}.safetensors",
                                              dtype=parse_dtype(args.dtype), overwrite=args.overwrite)
    print(f"wrote {written} ({kind}, {args.dtype}, {written.stat().st_size / 1e9:.2f} GB)")
    return 0
