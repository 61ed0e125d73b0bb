"""Long videos by context windows: peak memory and time of one guided step for 16, 32 and 64 frames, on a UNet of
the released size (random weights), with the image prompt.

    python benchmarks/bench_frames.py                          # 16, 32, 64 frames at 256x256 (latent 32), fp32
    python benchmarks/bench_frames.py --latent 8 --frames 16 32 --small   # a quick check of the script itself

Each frame count runs in a fresh child process, so its peak (``ru_maxrss`` on the CPU, the allocator's peak on a
GPU) is its own. A child builds the models, records its resident memory, runs one step of the windowed denoiser
(:class:`videobooth_core.sampling.windows.WindowedDenoiser`, window 16, overlap 4: 16 frames are one plain step)
and records the peak again: ``step_mb`` is what the step adds to the loaded models, ``peak_mb`` the process's
whole peak. The pre-sampling estimate (:func:`videobooth_core.sampling.run.prepare_denoiser`) is printed next to
it. Ends with one line: RESULT {json} (the ratios of 32 and 64 frames to 16).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from videobooth_core.allocator import apply_allocator  # noqa: E402
from videobooth_core.sampling.run import prepare_denoiser  # noqa: E402
from videobooth_core.sampling.windows import ContextOptions, context_windows  # noqa: E402


def build_unet(dtype: torch.dtype, device: str, small: bool):
    """The released-size UNet and mapper with random weights (bench_step's builder); ``small``: the tiny test
    model instead (to check the script in seconds)."""
    if small:
        from videobooth_core.app.tiny import tiny_unet_and_mapper

        unet, mapper = tiny_unet_and_mapper(vision_width=32, text_width=32)
        unet.attach_projections(mapper.site_projections(), release_own=True)
        unet._mapper = mapper
        return unet.to(device=device, dtype=dtype).requires_grad_(False)
    from bench_step import build_models

    return build_models(dtype, device)


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> dict:
    """One step at ``args.frames[0]`` frames in this process."""
    apply_allocator("lean")
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    frames = args.frames[0]
    unet = build_unet(dtype, args.device, args.small)
    width = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    text = torch.randn((2, 77, width), generator=generator)
    shape = (1, 4, frames, args.latent, args.latent)
    context = ContextOptions(window=args.window, overlap=args.overlap)
    denoiser, estimate = prepare_denoiser(unet, text[:1], text[1:], shape, args.device, image_prompt=True,
                                          context=context)
    x = torch.randn(shape, generator=generator).to(args.device)
    exemplar = torch.randn(shape, generator=generator).to(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()
    start = time.perf_counter()
    with torch.inference_mode():
        denoiser.predict(x, 500, exemplar)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"frames": frames, "windows": len(context_windows(frames, args.window, args.overlap)),
            "seconds": round(seconds, 2), "peak_mb": round(peak, 1), "before_step_mb": round(before, 1),
            "step_mb": round(peak - before, 1), "estimated_activations_mb": round(estimate.activations_bytes / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--latent", type=int, default=32, help="latent size (32 = 256x256 pixels)")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="the tiny test UNet (checks the script, not the claim)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    results = []
    for frames in args.frames:  # a fresh process per frame count: its peak is its own
        command = [sys.executable, __file__, "--child", "--frames", str(frames), "--latent", str(args.latent),
                   "--window", str(args.window), "--overlap", str(args.overlap), "--dtype", args.dtype,
                   "--device", args.device, "--threads", str(args.threads)] + ["--small"] * args.small
        loadavg = os.getloadavg()
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        result = json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
        result["loadavg_before"] = [round(v, 2) for v in loadavg]
        print(json.dumps(result), flush=True)
        results.append(result)
    first = results[0]
    ratios = {str(r["frames"]): {"frames": r["frames"] / first["frames"], "time": round(r["seconds"] / first["seconds"], 2),
                                 "peak": round(r["peak_mb"] / first["peak_mb"], 3),
                                 "step": round(r["step_mb"] / max(first["step_mb"], 1e-9), 3)} for r in results[1:]}
    print("RESULT " + json.dumps({"latent": args.latent, "dtype": args.dtype, "device": args.device,
                                  "threads": args.threads, "window": args.window, "overlap": args.overlap,
                                  "small": args.small, "runs": results, "ratios_to_first": ratios}))


if __name__ == "__main__":
    main()
