"""Command line: ``python -m videobooth_core {generate,demo,convert,make-tiny}``.

Bad input ends with exit code 2 and one line naming the problem; nothing partial is left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

from ..errors import OutputError, Terminated, VideoBoothError, out_of_memory
from ..allocator import ALLOCATORS, apply_allocator, chosen_allocator
from ..settings import (
    ATTENTION_BACKENDS,
    CONVERT_PRECISION,
    DEFAULT_ATTENTION,
    DEFAULT_DEVICE,
    DEFAULT_PRECISION,
    PRECISIONS,
    SETTINGS,
    add_setting_flags,
)
from .common import cache_dir, progress_callback, run_summary

logger = logging.getLogger("videobooth_core")

DEFAULT_MODELS_ENV = "VIDEOBOOTH_MODELS"


# -- argument parsing --------------------------------------------------------------------------------
PROG = "python -m videobooth_core"
GENERATE_EXAMPLES = f"""examples:
  # a subject video in minutes on a CPU: the fast sampler (a cut-out PNG's alpha is its mask)
  {PROG} generate --models models --image dog.png --word dog \\
      --prompt "a dog running on the beach" --sampler dpmpp_2m --steps 25 --out dog.mp4

  # the official settings (250 ddpm steps: hours on a CPU, minutes on a GPU), a photo and its mask
  {PROG} generate --models models --image dog.jpg --mask dog_mask.png --word dog \\
      --prompt "a dog running on the beach" --device cuda --out dog.mp4

  # text-to-video, written as a folder of PNG frames
  {PROG} generate --models models --prompt "waves at sunset" --sampler dpmpp_2m --steps 25 --out waves

  # a batch: one JSON object per line, keys named like the flags, e.g.
  #   {{"prompt": "a dog running on the beach", "word": "dog", "image": "dog.png", "seed": 3}}
  # the flags below set every line's defaults (prompt, word, image, mask, bbox and out go on the lines)
  {PROG} generate --models models --jobs jobs.jsonl --out-dir videos --sampler dpmpp_2m --steps 25
"""
DEMO_EXAMPLES = f"""examples:
  {PROG} demo                      # tiny random weights if ./models holds none: proves the install works
  {PROG} demo --models models --steps 25 --out demo.gif
"""
CONVERT_EXAMPLES = f"""examples:
  {PROG} convert --unet watermark_remove_module.pt --mapper mapper.pt --out models/videobooth
  {PROG} convert --videocrafter VideoCrafter2/model.ckpt --out models/videocrafter
"""
TINY_EXAMPLES = f"""examples:
  {PROG} make-tiny --out tiny_models && {PROG} generate --models tiny_models --prompt "a cat" --steps 2 --out cat.gif
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; the help texts state their own defaults."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error:`` line and exit code 2, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, formatter_class=_Formatter,
                     description="VideoBooth: videos of a specific subject from a prompt and a photo.",
                     epilog=f"Each command explains its flags: {PROG} generate --help")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (default: warnings only)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate a video (or a batch of them with --jobs)", formatter_class=_Formatter,
                         description="Generate a video of the subject in the photo doing what the prompt says. Every "
                                     "setting is checked before any model loads.", epilog=GENERATE_EXAMPLES)
    gen.add_argument("--models", required=True, help="models folder laid out like make-tiny's output (see README); "
                                                       "required")
    _add_generation_args(gen)
    sd = gen.add_argument_group("SD 1.x checkpoints and LoRAs on the spatial layers (README: SD 1.x checkpoints and LoRAs)")
    sd.add_argument("--base-checkpoint", metavar="PATH",
                    help="an SD 1.x checkpoint (single file, e.g. from ComfyUI/models/checkpoints, or a diffusers UNet "
                         "folder) whose spatial layers replace VideoBooth's (default: none)")
    sd.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                    help="an SD 1.x LoRA (kohya, diffusers or PEFT), strength 1 by default; repeat to stack "
                         "(default: none)")
    sd.add_argument("--lora-kv", choices=("mapper", "ignore"), default=None,
                    help="LoRA key/value layers: onto the mapper's projections, which VideoBooth attends with, or left "
                         "out (default: mapper for LoRAs, ignore for --base-checkpoint)")
    gen.add_argument("--out", help="output .mp4/.gif/.webp, or a folder for PNG frames (required without --jobs)")
    gen.add_argument("--jobs", help="a .jsonl file with one generation per line: batch mode, needs --out-dir (default: none, one video)")
    gen.add_argument("--out-dir", help="batch mode: folder for the outputs and the manifest (required with --jobs)")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace an existing output (never a folder holding anything but frames written here) "
                          "(default: refuse)")
    from .videocrafter import add_videocrafter_args  # VideoCrafter1/2: the family is read from --models

    add_videocrafter_args(gen)

    demo = sub.add_parser("demo", help="run the whole pipeline end to end (tiny random weights if none are installed)",
                          formatter_class=_Formatter, epilog=DEMO_EXAMPLES)
    demo.add_argument("--models", default=os.environ.get(DEFAULT_MODELS_ENV, "models"),
                      help=f"models folder with real weights (default: ${DEFAULT_MODELS_ENV} or ./models)")
    demo.add_argument("--out", default="videobooth_demo.gif", help="output video (default: videobooth_demo.gif)")
    demo.add_argument("--steps", type=int, default=None, help="sampling steps (default: 10 on tiny weights, 250 on real)")
    demo.add_argument("--device", default=DEFAULT_DEVICE, help=f"cpu, cuda, cuda:N or mps (default: {DEFAULT_DEVICE})")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: refuse)")

    conv = sub.add_parser("convert", help="convert the released .pt weights to safetensors", formatter_class=_Formatter,
                          epilog=CONVERT_EXAMPLES)
    conv.add_argument("--unet", help="the released watermark_remove_module.pt (default: none)")
    conv.add_argument("--mapper", help="the released mapper.pt (default: none)")
    conv.add_argument("--videocrafter", metavar="MODEL_CKPT",
                      help="a VideoCrafter1/2 model.ckpt: written as <out>/<kind>.safetensors, every tensor under its "
                           "released name (default: none)")
    conv.add_argument("--out", required=True, help="output folder (e.g. ComfyUI/models/videobooth); required")
    conv.add_argument("--dtype", choices=PRECISIONS, default=CONVERT_PRECISION,
                      help=f"precision of the written weights (default: {CONVERT_PRECISION})")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace videobooth_unet/mapper.safetensors already in --out (default: refuse)")

    tiny = sub.add_parser("make-tiny", help="write a complete tiny random model set (for tests and demos)",
                          formatter_class=_Formatter, epilog=TINY_EXAMPLES)
    tiny.add_argument("--out", required=True, help="output models folder; required")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    tiny.add_argument("--family", default="videobooth",
                      choices=("videobooth", "videocrafter1-t2v-512", "videocrafter1-t2v-1024", "videocrafter1-i2v-512",
                               "videocrafter2"),
                      help="which model family the tiny set is of (default: videobooth)")
    from ..dataset.cli import add_dataset_parser  # the training-data commands live with the dataset package

    add_dataset_parser(sub)
    from ..evaluation.cli import add_best_of_args, add_evaluate_parser  # the metrics live with the evaluation package

    add_best_of_args(gen)
    add_evaluate_parser(sub)
    from ..training.cli import add_train_parser  # the trainer lives in its own package

    add_train_parser(sub)
    return parser


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """The generation flags: the subject and prompt, then every setting of :data:`settings.SETTINGS` (flag,
    default, range, help and jobs key come from there), then the per-run flags."""
    p.add_argument("--prompt", help="text prompt (required), e.g. 'a dog running on the beach'")
    p.add_argument("--word", help="the prompt's word naming the subject, e.g. 'dog' (required with --image; matched "
                                  "as a whole word, see --subject-match)")
    p.add_argument("--image", help="photo of the subject (default: none, text-to-video)")
    p.add_argument("--mask", help="subject mask, white/nonzero = subject (default: the photo's alpha channel if it has "
                                  "one, else --bbox or the whole photo)")
    p.add_argument("--bbox", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"),
                   help="subject box in pixels (default: the mask's box, or the whole photo)")
    p.add_argument("--subject", action="append", nargs="+", metavar="SPEC",
                   help="another subject, each photo bound to its own word of the prompt; repeat it for several: "
                        "WORD IMAGE [MASK] [strength=S] [region=X1,Y1,X2,Y2] [bbox=X1,Y1,X2,Y2]; strength: its "
                        "image-prompt strength (default --image-prompt-strength); region: where in the video its "
                        "features act, fractions of the frame (default everywhere); bbox: its box in the photo in "
                        "pixels. With --image/--word that subject comes first (default: none)")
    p.add_argument("--start-image", metavar="IMG",
                   help="image-to-video: the video's first frame is this image (resized to cover the video, "
                        "centre-cropped); it can also be the subject's --image (default: none)")
    p.add_argument("--extend", metavar="VIDEO",
                   help="continue a video (.mp4, .gif, .webp or a folder of frames): its last --extend-frames frames "
                        "are the new video's first frames, counted in --frames (default: none)")
    speed = p.add_argument_group("opt-in modes (each changes the video: speed modes and the image prompt's strength; "
                                 "measured deviations in the README)")
    # unset: a flag not given stays None, so each family takes its own default (VideoBooth's: see
    # _fill_setting_defaults; VideoCrafter's: app.videocrafter) and a given value is never mistaken for a default
    add_setting_flags(p, SETTINGS, unset=True, group_of=lambda spec: speed if spec.section == "options" else p)
    p.add_argument("--dtype", default=DEFAULT_PRECISION, choices=PRECISIONS,
                   help="UNet precision: fp32 (official numerics), bf16 (about 2x faster on CPUs with AVX-512 BF16), "
                        f"fp16 (GPUs only: very slow on CPUs) (default: {DEFAULT_PRECISION})")
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help=f"cpu, cuda, cuda:N or mps; must exist on this machine (default: {DEFAULT_DEVICE})")
    p.add_argument("--stream-weights", action="store_true",
                   help="keep the UNet's weights on disk and read them block by block (same video, a fraction of the "
                        "memory; needs the UNet as .safetensors: see convert) (default: off)")
    p.add_argument("--allocator", default=None, choices=ALLOCATORS,
                   help="how this process allocates memory: fast (freed memory stays in the heap for reuse: the "
                        "fastest steps, measured 0.86x the time of an fp32 step against glibc, but about 0.75 GB more "
                        "peak), glibc (glibc's adaptive default) or lean (large blocks mapped and returned one by one: "
                        "the lowest peak, the slowest steps) (default: lean with --stream-weights, else fast)")
    p.add_argument("--attention", default=DEFAULT_ATTENTION, choices=ATTENTION_BACKENDS,
                   help="attention kernel: sdpa (fused, the tested default), dedup (frames 0 and 1 attend to one copy "
                        "of frame 0: fewer FLOPs, not bit-identical, measured deviation in the README), math (the "
                        f"official order of operations, slow; for checking) (default: {DEFAULT_ATTENTION})")


# -- commands ------------------------------------------------------------------------------------------
def _request_from(args: argparse.Namespace):
    """The validated GenerationRequest of a ``generate`` command line, before any model loads: the one request
    builder (:func:`.request.build_request`) with the flags' values, the models folder's tokenizer (the prompts
    against CLIP's 77 tokens) and the device; messages name the flags."""
    from ..settings import flag_names, load_prompt_tokenizer
    from .request import INPUT_KEYS, build_request

    values = {key: getattr(args, key, None) for key in (*INPUT_KEYS, *SETTINGS) if key != "subjects"}
    if getattr(args, "subject", None):  # --subject WORD IMAGE [MASK] [key=value...], repeatable
        from .subjects import parse_subject_argument

        values["subjects"] = [parse_subject_argument(tokens) for tokens in args.subject]
    request = build_request(values, validate=False)  # every setting and file checked before the models folder
    tokenizer = load_prompt_tokenizer(args.models) if getattr(args, "models", None) else None
    request.validate(tokenizer, getattr(args, "device", None), names=flag_names)
    return request


def _sd_model_args(args: argparse.Namespace) -> list[tuple[str, float]]:
    """``--base-checkpoint`` / ``--lora`` checked before any model loads: each strength a number in its range,
    each file present, readable and of its kind (read from its header; with --jobs they are every line's
    default, checked here once)."""
    from ..loading.inputs import check_weight_input
    from ..loading.lora import parse_lora_argument
    from ..settings import check_lora_strength

    loras = []
    for value in getattr(args, "lora", None) or []:
        path, strength = parse_lora_argument(value)
        if path == value and ":" in value and not Path(value).exists():  # PATH:STRENGTH with a strength no number
            name, _, tail = value.rpartition(":")
            raise VideoBoothError(f"--lora {value!r}: the strength {tail!r} is not a number; give PATH or "
                                  f"PATH:STRENGTH, e.g. --lora {name}:0.8")
        loras.append((path, check_lora_strength(strength, f"the strength of --lora {path}")))
    base = getattr(args, "base_checkpoint", None)
    if base:
        check_weight_input(base, "--base-checkpoint", "base_checkpoint")
    for path, _ in loras:
        check_weight_input(path, "--lora", "lora")
    return loras


def _fill_setting_defaults(args: argparse.Namespace) -> None:
    """A VideoBooth run: every setting flag not given (None) takes its :data:`SETTINGS` default."""
    for key, spec in SETTINGS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, spec.default)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..evaluation.best_of import check_best_of
    from ..files import check_output_folder
    from ..latents_file import check_latents_target, write_result
    from ..pipeline import VideoBoothPipeline
    from ..video_io import check_output_path

    from .videocrafter import run_videocrafter, uses_videocrafter

    # --models holds a VideoCrafter model (and no VideoBooth UNet), or --model names one
    videocrafter = uses_videocrafter(args)
    if videocrafter and not args.jobs:
        return run_videocrafter(args)
    if not videocrafter:  # VideoCrafter's flags not given stay None: its own defaults (app.videocrafter)
        _fill_setting_defaults(args)
    if args.jobs:
        from .jobs import run_jobs

        if not args.out_dir:
            raise VideoBoothError("--jobs needs --out-dir (the folder for the outputs and the manifest)")
        check_output_folder(args.out_dir, "--out-dir")
        if videocrafter:
            from .videocrafter import refuse_videobooth_flags

            refuse_videobooth_flags(args)
        else:
            _sd_model_args(args)  # every line's default; the lines' own best-of is checked by the jobs module
        return run_jobs(args, videocrafter=videocrafter)
    if not args.out:
        raise OutputError("--out is required: a .mp4, .gif or .webp file, or a folder for PNG frames")
    # before any model loads: nothing of the user's is replaced, and a bad target fails in seconds, not hours
    out = check_output_path(args.out, overwrite=args.overwrite, fps=args.fps)
    if args.save_latents:  # OUT.latents.safetensors, refused as the video is
        check_latents_target(out, overwrite=args.overwrite)
    check_best_of(args.best_of, args.rank_by, True)  # the number first; the image prompt once it is read
    loras = _sd_model_args(args)
    request = _request_from(args)
    check_best_of(args.best_of, args.rank_by, request.image is not None)  # before any model loads
    if args.best_of > 1:
        _check_metric_model(args)
    start = time.perf_counter()
    pipe = VideoBoothPipeline.from_models_dir(args.models, dtype=args.dtype, device=args.device,
                                              stream_weights=args.stream_weights)
    if args.attention != DEFAULT_ATTENTION:  # the default path never touches the model
        pipe.unet.set_attention_backend(args.attention)
        args.attention = pipe.unet.attention_backend  # the summary reports the kernel in use
    if args.base_checkpoint or loras:  # the plain path never touches the weights
        for line in pipe.use_sd_models(args.base_checkpoint, loras, args.lora_kv):
            print(line, file=sys.stderr)
    if args.best_of > 1:  # N seeds scored by a metric model; the best is written, every seed is reported
        from ..evaluation.cli import run_best_of

        best = run_best_of(args, pipe, request)[0]
        result, request.seed = best.result, best.seed  # the summary's seed alone reproduces the written video
    else:
        result = pipe.generate(request, callback=progress_callback("sampling"))
    latents = write_result(result, out, args.fps, overwrite=args.overwrite, save=args.save_latents)
    print("done: " + run_summary(result, request, time.perf_counter() - start, out, args, latents))
    return 0


def _check_metric_model(args: argparse.Namespace) -> None:
    """``--best-of``: the metric model that ranks the candidates is found (or given) before any model loads."""
    from ..evaluation.cli import find_metric_models
    from ..evaluation.metrics import rank_key

    find_metric_models(args, ("dino",) if rank_key(args.rank_by) == "dino" else ("clip",))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..files import check_output_folder, check_target
    from ..loading.checkpoint import convert_released_weights

    # before any weight is read: the folder is writable and no file of the user's is replaced without --overwrite
    out = check_output_folder(args.out)
    if getattr(args, "videocrafter", None):
        from .videocrafter import cmd_convert_videocrafter

        return cmd_convert_videocrafter(args, out)
    for given, name in ((args.unet, "videobooth_unet.safetensors"), (args.mapper, "videobooth_mapper.safetensors")):
        if given:
            check_target(out / name, overwrite=args.overwrite)
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
    from ..files import check_output_folder
    from .tiny import make_tiny

    check_output_folder(args.out)  # the set's files are replaced, nothing else there: a folder it fills
    if getattr(args, "family", "videobooth") != "videobooth":
        from .videocrafter import cmd_make_tiny_videocrafter

        return cmd_make_tiny_videocrafter(args)
    out = make_tiny(args.out, seed=args.seed)
    print(f"wrote a tiny RANDOM model set to {out} (for tests and demos; it generates noise)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.cli import cmd_evaluate as run

    return run(args)


def cmd_dataset(args: argparse.Namespace) -> int:
    from ..dataset.cli import cmd_dataset as run

    return run(args)


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.cli import cmd_train as run

    return run(args)


COMMANDS = {"generate": cmd_generate, "demo": cmd_demo, "convert": cmd_convert, "make-tiny": cmd_make_tiny,
            "dataset": cmd_dataset, "evaluate": cmd_evaluate,
            "train": cmd_train}


def run_allocator(args: argparse.Namespace) -> str:
    """The allocator this run uses (``allocator.apply_allocator``): ``--allocator`` when given; otherwise lean with
    ``--stream-weights`` (whose point is memory) and for the commands without the flag (training's memory check
    counts on it), fast for generation runs (measured: README)."""
    if args.command not in ("generate", "demo"):
        return "lean"
    return chosen_allocator(getattr(args, "allocator", None), bool(getattr(args, "stream_weights", False)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("videobooth_core.pipeline").setLevel(logging.INFO)  # the memory estimate before sampling
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: every file is local
    apply_allocator(run_allocator(args))  # this process is ours: its speed/memory trade, see allocator.ALLOCATORS
    try:
        return COMMANDS[args.command](args)
    except VideoBoothError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:  # Ctrl-C: 130; SIGTERM during training (Terminated): 143
        terminated = isinstance(interruption, Terminated)
        print(f"error: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as error:  # no traceback reaches a user: one line, the traceback in a log file
        memory = out_of_memory(error)
        if memory is not None:
            print(f"error: {_one_line(memory)}", file=sys.stderr)
            return 2
        log = _write_error_log(error, argv)
        if args.verbose:
            traceback.print_exc()
        where = f"the full traceback is in {log}" if log else "no log file could be written; -v prints the traceback"
        print(f"error: unexpected {type(error).__name__}: {_one_line(error)[:300]} ({where}; please include it "
              "in a bug report)", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _write_error_log(error: BaseException, argv: list[str] | None) -> Path | None:
    """Write the command line and the full traceback of ``error`` to a new file under the cache folder's
    ``logs/`` (or the temporary folder); returns its path, or None when neither can be written."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"command: {sys.argv[0]} {' '.join(sys.argv[1:] if argv is None else argv)}\n"
            f"python: {sys.version.split()[0]}\n\n"
            + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    import tempfile

    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"videobooth-error-{stamp}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None
