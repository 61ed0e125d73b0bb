"""One guided DDIM step of a VideoCrafter UNet at the released size (random weights), ours and, when a checkout of the
official code is given, the official ``UNetModel`` with the same weights, back to back.

    python benchmarks/bench_videocrafter_step.py --kind videocrafter1-t2v-512 --frames 16 --height 320 --width 512 \
        --threads 2 --candidate fp32 --candidate bf16 --official /path/to/VideoCrafter --rounds 3

Each measurement runs in a fresh child process (peak memory is the process's ``ru_maxrss``); the rounds alternate
the order (ABBA) and the run prints, per candidate, the median time and peak-memory ratio against the reference
(``official`` when ``--official`` is given, else the first candidate) with their range over the rounds, and the load
average before every measurement. The official code is imported from the checkout you give (this project ships
none of it); its ``utils/utils.py`` imports ``cv2`` at module level, which is stubbed here when absent (unused on
this path). Its step is the official call order: two batch-1 UNet calls (conditional, then unconditional); ours is
one batch-2 call. Ends with one line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_CONFIGS = {"videocrafter1-t2v-512": "inference_t2v_512_v1.0.yaml",
                    "videocrafter1-t2v-1024": "inference_t2v_1024_v1.0.yaml",
                    "videocrafter2": "inference_t2v_512_v2.0.yaml", "videocrafter1-i2v-512": "inference_i2v_512_v1.0.yaml"}


def child(args: argparse.Namespace) -> dict:
    """Build the UNet, run ``--warmup`` + ``--repeats`` guided steps, report the median time and the peak RSS."""
    import torch

    sys.path.insert(0, str(REPO))
    from videobooth_core.models.videocrafter.config import RELEASED_UNETS
    from videobooth_core.models.videocrafter.unet import VideoCrafterUNet
    from videobooth_core.sampling.videocrafter import VideoCrafterDDIM, ddim_update

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.child_dtype]
    with torch.device("meta"):
        ours = VideoCrafterUNet(RELEASED_UNETS[args.kind])
    ours = ours.to(dtype).to_empty(device="cpu")  # allocated in the measured dtype: no float32 copy in the peak
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():  # random weights of a sensible scale (the same in every process)
            p.copy_(torch.randn(p.shape, generator=generator) / max(p[0].numel(), 1) ** 0.5 if p.ndim > 1
                    else 0.02 * torch.randn(p.shape, generator=generator))
    model = ours.eval()
    if args.child == "official":
        sys.path.insert(0, args.official)
        sys.modules.setdefault("cv2", types.ModuleType("cv2"))
        import yaml
        from lvdm.modules.networks.openaimodel3d import UNetModel

        params = yaml.safe_load(open(Path(args.official) / "configs" / OFFICIAL_CONFIGS[args.kind]))
        params = params["model"]["params"]["unet_config"]["params"]
        with torch.device("meta"):
            official = UNetModel(**{**params, "use_checkpoint": False})
        official.load_state_dict(model.state_dict(), assign=True)
        model = official.eval()
        del ours
    batch_context = torch.randn(2, 77, 1024, generator=generator).to(dtype)
    x = torch.randn(1, 4, args.frames, args.height // 8, args.width // 8, generator=generator)
    step = VideoCrafterDDIM(50, 1.0).steps()[0]
    t, fps = torch.tensor([step.timestep]), torch.tensor([28])

    def guided_step() -> None:
        with torch.no_grad():
            if args.child == "official":  # the official order: conditional, then unconditional, batch 1 each
                cond = model(x.to(dtype), t, context=batch_context[:1], fps=fps)
                uncond = model(x.to(dtype), t, context=batch_context[1:], fps=fps)
            else:
                both = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]), batch_context, torch.cat([fps, fps]))
                cond, uncond = both[:1], both[1:]
            eps = (uncond + 12.0 * (cond - uncond)).float()
            ddim_update(x, eps, step, torch.randn(x.shape, generator=generator))

    for _ in range(args.warmup):
        guided_step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        guided_step()
        times.append(time.perf_counter() - start)
    return {"median_seconds": statistics.median(times), "seconds": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(spec: str, args: argparse.Namespace) -> dict:
    which, _, dtype = spec.partition(":")
    command = [sys.executable, __file__, "--child", which, "--child-dtype", dtype or "fp32", "--kind", args.kind,
               "--frames", str(args.frames), "--height", str(args.height), "--width", str(args.width),
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.official:
        command += ["--official", args.official]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{spec} failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][7:])
    result["load_average"] = load
    print(f"{spec}: {result['median_seconds']:.2f} s, peak {result['peak_rss_mb']:.0f} MB (load {load:.1f})",
          file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="videocrafter1-t2v-512", choices=tuple(OFFICIAL_CONFIGS))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidate", action="append", default=None, help="fp32 | bf16 (ours); repeatable")
    parser.add_argument("--official", help="a checkout of AILab-CVC/VideoCrafter: measured as the reference (fp32)")
    parser.add_argument("--child", choices=("ours", "official"), help=argparse.SUPPRESS)
    parser.add_argument("--child-dtype", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    candidates = [f"ours:{c}" for c in (args.candidate or ["fp32", "bf16"])]
    reference = "official:fp32" if args.official else candidates.pop(0)
    runs: dict[str, list[dict]] = {spec: [] for spec in [reference, *candidates]}
    for round_index in range(args.rounds):
        order = [reference, *candidates]
        for spec in (order if round_index % 2 == 0 else order[::-1]):
            runs[spec].append(measure(spec, args))
    summary = {"reference": reference, "settings": {k: getattr(args, k) for k in ("kind", "frames", "height", "width",
                                                                                 "threads", "repeats", "rounds")}}
    for spec in candidates:
        time_ratios = [c["median_seconds"] / r["median_seconds"] for c, r in zip(runs[spec], runs[reference])]
        memory_ratios = [c["peak_rss_mb"] / r["peak_rss_mb"] for c, r in zip(runs[spec], runs[reference])]
        summary[spec] = {"time_ratio": statistics.median(time_ratios), "time_ratio_range": [min(time_ratios), max(time_ratios)],
                         "memory_ratio": statistics.median(memory_ratios),
                         "memory_ratio_range": [min(memory_ratios), max(memory_ratios)]}
        print(f"{spec} / {reference}: time x{summary[spec]['time_ratio']:.3f} ({min(time_ratios):.3f}-"
              f"{max(time_ratios):.3f}), peak memory x{summary[spec]['memory_ratio']:.3f}", file=sys.stderr)
    summary["runs"] = runs
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
