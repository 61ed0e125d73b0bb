"""One guided VideoBooth denoising step with the image prompt, on a UNet of the released size (random weights).

    python benchmarks/bench_step.py --frames 16 --latent 32 --dtype fp32 --threads 2 --mode exact

Back to back (what a speed claim needs on a shared machine): a reference and a candidate measured in one run,
alternating over several rounds (ABBA order), each measurement in a fresh child process (peak memory is the
process's ``ru_maxrss``, so it can only be measured once per process):

    python benchmarks/bench_step.py --reference official-order --candidate exact --rounds 3
    python benchmarks/bench_step.py --reference official-order --candidate exact --candidate exact:bf16 --rounds 2
    python benchmarks/bench_step.py --reference exact --candidate exact:dedup --rounds 3

A SPEC is a mode followed by ``:``-separated options in any order: a dtype (fp32 | fp16 | bf16), an attention
backend (sdpa | math | dedup; default: math for official-order, else sdpa), ``stream`` (--stream-weights) and an
allocator (``allocator.ALLOCATORS``: ``fast`` keeps freed memory in the heap, ``glibc`` is glibc's default, ``lean`` has
the lowest peak; default as the command line: lean with stream, else fast), e.g. ``exact:bf16:stream`` or
``exact:glibc``. The run first measures this machine's GEMM peak (a 2048^3 fp32 and bf16 matmul at --threads, best
of 3) and reports each path's achieved TFLOP/s as a fraction of it; it prints the median time and peak-memory ratios
(candidate / reference, per round) with their range over the rounds and the load average before every
measurement.

Modes:
    exact           the default path: uncond + image-prompt passes batched, SDPA attention
    official-order  the official call order: image-prompt, conditional and unconditional passes as three
                    batch-1 calls, materialised attention ("math" backend), fp32
    single-frame    opt-in: the image-prompt stream on one frame
    late-steps      opt-in: a step outside the image-prompt range (image prompt used only early in sampling)
    no-watermark    opt-in: the watermark branch skipped
    native          the native ComfyUI road's model call (issue 25): KSampler batches the positive and the negative of
                    VideoBooth Native Conditioning (which carries the exemplar flagged off) into one call, frames as
                    batch; the model runs the negative beside the exemplar pass, then the conditional pass, and the
                    official guidance on the host layout (what KSampler runs per step, minus its bookkeeping)
    native-separate the native road with a negative that is not Native Conditioning's (e.g. CLIP Text Encode): the
                    conditional call (the image prompt noised, captured and injected) and the unconditional call
    lcm             a step of the consistency sampler with a distilled LoRA (issue 27): guidance-free, the image-prompt
                    capture and the conditional pass only (merged LoRA weights cost nothing per step)
Options:
    --stream-weights  the UNet's weights stay in a safetensors file and are read block by block at every UNet call
                      (videobooth_core.loading.streaming; exact). The random weights are written to --weights-file by a
                      child process first, so that building them does not count in this process's peak.

An external reference (another implementation, e.g. the official code in its own environment, which this
project does not ship: it has no license) joins the comparison under a name of its own:

    python benchmarks/bench_step.py --external official-code="/path/to/venv/bin/python /path/to/official_step.py" \
        --reference official-code --candidate official-order --candidate exact --candidate exact:bf16 --rounds 2

The command gets ``--frames --latent --threads --repeats --warmup`` appended, runs in its own process like every
other measurement, and must print one stdout line ``RESULT {json}`` with at least ``median_seconds`` and
``peak_rss_mb`` (``tflop_per_step`` and ``achieved_tflops`` when it counts its FLOPs).

Besides the timing, RESULT holds the step's FLOP count (matmuls and convolutions, counted by
torch.utils.flop_counter on a storage-free twin of the model) and the achieved TFLOP/s, and the pre-sampling
peak-memory estimate (videobooth_core.sampling.memory) next to the measured peak.
Ends with one line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from videobooth_core.loading.checkpoint import parse_dtype  # noqa: E402
from videobooth_core.models.attention import ATTENTION_BACKENDS  # noqa: E402
from videobooth_core.models.config import MapperConfig, UNetConfig  # noqa: E402
from videobooth_core.models.mapper import Mapper  # noqa: E402
from videobooth_core.allocator import ALLOCATORS, apply_allocator, chosen_allocator  # noqa: E402
from videobooth_core.sampling.memory import estimate_step_memory, meta_denoiser, resident_weight_bytes  # noqa: E402
from videobooth_core.sampling.denoiser import VideoDenoiser  # noqa: E402
from videobooth_core.sampling.schedule import RespacedDDPM  # noqa: E402
from videobooth_core.models.unet_3d import UNet3DModel  # noqa: E402
from videobooth_core.models.frames_as_batch import (  # noqa: E402
    FramesAsBatchUNet, frames_to_video, official_cfg, video_to_frames,
)

MODES = ("exact", "official-order", "single-frame", "late-steps", "no-watermark", "native", "native-separate", "lcm")
DTYPE_NAMES = ("fp32", "fp16", "bf16")


DEFAULT_WEIGHTS_FILE = Path(tempfile.gettempdir()) / "videobooth_bench_unet_fp32.safetensors"


def build_models(dtype: torch.dtype, device: str, streamed_from: Path | None = None,
                 tiny: bool = False) -> UNet3DModel:
    """A released-size UNet and mapper (random weights, built directly in the target dtype); with
    ``streamed_from``, the UNet streams its weights from that safetensors file instead; ``tiny``: make-tiny's
    configuration instead of the released one."""
    from videobooth_core.app.tiny import TINY_UNET

    config = TINY_UNET if tiny else UNetConfig()
    torch.manual_seed(0)
    if streamed_from is not None:
        from videobooth_core.loading.streaming import load_unet_streamed

        unet = load_unet_streamed(streamed_from, config, dtype=dtype, device=device)
    else:
        unet = _random_in_dtype(UNet3DModel, config, dtype, device)
    sites = tuple(sorted((s.site, s.proj_in.out_channels) for s in unet.attention_sites))
    mapper_config = (MapperConfig(input_dim=32, hidden_dim=64, output_dim=config.cross_attention_dim, site_channels=sites)
                     if tiny else MapperConfig(site_channels=sites))
    mapper = _random_in_dtype(Mapper, mapper_config, dtype, device)
    unet.attach_projections(mapper.site_projections(), release_own=True)
    unet._mapper = mapper  # counted with the resident weights (the UNet only references its projections)
    return unet.eval().requires_grad_(False)


def _random_in_dtype(cls: type, config: object, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """``cls(config)`` with its default random initialisation, allocated directly in ``dtype`` (building in fp32
    and casting would put an fp32 copy into the process's peak memory)."""
    with torch.device("meta"):
        module = cls(config).to(dtype)
    module = module.to_empty(device=device)
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return module


def write_weights(path: Path) -> None:
    """Write a released-size random UNet (fp32) to ``path`` (run in a child process, see --stream-weights)."""
    from videobooth_core.loading.weight_files import CONFIG_METADATA_KEY, save_safetensors

    torch.manual_seed(0)
    unet = UNet3DModel(UNetConfig())
    save_safetensors(unet.state_dict(), path, {CONFIG_METADATA_KEY: unet.config.to_json()})


def count_step_flops(denoiser: VideoDenoiser, shape: tuple[int, ...], image_prompt: bool) -> float:
    """FLOPs of one guided step (matmuls and convolutions), counted on a storage-free twin of the model."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    twin = meta_denoiser(denoiser)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        streams = (shape[0] * denoiser.image_prompt_streams, *shape[1:])  # one image-prompt stream per subject
        twin.predict(torch.empty(shape, device=meta), 500, torch.empty(streams, device=meta) if image_prompt else None)
    return float(counter.get_total_flops())


ATTENTION_KERNELS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
                     "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
                     "aten::_flash_attention_forward", "aten::_efficient_attention_forward")


def profile_step(step) -> dict:
    """One step under torch.profiler: each operator family's share of the operators' total self time.

    Attention is the fused SDPA kernels; with the ``math`` backend its score matmuls and softmax are counted
    under ``aten::bmm``/``aten::_softmax`` with the other matmuls (compare the ``softmax`` share)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0 or getattr(e, "self_device_time_total", 0) > 0]
    use_device = torch.cuda.is_available()

    def self_time(event) -> float:
        return float(event.self_device_time_total if use_device else event.self_cpu_time_total)

    total = sum(self_time(e) for e in events)
    families = {
        "attention": lambda name: name in ATTENTION_KERNELS,
        "softmax": lambda name: "softmax" in name,
        "convolution": lambda name: "convolution" in name or "conv2d" in name or "mkldnn_conv" in name,
        "linear/matmul": lambda name: name in ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm",
                                               "aten::matmul", "aten::linear"),
        "norm": lambda name: "norm" in name,
        "copy": lambda name: name in ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::index"),
    }
    shares = {family: round(sum(self_time(e) for e in events if match(e.key)) / total, 4)
              for family, match in families.items()}
    for event in sorted(events, key=self_time, reverse=True)[:12]:
        print(f"profile: {event.key:60s} {self_time(event) / 1e6:8.2f} s  {self_time(event) / total:6.1%}",
              file=sys.stderr)
    return {"profiled_seconds": round(total / 1e6, 3), "share": shares}


def parse_external(definitions: list[str] | None) -> dict[str, list[str]]:
    """``["name=command args"]`` → {"name": ["command", "args"]} (see --external)."""
    externals = {}
    for definition in definitions or []:
        name, separator, command = definition.partition("=")
        if not separator or not name or not command.strip():
            raise SystemExit(f"bench_step: --external takes NAME=COMMAND, got {definition!r}")
        if name.split(":")[0] in MODES:
            raise SystemExit(f"bench_step: --external name {name!r} is one of the built-in modes {MODES}; pick another")
        externals[name] = shlex.split(command)
    return externals


def parse_spec(spec: str, externals: dict[str, list[str]] | None = None) -> dict:
    """``"exact:bf16:stream"`` → {"mode": "exact", "dtype": "bf16", "attention": None, "stream": True}; a name
    given with --external → {"mode": "external", "command": [...], "dtype": "fp32"}."""
    if externals and spec in externals:
        return {"spec": spec, "mode": "external", "command": externals[spec], "dtype": "fp32", "attention": None,
                "stream": False, "allocator": None}
    mode, *options = spec.split(":")
    if mode not in MODES:
        raise SystemExit(f"bench_step: unknown mode {mode!r} in {spec!r}; choose one of {MODES} or a name defined "
                         f"with --external NAME=COMMAND ({', '.join(externals or {}) or 'none defined'})")
    parsed = {"spec": spec, "mode": mode, "dtype": "fp32", "attention": None, "stream": False, "allocator": None}
    for option in options:
        if option in DTYPE_NAMES:
            parsed["dtype"] = option
        elif option in ATTENTION_BACKENDS:
            parsed["attention"] = option
        elif option == "stream":
            parsed["stream"] = True
        elif option in ALLOCATORS:
            parsed["allocator"] = option
        else:
            raise SystemExit(f"bench_step: unknown option {option!r} in {spec!r}; use a dtype {DTYPE_NAMES}, "
                             f"an attention backend {ATTENTION_BACKENDS}, 'stream' or an allocator {ALLOCATORS}")
    return parsed


def gemm_peak_tflops(dtype: torch.dtype, device: str, threads: int, size: int = 2048) -> float:
    """Best of 3 of one square matmul: this machine's achievable GEMM rate now (TFLOP/s)."""
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        size = 8192
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for _ in range(4):  # the first is a warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times[1:]) / 1e12


def measure_in_child(spec: dict, args: argparse.Namespace) -> dict:
    """One measurement in a fresh process (its own peak RSS); returns the child's RESULT."""
    shared = ["--frames", str(args.frames), "--latent", str(args.latent), "--threads", str(args.threads),
              "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if spec["mode"] == "external":
        command = [*spec["command"], *shared]
    else:
        command = [sys.executable, __file__, "--mode", spec["mode"], "--dtype", spec["dtype"], *shared,
                   "--device", args.device, "--weights-file", str(args.weights_file)]
    if spec["attention"]:
        command += ["--attention", spec["attention"]]
    if spec["stream"]:
        command.append("--stream-weights")
    if args.tiny and spec["mode"] != "external":
        command.append("--tiny")
    allocator = spec["allocator"] or args.allocator
    if allocator and spec["mode"] != "external":  # an external command allocates as it does
        command += ["--allocator", allocator]
    loadavg = os.getloadavg()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_step: {' '.join(command)} failed with exit status {done.returncode} (its error is "
                         "above); fix it and rerun")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"bench_step: no RESULT from {' '.join(command)}")
    result = json.loads(lines[-1][len("RESULT "):])
    missing = [key for key in ("median_seconds", "peak_rss_mb") if not isinstance(result.get(key), (int, float))]
    if missing:
        raise SystemExit(f"bench_step: the RESULT of {' '.join(command)} lacks {missing}")
    result.setdefault("tflop_per_step", None)
    result.setdefault("achieved_tflops", None)
    result["loadavg_before"] = [round(x, 2) for x in loadavg]
    return result


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "all": [round(v, 3) for v in values]}


def compare(args: argparse.Namespace) -> None:
    """Reference and candidates back to back: each round measures all of them, in alternating order (ABBA)."""
    externals = parse_external(args.external)
    reference = parse_spec(args.reference, externals)
    candidates = [parse_spec(spec, externals) for spec in args.candidate]
    specs = [reference, *candidates]
    loadavg_start = os.getloadavg()
    peaks = {}
    for name in ("fp32", "bf16", *(spec["dtype"] for spec in specs)):
        if name not in peaks:
            peaks[name] = gemm_peak_tflops(parse_dtype(name), args.device, args.threads)
    print(f"GEMM peak at {args.threads} threads: " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()),
          file=sys.stderr, flush=True)
    if any(spec["stream"] for spec in specs) and not args.weights_file.is_file():
        subprocess.run([sys.executable, __file__, "--write-weights", str(args.weights_file)], check=True)
    memory_key = "peak_gpu_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    rounds: list[list[dict]] = []
    for index in range(args.rounds):
        order = list(range(len(specs))) if index % 2 == 0 else list(reversed(range(len(specs))))
        measured: list[dict] = [{} for _ in specs]
        for position in order:
            spec = specs[position]
            result = measure_in_child(spec, args)
            achieved = result["achieved_tflops"]
            result["fraction_of_gemm_peak"] = round(achieved / peaks[spec["dtype"]], 3) if achieved else None
            measured[position] = result
            print(f"round {index + 1} {spec['spec']}: {result['median_seconds']} s/step, {result[memory_key]} MB, "
                  f"load {result['loadavg_before']}", file=sys.stderr, flush=True)
        rounds.append(measured)

    def column(position: int, key: str) -> list[float]:
        return [measured[position][key] for measured in rounds if measured[position][key] is not None]

    paths = {}
    for position, spec in enumerate(specs):
        paths[spec["spec"]] = {
            "seconds": _spread(column(position, "median_seconds")),
            "memory_mb": _spread(column(position, memory_key)),
            "fraction_of_gemm_peak": _spread(column(position, "fraction_of_gemm_peak")),
            "achieved_tflops": _spread(column(position, "achieved_tflops")),
            "tflop_per_step": rounds[0][position]["tflop_per_step"],
        }
        if position:
            times = [m[position]["median_seconds"] / m[0]["median_seconds"] for m in rounds]
            memory = [m[position][memory_key] / m[0][memory_key] for m in rounds]
            paths[spec["spec"]].update(time_ratio=_spread(times), memory_ratio=_spread(memory))
            t, mem = _spread(times), _spread(memory)
            print(f"{spec['spec']} / {args.reference}: time x{t['median']} (range {t['min']}-{t['max']}), "
                  f"peak memory x{mem['median']} (range {mem['min']}-{mem['max']}) over {args.rounds} rounds",
                  file=sys.stderr)
    summary = {
        "reference": args.reference, "candidates": args.candidate, "rounds": args.rounds, "paths": paths,
        "gemm_peak_tflops": {k: round(v, 4) for k, v in peaks.items()},
        "loadavg_start": [round(x, 2) for x in loadavg_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "frames": args.frames, "latent": args.latent, "threads": args.threads, "device": args.device,
        "repeats": args.repeats, "warmup": args.warmup, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "measurements": rounds,
    }
    print(f"load {summary['loadavg_start']} -> {summary['loadavg_end']}", file=sys.stderr)
    print("RESULT " + json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--latent", type=int, default=32, help="latent height = width (32 = 256x256 video)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default="exact", choices=MODES)
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS,
                        help="attention backend (default: math for official-order, else sdpa)")
    parser.add_argument("--reference", metavar="SPEC", help="back to back: the reference path, e.g. official-order")
    parser.add_argument("--candidate", metavar="SPEC", action="append",
                        help="back to back: a candidate path, e.g. exact:bf16 (repeat for several)")
    parser.add_argument("--rounds", type=int, default=3, help="back to back: alternating rounds")
    parser.add_argument("--external", metavar="NAME=COMMAND", action="append",
                        help="back to back: an external implementation measured by COMMAND (see above), usable as "
                             "--reference/--candidate NAME")
    parser.add_argument("--profile", action="store_true",
                        help="profile one extra step (torch.profiler): attention's share of the step in RESULT, "
                             "the top operators on stderr (its peak memory then includes the profiler's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--stream-weights", action="store_true", help="stream the UNet's weights from a file")
    parser.add_argument("--tiny", action="store_true", help="make-tiny's UNet configuration instead of the released one")
    parser.add_argument("--subjects", type=int, default=1,
                        help="image-prompt streams (several subjects, issue 17; 1 = the single image prompt)")
    parser.add_argument("--weights-file", type=Path, default=DEFAULT_WEIGHTS_FILE,
                        help="safetensors file for --stream-weights (written once if missing)")
    parser.add_argument("--write-weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=ALLOCATORS,
                        help="allocator.ALLOCATORS: fast (heap kept for reuse), glibc (glibc's default), lean (lowest "
                             "peak); default: as the command line (lean with --stream-weights, else fast); a SPEC may "
                             "name its own")
    args = parser.parse_args()
    allocator = chosen_allocator(args.allocator, args.stream_weights)
    if not (args.reference or args.candidate):  # a comparison's children choose their own
        apply_allocator(allocator)
    if args.write_weights:
        write_weights(args.write_weights)
        return
    if args.reference or args.candidate:
        if not (args.reference and args.candidate):
            parser.error("--reference and --candidate go together")
        compare(args)
        return
    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    if args.mode == "official-order" and dtype != torch.float32:
        parser.error("official-order runs in fp32, as the official code")

    if args.stream_weights and not args.weights_file.is_file():
        print(f"writing random released-size weights to {args.weights_file} (once)", file=sys.stderr)
        subprocess.run([sys.executable, __file__, "--write-weights", str(args.weights_file)], check=True)
    unet = build_models(dtype, args.device, args.weights_file if args.stream_weights else None, tiny=args.tiny)
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights_mb = resident_weight_bytes([unet, unet._mapper]) / 2**20  # streamed weights are not resident
    attention = args.attention or ("math" if args.mode == "official-order" else "sdpa")
    unet.set_attention_backend(attention)
    generator = torch.Generator().manual_seed(0)
    shape = (1, 4, args.frames, args.latent, args.latent)
    x_t = torch.randn(shape, generator=generator).to(args.device)
    exemplar_clean = torch.randn((args.subjects, 4, 1, args.latent, args.latent), generator=generator).to(args.device)
    text = torch.randn((2, 77, unet.config.cross_attention_dim), generator=generator).to(args.device)
    schedule = RespacedDDPM(250)
    lcm = args.mode == "lcm"  # guidance-free: no unconditional pass
    denoiser = VideoDenoiser(
        unet, text[:1], text[1:], 1.0 if lcm else 4.0, "all" if lcm else "official",
        batch_passes=args.mode != "official-order",
        single_frame_image_prompt=args.mode == "single-frame",
        watermark_branch=args.mode != "no-watermark",
        subject_strengths=(1.0,) * args.subjects if args.subjects > 1 else None,
    )
    index = 125
    estimate = estimate_step_memory(denoiser, shape, args.mode != "late-steps", args.device, [unet._mapper])
    flops = count_step_flops(denoiser, shape, args.mode != "late-steps")

    native = FramesAsBatchUNet(unet) if args.mode.startswith("native") else None

    def step() -> None:
        if native is not None:  # the host's call(s) and its CFG hook, frames as batch
            noise = torch.randn((1, 4, args.frames, args.latent, args.latent), generator=generator).to(args.device)
            x = video_to_frames(x_t)
            t = torch.full((x.shape[0],), float(schedule.timestep_map[index]))
            abar = float(schedule.alphas_cumprod[index])
            if args.mode == "native":  # one call: [positive, negative], the negative flagged to skip the exemplar
                both = native(torch.cat([x, x]), t.repeat(2), text.repeat_interleave(args.frames, dim=0), args.frames,
                              image_prompt=exemplar_clean[:1].expand(2, -1, -1, -1, -1),
                              image_prompt_noise=noise.expand(2, -1, -1, -1, -1), image_prompt_alpha_cumprod=abar,
                              null_context=text[1:], image_prompt_skip=torch.tensor([False, True]))
                cond, uncond = both[:x.shape[0]], both[x.shape[0]:]
            else:
                cond = native(x, t, text[:1], args.frames, image_prompt=exemplar_clean[:1], image_prompt_noise=noise,
                              image_prompt_alpha_cumprod=abar, null_context=text[1:])
                uncond = native(x, t, text[1:], args.frames)
            eps = frames_to_video(official_cfg(cond.float(), uncond.float(), 4.0), args.frames)
            schedule.step(eps, x_t, index, torch.randn(shape, generator=generator).to(args.device))
            return
        exemplar = None
        if args.mode != "late-steps":
            noise = torch.randn((args.subjects, 4, args.frames, args.latent, args.latent),
                                generator=generator).to(args.device)
            exemplar = schedule.add_noise(exemplar_clean.expand(-1, -1, args.frames, -1, -1), noise, index)
        eps, _, _ = denoiser.predict(x_t, schedule.timestep_map[index], exemplar)
        schedule.step(eps, x_t, index, torch.randn(shape, generator=generator).to(args.device))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(args.warmup):
            step()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        profile = profile_step(step) if args.profile else None
    result = {
        "mode": args.mode, "dtype": args.dtype, "attention": attention, "device": args.device, "threads": args.threads,
        "subjects": args.subjects, "frames": args.frames, "latent": [args.latent, args.latent], "video": [8 * args.latent, 8 * args.latent],
        "median_seconds": round(statistics.median(times), 3), "all_seconds": [round(t, 3) for t in times],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_after_building_models_mb": round(rss_after_build, 1), "weights_mb": round(weights_mb, 1),
        "tflop_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / 1e12 / statistics.median(times), 4),
        "stream_weights": args.stream_weights,
        "allocator": allocator, **estimate.as_dict(),
        "torch": torch.__version__, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    if profile is not None:
        result["profile"] = profile
    if args.stream_weights:
        result["weights_read_per_step_mb"] = round(unet.weight_streamer.bytes_read / (args.warmup + args.repeats) / 2**20, 1)
    if args.device.startswith("cuda"):
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
