"""One stage-2 training step at the real size: seconds and peak memory, per (batch, checkpointing, precision).

    python benchmarks/bench_train.py                    # 16 frames at 256x256, SD-1.4-sized random UNet
    python benchmarks/bench_train.py --device cuda      # on a GPU
    python benchmarks/bench_train.py --tiny --steps 2   # a smoke run with the tiny sizes
    python benchmarks/bench_train.py --steps 1 --batches 1 --budget-s 900   # what fits in 15 minutes

The step is the trainer's own (``training.model.TrainingModule``: mapper -> CLIP text splice -> UNet image-prompt
pass -> UNet prediction -> loss, backward, AdamW step) on random inputs of the real shapes; the frozen VAE and
CLIP vision encoder, which run without gradients, are left out (the trainer holds them too: +0.33 GB VAE, +1.2 GB
CLIP ViT-L vision in fp32, and with ``--cache`` the VAE leaves the step). Each configuration runs in a fresh
process (a clean peak-memory figure) and first reports the trainer's own memory estimate
(``training.memory.estimate_training_memory``, the check run before training); a configuration whose estimate
exceeds the free memory is skipped rather than run into the out-of-memory killer. Configurations run in the
order official fp32 first, then checkpointing, then bf16, batch 1 before 2, until ``--budget-s`` is spent. Every
line is ``RESULT {json}``, the last one the whole table.

``--stage distill`` measures a consistency-distillation step instead (issue 27, ``training.distill``: the student's
guidance-free pass with the LoRA (rank 64, every default target) and its backward, the teacher's guided pass and
DDIM step, the EMA target's pass, pseudo-Huber loss, AdamW on the LoRA, the EMA update), with the solver pair fixed
at (519, 499) so every pass runs. The skip decision uses the stage-2 step's estimate, a lower bound here (the
student's pass is that step's; the teacher's and target's passes run without gradient).

    python benchmarks/bench_train.py --stage distill --batches 1 --steps 1 --budget-s 1500
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
    from videobooth_core.sampling.memory import available_memory_bytes
    from videobooth_core.training.config import TrainConfig
    from videobooth_core.training.loop import set_trainable
    from videobooth_core.training.memory import added_bytes, estimate_training_memory
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
    config = TrainConfig(stage=2, data="", models="", out="", batch_size=b, frames=f, size=args.size,
                         gradient_checkpointing=args.checkpointing,
                         mixed_precision="bf16" if args.precision == "bf16" else "no")
    started = time.perf_counter()
    estimate = estimate_training_memory(config, {"unet": unet, "vae": torch.nn.Identity(), "text": text,
                                                 "vision": torch.nn.Identity(), "mapper": mapper}, params, device)
    row = {"batch": b, "checkpointing": args.checkpointing, "precision": args.precision, "device": args.device,
           "frames": f, "size": args.size, "estimated_peak_gib": round(estimate.total_bytes / 2**30, 2),
           "estimated_activations_gib": round(estimate.activations_bytes / 2**30, 2),
           "estimate_seconds": round(time.perf_counter() - started, 1)}
    free, needed = available_memory_bytes(device), added_bytes(estimate, params)
    if free is not None and needed > free:  # the trainer's own check: the step would add more than is free
        row.update(skipped=f"the step adds an estimated {needed / 2**30:.2f} GiB, free {free / 2**30:.2f} GiB")
        return row
    ema = None
    if args.stage == "distill":  # the LoRA trains; the mapper is the frozen teacher's
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        from videobooth_core.training.config import DEFAULT_LORA_TARGETS
        from videobooth_core.training.distill import DistillLoss
        from videobooth_core.training.distill_loop import DistillModule
        from videobooth_core.training.lora_train import LoraHooks, LoraLayers

        mapper.requires_grad_(False)
        layers = LoraLayers(unet, DEFAULT_LORA_TARGETS, 64, 64.0).to(device)
        ema = AveragedModel(layers, multi_avg_fn=get_ema_multi_avg_fn(0.95), use_buffers=False)
        loss_fn = DistillLoss(unet, LoraHooks(unet, layers), layers, ema.module, 4.0, 5, 0.001)
        loss_fn.pairs = [(519, 499)]  # a middle pair: teacher, student and target all run
        distilling = DistillModule(layers, loss_fn, mapper, text, seed=0)
        params = list(layers.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        batch.clean, batch.exemplar_clean = torch.randn(latent, device=device), torch.randn(latent, device=device)
        row.update(stage="distill", lora_parameters=sum(p.numel() for p in params))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = distilling(batch, list(range(b))) if ema is not None else module(batch)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(layers)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    row.update(seconds_per_step=round(min(times[1:] or times), 2), peak_gib=round(peak, 2),
               peak_kind="cuda allocated" if device.type == "cuda" else "process RSS")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration (the fastest after the first)")
    parser.add_argument("--tiny", action="store_true", help="tiny model sizes (a smoke run)")
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--budget-s", type=float, default=0, help="stop starting configurations after this many "
                                                                  "seconds (0: no limit); a running one is cut there")
    parser.add_argument("--stage", default="2", choices=("2", "distill"), help="the step measured (see above)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return
    rows = []
    started = time.perf_counter()
    for batch, precision, checkpointing in itertools.product(
            [int(b) for b in args.batches.split(",")], ("fp32", "bf16"), (False, True)):
        left = args.budget_s - (time.perf_counter() - started) if args.budget_s else None
        if left is not None and left < 30:
            rows.append({"batch": batch, "checkpointing": checkpointing, "precision": precision,
                         "skipped": "out of --budget-s"})
            print("RESULT " + json.dumps(rows[-1]), flush=True)
            continue
        command = [sys.executable, __file__, "--one", "--device", args.device, "--frames", str(args.frames),
                   "--size", str(args.size), "--steps", str(args.steps), "--batch", str(batch),
                   "--precision", precision, "--stage", args.stage] + ["--tiny"] * args.tiny + ["--checkpointing"] * checkpointing
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            done = subprocess.CompletedProcess(command, -9, "", f"timed out after {left:.0f} s (--budget-s)")
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(lines[-1][7:]) if lines else {
            "batch": batch, "checkpointing": checkpointing, "precision": precision,
            "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        print("RESULT " + json.dumps(row), flush=True)
        rows.append(row)
    print("RESULT " + json.dumps({"bench": "train_step_distill" if args.stage == "distill" else "train_step_stage2",
                                  "rows": rows}))


if __name__ == "__main__":
    main()
