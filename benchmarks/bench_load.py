"""Loading a released-size VideoBooth UNet checkpoint (random weights) and converting it.

    python benchmarks/bench_load.py --dir /tmp/vb_full

Writes (once) a released-layout pickle like watermark_remove_module.pt ({'ema_unet': fp32 UNet, 'model': a
second fp32 copy}, about 8.3 GB), then measures in fresh processes: loading it with ``load_unet`` (mmap'd
weights-only pickle), converting it to fp16 safetensors, and loading the conversion. Each line:
RESULT {json} with seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_checkpoint(path: Path) -> None:
    import torch

    from videobooth_core.models.config import UNetConfig
    from videobooth_core.models.unet_3d import UNet3DModel

    with torch.device("meta"):
        unet = UNet3DModel(UNetConfig())
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in unet.state_dict().items()}
    second = {k: v.clone() for k, v in state.items()}
    torch.save({"ema_unet": state, "model": second}, path)


def measure(action: str, directory: Path) -> dict:
    import torch

    from videobooth_core.loading.checkpoint import convert_released_weights, load_unet

    start = time.perf_counter()
    if action == "load-pt":
        unet = load_unet(directory / "watermark_remove_module.pt")
    elif action == "convert":
        convert_released_weights(directory / "watermark_remove_module.pt", None, directory / "converted", "fp16")
        unet = None
    elif action == "load-safetensors-fp16":
        unet = load_unet(directory / "converted" / "videobooth_unet.safetensors", dtype=torch.float16)
    else:
        raise ValueError(action)
    seconds = time.perf_counter() - start
    result = {"action": action, "seconds": round(seconds, 2), "peak_rss_mb": round(_peak_mb(), 1)}
    if unet is not None:
        # weights are memory-mapped: reading every one pages the file in (what the first step would do)
        with torch.no_grad():
            checksum = sum(float(p.sum()) for p in unet.parameters())
        result.update(parameters=sum(p.numel() for p in unet.parameters()), checksum=round(checksum, 3),
                      seconds_incl_reading_all_weights=round(time.perf_counter() - start, 2),
                      peak_rss_mb_after_reading_all_weights=round(_peak_mb(), 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/videobooth_full_checkpoint")
    parser.add_argument("--action", help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = Path(args.dir)
    sys.path.insert(0, str(REPO))
    if args.action:
        print("RESULT " + json.dumps(measure(args.action, directory)))
        return
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = directory / "watermark_remove_module.pt"
    if not checkpoint.exists():
        write_checkpoint(checkpoint)
    print(f"checkpoint: {checkpoint} ({checkpoint.stat().st_size / 1e9:.2f} GB)")
    for action in ("load-pt", "convert", "load-safetensors-fp16"):
        # drop the page cache's advantage as far as an unprivileged run can: one process per action
        out = subprocess.run([sys.executable, __file__, "--dir", str(directory), "--action", action],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
