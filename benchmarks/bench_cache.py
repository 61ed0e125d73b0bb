"""What ``train --cache`` saves: the clip part of a training sample with and without the encoder cache.

    python benchmarks/bench_cache.py                   # SD-1.x-sized random VAE, 256x256, 16-frame clips
    python benchmarks/bench_cache.py --tiny --samples 2  # a quick check of the script itself

A synthetic dataset (``dataset synthetic``: clips of 24, 40 and 90 frames) at ``--size``; the trainer's own reader
(``OurDataset``) and cache (``training.cache.EncoderCache``). Per sample, back to back in this process:

* **live**: the reader decodes frame 0 and the 16 sampled frames, then ``vae_encode`` encodes the 16 frames (what
  every training step does without ``--cache``);
* **cached**: the reader decodes frame 0 only (``read_clip=False``), the 16 frames' posterior parameters are read
  from the cache and sampled (``BatchMaker._sample_posterior``'s arithmetic);

and once, the cache build (every frame of every clip, flipped and not). The image prompt's CLIP and VAE passes,
live in both (random augmentations per step), are left out. Ends with ``RESULT {json}``: the per-sample seconds,
their ratio, the build time, and after how many visits of each clip the build has paid for itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from videobooth_core.conditioning.vae import vae_encode, vae_scaling_factor  # noqa: E402
from videobooth_core.dataset.reader import OurDataset  # noqa: E402
from videobooth_core.dataset.synthetic import make_synthetic  # noqa: E402
from videobooth_core.training.cache import EncoderCache  # noqa: E402

SD_VAE = {  # AutoencoderKL of SD 1.x (sd-vae-ft-ema): 83.7 M parameters
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 256, "scaling_factor": 0.18215,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="frame size (256: the official training size)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip sample")
    parser.add_argument("--videos", type=int, default=3, help="synthetic videos (24, 40, 90 frames, repeating)")
    parser.add_argument("--samples", type=int, default=6, help="samples timed per path (alternating)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny test VAE instead of the SD-sized one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from diffusers import AutoencoderKL

    if args.tiny:
        from videobooth_core.app.tiny import tiny_vae_config

        vae = AutoencoderKL(**tiny_vae_config()).eval()
    else:
        vae = AutoencoderKL(**SD_VAE).eval()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"load average {' '.join(load)}; {args.threads} threads; VAE "
          f"{sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M parameters", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        data = Path(tmp) / "data"
        make_synthetic(data, args.videos, seed=0, height=args.size, width=args.size)
        live = OurDataset(data, stage=1, seed=0, clip_frames=args.frames, size=args.size, read_clip=True)
        lean = OurDataset(data, stage=1, seed=0, clip_frames=args.frames, size=args.size, read_clip=False)
        cache = EncoderCache(Path(tmp) / "cache", args.size, args.frames, "random-vae")
        total_frames = sum(r.frames or 0 for r in live.records)

        start = time.perf_counter()
        with torch.no_grad():
            cache.build(live.records, vae, flip=True)
        build_s = time.perf_counter() - start
        print(f"cache build: {len(live.records)} clips, {total_frames} frames x 2 flips in {build_s:.1f} s", flush=True)

        def live_sample(i: int) -> float:
            t0 = time.perf_counter()
            sample = live[i % len(live)]
            with torch.no_grad():
                vae_encode(vae, sample["video"].permute(1, 0, 2, 3), generator=torch.Generator().manual_seed(i))
            return time.perf_counter() - t0

        def cached_sample(i: int) -> float:
            t0 = time.perf_counter()
            sample = lean[i % len(lean)]
            mean, std = cache.posterior(sample["id"], sample["frame_indices"], bool(sample["flip"]))
            noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(i))
            _ = (mean + std * noise) * vae_scaling_factor(vae, None)
            return time.perf_counter() - t0

        live_sample(0), cached_sample(0)  # warm-up: first decode, first file open
        live_s, cached_s = [], []
        for i in range(args.samples):  # alternating, so a change of machine load hits both
            live_s.append(live_sample(i))
            cached_s.append(cached_sample(i))
    live_median, cached_median = statistics.median(live_s), statistics.median(cached_s)
    mean_frames = total_frames / len(live.records)
    # the build encodes 2 x frames per clip; a visit without cache encodes 16: it pays after this many visits
    break_even = build_s / len(live.records) / max(live_median - cached_median, 1e-9)
    result = {
        "size": args.size, "frames": args.frames, "vae": "tiny" if args.tiny else "sd-1.x (random)",
        "load": load, "live_s_per_sample": round(live_median, 4), "cached_s_per_sample": round(cached_median, 4),
        "ratio": round(cached_median / live_median, 4), "live_spread": [round(min(live_s), 4), round(max(live_s), 4)],
        "cached_spread": [round(min(cached_s), 4), round(max(cached_s), 4)], "build_s": round(build_s, 2),
        "mean_clip_frames": round(mean_frames, 1), "visits_per_clip_to_break_even": round(break_even, 1),
    }
    print(f"per sample: live {live_median:.3f} s, cached {cached_median:.4f} s ({cached_median / live_median:.3f}x); "
          f"the build pays for itself after {break_even:.1f} visits of each clip", flush=True)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
