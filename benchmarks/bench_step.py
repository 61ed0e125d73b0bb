"""One guided VideoBooth denoising step with the image prompt, on a UNet of the released size (random weights).

    python benchmarks/bench_step.py --frames 16 --latent 32 --dtype fp32 --threads 2 --mode exact

Modes:
    exact           the default path: uncond + image-prompt passes batched, SDPA attention
    official-order  the official call order: image-prompt, conditional and unconditional passes as three
                    batch-1 calls, materialised attention ("math" backend), fp32
    single-frame    opt-in: the image-prompt stream on one frame
    late-steps      opt-in: a step outside the image-prompt range (image prompt used only early in sampling)
    no-watermark    opt-in: the watermark branch skipped
Ends with one line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from videobooth_core.checkpoint import parse_dtype  # noqa: E402
from videobooth_core.config import MapperConfig, UNetConfig  # noqa: E402
from videobooth_core.mapper import Mapper  # noqa: E402
from videobooth_core.sampling import VideoDenoiser  # noqa: E402
from videobooth_core.scheduling import RespacedDDPM  # noqa: E402
from videobooth_core.unet_3d import UNet3DModel  # noqa: E402

MODES = ("exact", "official-order", "single-frame", "late-steps", "no-watermark")


def build_models(dtype: torch.dtype, device: str) -> UNet3DModel:
    """A released-size UNet and mapper (random weights, built directly in the target dtype)."""
    config = UNetConfig()
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet3DModel(config).to(dtype)
    sites = tuple(sorted((s.site, s.proj_in.out_channels) for s in unet.attention_sites))
    with torch.device(device):
        mapper = Mapper(MapperConfig(site_channels=sites)).to(dtype)
    unet.attach_projections(mapper.site_projections(), release_own=True)
    unet._mapper = mapper  # keep the projections alive
    return unet.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--latent", type=int, default=32, help="latent height = width (32 = 256x256 video)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default="exact", choices=MODES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    if args.mode == "official-order" and dtype != torch.float32:
        parser.error("official-order runs in fp32, as the official code")

    unet = build_models(dtype, args.device)
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights_mb = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
    weights_mb += sum(p.numel() * p.element_size() for p in unet._mapper.parameters()) / 2**20
    unet.set_attention_backend("math" if args.mode == "official-order" else "sdpa")
    generator = torch.Generator().manual_seed(0)
    shape = (1, 4, args.frames, args.latent, args.latent)
    x_t = torch.randn(shape, generator=generator).to(args.device)
    exemplar_clean = torch.randn((1, 4, 1, args.latent, args.latent), generator=generator).to(args.device)
    text = torch.randn((2, 77, 768), generator=generator).to(args.device)
    schedule = RespacedDDPM(250)
    denoiser = VideoDenoiser(
        unet, text[:1], text[1:], 4.0, "official",
        batch_passes=args.mode != "official-order",
        single_frame_image_prompt=args.mode == "single-frame",
        watermark_branch=args.mode != "no-watermark",
    )
    index = 125

    def step() -> None:
        exemplar = None
        if args.mode != "late-steps":
            noise = torch.randn((1, 4, args.frames, args.latent, args.latent), generator=generator).to(args.device)
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
    result = {
        "mode": args.mode, "dtype": args.dtype, "device": args.device, "threads": args.threads,
        "frames": args.frames, "latent": [args.latent, args.latent], "video": [8 * args.latent, 8 * args.latent],
        "median_seconds": round(statistics.median(times), 3), "all_seconds": [round(t, 3) for t in times],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_after_building_models_mb": round(rss_after_build, 1), "weights_mb": round(weights_mb, 1),
        "torch": torch.__version__,
    }
    if args.device.startswith("cuda"):
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
