"""One guided VideoBooth denoising step with the image prompt, on a UNet of the released size (random weights).

    python benchmarks/bench_step.py --frames 16 --latent 32 --dtype fp32 --threads 2 --mode exact

Modes:
    exact           the default path: uncond + image-prompt passes batched, SDPA attention
    official-order  the official call order: image-prompt, conditional and unconditional passes as three
                    batch-1 calls, materialised attention ("math" backend), fp32
    single-frame    opt-in: the image-prompt stream on one frame
    late-steps      opt-in: a step outside the image-prompt range (image prompt used only early in sampling)
    no-watermark    opt-in: the watermark branch skipped
Options:
    --stream-weights  the UNet's weights stay in a safetensors file and are read block by block at every UNet call
                      (videobooth_core.loading.streaming; exact). The random weights are written to --weights-file by a
                      child process first, so that building them does not count in this process's peak.

Besides the timing, RESULT holds the step's FLOP count (matmuls and convolutions, counted by
torch.utils.flop_counter on a storage-free twin of the model) and the achieved TFLOP/s, and the pre-sampling
peak-memory estimate (videobooth_core.sampling.memory) next to the measured peak.
Ends with one line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from videobooth_core.loading.checkpoint import parse_dtype  # noqa: E402
from videobooth_core.models.config import MapperConfig, UNetConfig  # noqa: E402
from videobooth_core.models.mapper import Mapper  # noqa: E402
from videobooth_core.sampling.memory import estimate_step_memory, meta_denoiser, resident_weight_bytes, tune_allocator  # noqa: E402
from videobooth_core.sampling.denoiser import VideoDenoiser  # noqa: E402
from videobooth_core.sampling.schedule import RespacedDDPM  # noqa: E402
from videobooth_core.models.unet_3d import UNet3DModel  # noqa: E402

MODES = ("exact", "official-order", "single-frame", "late-steps", "no-watermark")


DEFAULT_WEIGHTS_FILE = Path(tempfile.gettempdir()) / "videobooth_bench_unet_fp32.safetensors"


def build_models(dtype: torch.dtype, device: str, streamed_from: Path | None = None) -> UNet3DModel:
    """A released-size UNet and mapper (random weights, built directly in the target dtype); with
    ``streamed_from``, the UNet streams its weights from that safetensors file instead."""
    config = UNetConfig()
    torch.manual_seed(0)
    if streamed_from is not None:
        from videobooth_core.loading.streaming import load_unet_streamed

        unet = load_unet_streamed(streamed_from, config, dtype=dtype, device=device)
    else:
        unet = _random_in_dtype(UNet3DModel, config, dtype, device)
    sites = tuple(sorted((s.site, s.proj_in.out_channels) for s in unet.attention_sites))
    mapper = _random_in_dtype(Mapper, MapperConfig(site_channels=sites), dtype, device)
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
        twin.predict(torch.empty(shape, device=meta), 500, torch.empty(shape, device=meta) if image_prompt else None)
    return float(counter.get_total_flops())


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
    parser.add_argument("--stream-weights", action="store_true", help="stream the UNet's weights from a file")
    parser.add_argument("--weights-file", type=Path, default=DEFAULT_WEIGHTS_FILE,
                        help="safetensors file for --stream-weights (written once if missing)")
    parser.add_argument("--write-weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is (the command line tunes it, see memory.tune_allocator)")
    args = parser.parse_args()
    if not args.default_allocator:
        tune_allocator()
    if args.write_weights:
        write_weights(args.write_weights)
        return
    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    if args.mode == "official-order" and dtype != torch.float32:
        parser.error("official-order runs in fp32, as the official code")

    if args.stream_weights and not args.weights_file.is_file():
        print(f"writing random released-size weights to {args.weights_file} (once)", file=sys.stderr)
        subprocess.run([sys.executable, __file__, "--write-weights", str(args.weights_file)], check=True)
    unet = build_models(dtype, args.device, args.weights_file if args.stream_weights else None)
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights_mb = resident_weight_bytes([unet, unet._mapper]) / 2**20  # streamed weights are not resident
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
    estimate = estimate_step_memory(denoiser, shape, args.mode != "late-steps", args.device, [unet._mapper])
    flops = count_step_flops(denoiser, shape, args.mode != "late-steps")

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
        "tflop_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / 1e12 / statistics.median(times), 4),
        "stream_weights": args.stream_weights, "tuned_allocator": not args.default_allocator, **estimate.as_dict(),
        "torch": torch.__version__,
    }
    if args.stream_weights:
        result["weights_read_per_step_mb"] = round(unet.weight_streamer.bytes_read / (args.warmup + args.repeats) / 2**20, 1)
    if args.device.startswith("cuda"):
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
