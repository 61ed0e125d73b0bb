"""Command line: ``python -m videobooth_core {generate,demo,convert,make-tiny}``.

Bad input ends with exit code 2 and one line naming the problem; nothing partial is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

from ..errors import VideoBoothError
from ..sampling.schedulers import SAMPLERS, SPACINGS

logger = logging.getLogger("videobooth_core")

DEFAULT_MODELS_ENV = "VIDEOBOOTH_MODELS"


def _peak_memory_mb() -> float:
    """Peak resident memory of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "videobooth"


# -- argument parsing --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m videobooth_core", description="VideoBooth: videos of a specific subject from a prompt and a photo.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a video (or a batch of them with --jobs)")
    gen.add_argument("--models", required=True, help="models folder laid out like make-tiny's output (see README)")
    _add_generation_args(gen)
    gen.add_argument("--out", help="output .mp4/.gif/.webp, or a folder for PNG frames")
    gen.add_argument("--jobs", help="a .jsonl file with one generation per line (batch mode; needs --out-dir)")
    gen.add_argument("--out-dir", help="batch mode: folder for the outputs and the manifest")

    demo = sub.add_parser("demo", help="run the whole pipeline end to end (tiny random weights if none are installed)")
    demo.add_argument("--models", default=os.environ.get(DEFAULT_MODELS_ENV, "models"),
                      help=f"models folder with real weights (default: ${DEFAULT_MODELS_ENV} or ./models)")
    demo.add_argument("--out", default="videobooth_demo.gif", help="output video (default videobooth_demo.gif)")
    demo.add_argument("--steps", type=int, default=None, help="sampling steps (default 10 on tiny weights, 250 on real)")
    demo.add_argument("--device", default="cpu")

    conv = sub.add_parser("convert", help="convert the released .pt weights to safetensors")
    conv.add_argument("--unet", help="watermark_remove_module.pt")
    conv.add_argument("--mapper", help="mapper.pt")
    conv.add_argument("--out", required=True, help="output folder (e.g. ComfyUI/models/videobooth)")
    conv.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")

    tiny = sub.add_parser("make-tiny", help="write a complete tiny random model set (for tests and demos)")
    tiny.add_argument("--out", required=True, help="output models folder")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", help="photo of the subject")
    p.add_argument("--mask", help="subject mask (white/nonzero = subject); default: whole image or --bbox")
    p.add_argument("--bbox", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"), help="subject box in pixels")
    p.add_argument("--prompt", help="text prompt, e.g. 'a dog running on the beach'")
    p.add_argument("--word", help="the prompt's word naming the subject, e.g. 'dog'")
    p.add_argument("--negative", default="None", help="unconditional prompt (official: the literal 'None')")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS,
                   help="ddpm: the official respaced ancestral DDPM (default); others: diffusers samplers on the same schedule")
    p.add_argument("--spacing", default="trailing", choices=SPACINGS, help="timestep spacing of the diffusers samplers")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--guidance", default="official", choices=("official", "all"),
                   help="official: channels 0-2 guided, channel 3 conditional (as released); all: every channel")
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="UNet precision: fp32 (official numerics), bf16 (about 2x faster on CPUs with AVX-512 BF16), "
                        "fp16 (GPUs only: very slow on CPUs)")
    p.add_argument("--device", default="cpu")
    speed = p.add_argument_group("opt-in speed modes (each changes the video; measured deviations in the README)")
    speed.add_argument("--single-frame-image-prompt", action="store_true",
                       help="run the image-prompt stream on one frame instead of all (about a quarter less compute)")
    speed.add_argument("--image-prompt-steps", type=float, nargs=2, metavar=("START", "END"), default=None,
                       help="inject the image prompt only in this fraction of the steps (official: 0 1; e.g. 0 0.5)")
    speed.add_argument("--no-watermark-branch", action="store_true",
                       help="skip the watermark-removal branch (the released model always runs it)")
    p.add_argument("--stream-weights", action="store_true",
                   help="keep the UNet's weights on disk and read them block by block (same video, a fraction of the "
                        "memory; needs the UNet as .safetensors: see convert)")
    p.add_argument("--fps", type=float, default=8.0)


# -- commands ------------------------------------------------------------------------------------------
def _progress_callback(total_label: str):
    from tqdm import tqdm

    bar = None

    def callback(step: int, total: int, _output) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=total_label, unit="step", file=sys.stderr, leave=True)
        bar.update(1)
        if step + 1 == total:
            bar.close()

    return callback


def _request_from(args: argparse.Namespace, base_dir: Path | None = None):
    from ..conditioning.image_prompt import load_image, load_mask
    from ..pipeline import GenerationRequest

    if not args.prompt:
        raise VideoBoothError("--prompt is required: describe the video, e.g. --prompt 'a dog running on the beach'")
    if (args.image is None) != (args.word is None):
        raise VideoBoothError("--image and --word go together: give the subject's photo and the prompt's word naming it")
    def resolve(path: str) -> str | Path:
        return path if base_dir is None or Path(path).is_absolute() else base_dir / path

    image = load_image(resolve(args.image)) if args.image else None
    mask = load_mask(resolve(args.mask)) if args.mask else None
    request = GenerationRequest(
        prompt=args.prompt, subject_word=args.word, image=image, mask=mask,
        bbox=tuple(args.bbox) if args.bbox else None, negative_prompt=args.negative, frames=args.frames,
        width=args.width, height=args.height, steps=args.steps, cfg_scale=args.cfg, guidance=args.guidance,
        seed=args.seed, sampler=args.sampler, spacing=getattr(args, "spacing", "trailing"), eta=getattr(args, "eta", 0.0),
    )
    request.options = _sampling_options(args)
    request.validate()
    if args.word is not None:  # fail on a word missing from the prompt before loading any model
        from ..conditioning.text import substitute_subject

        substitute_subject(args.prompt, args.word)
    if image is not None:  # fail on a bad mask/bbox before loading any model
        from ..conditioning.image_prompt import prepare_image_prompt

        prepare_image_prompt(image, mask, request.bbox)
    return request


def _sampling_options(args: argparse.Namespace):
    from ..pipeline import SamplingOptions

    steps = getattr(args, "image_prompt_steps", None)
    return SamplingOptions(
        single_frame_image_prompt=getattr(args, "single_frame_image_prompt", False),
        image_prompt_steps=tuple(steps) if steps else (0.0, 1.0),
        watermark_branch=not getattr(args, "no_watermark_branch", False),
    )


def _speed_modes(options) -> list[str]:
    """The opt-in speed modes in use (empty: the exact, official computation)."""
    if options is None:
        return []
    modes = ["single-frame-image-prompt"] if options.single_frame_image_prompt else []
    if tuple(options.image_prompt_steps) != (0.0, 1.0):
        modes.append(f"image-prompt-steps {options.image_prompt_steps[0]:g}-{options.image_prompt_steps[1]:g}")
    if not options.watermark_branch:
        modes.append("no-watermark-branch")
    return modes


def _summary(result, request, seconds: float, out: Path, args) -> str:
    return json.dumps({
        "output": str(out), "seconds": round(seconds, 2), "peak_rss_mb": round(_peak_memory_mb(), 1),
        "frames": request.frames, "size": [request.width, request.height], "steps": request.steps,
        "sampler": getattr(args, "sampler", "ddpm"), "cfg": request.cfg_scale, "guidance": request.guidance,
        "seed": request.seed, "dtype": getattr(args, "dtype", "fp32"), "prompt_used": result.prompt_used,
        "stream_weights": getattr(args, "stream_weights", False), "speed_modes": _speed_modes(request.options),
        **result.info,
    })


def cmd_generate(args: argparse.Namespace) -> int:
    from ..pipeline import VideoBoothPipeline
    from .video_io import check_output_path, write_frames

    if args.jobs:
        from .jobs import run_jobs

        if not args.out_dir:
            raise VideoBoothError("--jobs needs --out-dir (the folder for the outputs and the manifest)")
        return run_jobs(args)
    if not args.out:
        raise VideoBoothError("--out is required: a .mp4, .gif or .webp file, or a folder for PNG frames")
    out = check_output_path(args.out)
    request = _request_from(args)
    start = time.perf_counter()
    pipe = VideoBoothPipeline.from_models_dir(args.models, dtype=args.dtype, device=args.device,
                                              stream_weights=args.stream_weights)
    result = pipe.generate(request, callback=_progress_callback("sampling"))
    write_frames(result.frames, out, args.fps)
    print("done: " + _summary(result, request, time.perf_counter() - start, out, args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..loading.checkpoint import convert_released_weights

    bars: dict[str, tqdm] = {}

    def progress(label: str, done: int, total: int) -> None:
        if label not in bars:
            bars[label] = tqdm(total=total, desc=f"converting {label}", unit="tensor", file=sys.stderr)
        bars[label].update(1)
        if done == total:
            bars[label].close()

    written = convert_released_weights(args.unet, args.mapper, args.out, args.dtype, progress)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB)")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import make_tiny

    out = make_tiny(args.out, seed=args.seed)
    print(f"wrote a tiny RANDOM model set to {out} (for tests and demos; it generates noise)")
    return 0


COMMANDS = {"generate": cmd_generate, "demo": cmd_demo, "convert": cmd_convert, "make-tiny": cmd_make_tiny}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("videobooth_core.pipeline").setLevel(logging.INFO)  # the memory estimate before sampling
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: every file is local
    from ..sampling.memory import tune_allocator

    tune_allocator()  # this process is ours: keep glibc's heap from fragmenting (lower peak memory, same speed)
    try:
        return COMMANDS[args.command](args)
    except VideoBoothError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
