"""One stage-2 training step at the real size: seconds and peak memory, per (batch, checkpointing, precision).

    python benchmarks/bench_train.py                    # 16 frames at 256x256, SD-1.4-sized random UNet
    python benchmarks/bench_train.py --device cuda      # on a GPU
    python benchmarks/bench_train.py --tiny --steps 2   # a smoke run with the tiny sizes

The step is the trainer's own (``training.model.TrainingModule``: mapper -> CLIP text splice -> UNet image-prompt
pass -> UNet prediction -> loss, backward, AdamW step) on random inputs of the real shapes; the frozen VAE and
CLIP vision encoder, which run without gradients, are left out. Each configuration runs in a fresh process (a
clean peak-memory figure); every line is ``RESULT {json}``, the last one the whole table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    sys.path.insert(0, str(REPO))
    from videobooth_core.app.tiny import TINY_UNET
    from videobooth_core.models.config import MapperConfig, UNetConfig
    from videobooth_core.models.mapper import Mapper
    from videobooth_core.models.unet_3d import UNet3DModel
    from videobooth_core.training.loop import set_trainable
    from videobooth_core.training.model import TrainBatch, TrainingModule, init_projections

    device = torch.device(args.device)
    torch.manual_seed(0)
    unet_config = TINY_UNET if args.tiny else UNetConfig()
    text_width, vision_width = unet_config.cross_attention_dim, (32 if args.tiny else 1024)
    text_config = transformers.CLIPTextConfig(hidden_size=text_width, intermediate_size=4 * text_width,
                                              num_attention_heads=4 if args.tiny else 12,
                                              num_hidden_layers=2 if args.tiny else 12)
    text = transformers.CLIPTextModel(text_config).to(device).eval().requires_grad_(False)
    unet = UNet3DModel(unet_config).to(device).eval().requires_grad_(False)
    sites = tuple(sorted((s.site, s.proj_in.out_channels) for s in unet.attention_sites))
    mapper = Mapper(MapperConfig(input_dim=vision_width, hidden_dim=vision_width, output_dim=text_width,
                                 site_channels=sites)).to(device)
    init_projections(unet, mapper, 2)
    unet.attach_projections(mapper.site_projections())
    unet.gradient_checkpointing = args.checkpointing
    params = set_trainable(mapper, 2)
    module = TrainingModule(mapper, unet, text, 0.01)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    b, f, h = args.batch, args.frames, args.size // 8
    latent = (b, 4, f, h, h)
    ids = torch.randint(1, 40000, (b, 77))
    ids[:, 2:5] = torch.tensor([900, 901, 902])
    batch = TrainBatch(clip_features=[torch.randn(b, 257, vision_width, device=device) for _ in range(5)],
                       input_ids=ids.to(device), placeholder_ids=(900, 901, 902),
                       keep_text=torch.ones(b, dtype=torch.bool, device=device),
                       null_states=torch.randn(b, 77, text_width, device=device),
                       noisy=torch.randn(latent, device=device), timesteps=torch.full((b,), 500, device=device),
                       noise=torch.randn(latent, device=device), exemplar=torch.randn(latent, device=device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = module(batch)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"batch": b, "checkpointing": args.checkpointing, "precision": args.precision, "device": args.device,
            "frames": f, "size": args.size, "seconds_per_step": min(times[1:] or times),
            "peak_gib": round(peak, 2), "peak_kind": "cuda allocated" if device.type == "cuda" else "process RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration (the fastest after the first)")
    parser.add_argument("--tiny", action="store_true", help="tiny model sizes (a smoke run)")
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return
    rows = []
    for batch, checkpointing, precision in itertools.product(
            [int(b) for b in args.batches.split(",")], (False, True), ("fp32", "bf16")):
        command = [sys.executable, __file__, "--one", "--device", args.device, "--frames", str(args.frames),
                   "--size", str(args.size), "--steps", str(args.steps), "--batch", str(batch),
                   "--precision", precision] + ["--tiny"] * args.tiny + ["--checkpointing"] * checkpointing
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(lines[-1][7:]) if lines else {
            "batch": batch, "checkpointing": checkpointing, "precision": precision,
            "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        print("RESULT " + json.dumps(row), flush=True)
        rows.append(row)
    print("RESULT " + json.dumps({"bench": "train_step_stage2", "rows": rows}))


if __name__ == "__main__":
    main()
