"""Sparse-causal cross-frame attention alone, at the released model's shapes, every kernel back to back.

    python benchmarks/bench_attention.py --threads 2 --rounds 3 [--dtype fp32 bf16] [--levels 32 16 8]

One call of ``models.attention.sparse_causal_attention`` (frame f attends to [frame 0 ; frame f-1]) on
already projected tensors, 16 frames, for each backend: ``sdpa`` (default), ``dedup`` (opt-in, one copy of
frame 0 for frames 0 and 1), ``math`` (official order, materialised scores); and, for the record, two kernels
that are not shipped because they measured no better here: ``sdpa-3d`` (SDPA on three-dimensional
(batch * heads, tokens, width) inputs, which the CPU serves with the materialised math kernel) and
``lse-merge`` (all frames' queries against one copy of frame 0 in one call, the previous frame in another,
merged with their log-sum-exps; the CPU flash kernel's private ``_scaled_dot_product_flash_attention_for_cpu``)
and ``chunked`` (materialised attention 256 queries at a time, so one block's scores stay in cache; softmax in
float32, matmuls in the input dtype: the "math at GEMM speed" candidate for bf16).
Backends alternate within each round, so drift from other load hits all of them alike.

Levels are the latent side at each attention site of a 32x32 latent (256x256 video): 32 (1024 tokens,
320 channels), 16 (256, 640), 8 (64, 1280), 8 heads each (head width 40, 80, 160). GFLOP/s counts the
official FLOPs (4 * queries * 2N keys * width per head-frame) for every kernel, so it compares times.
Deviation: max |out - math fp64| / max |math fp64|. Ends with one line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from videobooth_core.models.attention import first_and_previous_frames, sparse_causal_attention  # noqa: E402

LEVELS = {32: (1024, 320), 16: (256, 640), 8: (64, 1280)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADS = 8


def sdpa_3d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """SDPA on (batch * heads, tokens, width): what a 3-D layout gets (not shipped)."""
    key = rearrange(first_and_previous_frames(key), "b f n (h d) -> (b f h) n d", h=num_heads)
    value = rearrange(first_and_previous_frames(value), "b f n (h d) -> (b f h) n d", h=num_heads)
    query = rearrange(query, "bf n (h d) -> (bf h) n d", h=num_heads)
    out = F.scaled_dot_product_attention(query, key, value)
    return rearrange(out, "(bf h) n d -> bf n (h d)", h=num_heads)


def lse_merge(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Frame 0 for all frames in one call, previous frames in another, merged by log-sum-exp (not shipped)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    batch, frames = key.shape[:2]
    q = rearrange(query, "(b f) n (h d) -> b h (f n) d", f=frames, h=num_heads)
    k, v = (rearrange(t, "b f n (h d) -> b h f n d", h=num_heads) for t in (key, value))
    out_first, lse_first = flash(q, k[:, :, 0], v[:, :, 0], 0.0, False)
    out = rearrange(out_first, "b h (f n) d -> b f n h d", f=frames).contiguous()
    if frames > 2:
        rest = frames - 2
        q_rest = rearrange(q, "b h (f n) d -> (b f) h n d", f=frames)
        q_rest = q_rest.reshape(batch, frames, *q_rest.shape[1:])[:, 2:].flatten(0, 1)
        k_rest, v_rest = (rearrange(t[:, :, 1:-1], "b h f n d -> (b f) h n d") for t in (k, v))
        out_prev, lse_prev = flash(q_rest, k_rest, v_rest, 0.0, False)
        lse_first = rearrange(lse_first, "b h (f n) -> b f n h", f=frames)[:, 2:]
        lse_prev = rearrange(lse_prev, "(b f) h n -> b f n h", f=rest)
        total = torch.logaddexp(lse_first, lse_prev)
        weight_first, weight_prev = (lse_first - total).exp(), (lse_prev - total).exp()
        out_prev = rearrange(out_prev, "(b f) h n d -> b f n h d", f=rest)
        out[:, 2:] = out[:, 2:] * weight_first[..., None] + out_prev * weight_prev[..., None]
    return rearrange(out, "b f n h d -> (b f) n (h d)")


def query_chunked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int,
                  chunk: int = 256) -> torch.Tensor:
    """Materialised attention a block of queries at a time (scores of one block sized to stay in cache: 256
    queries x 2N keys per head-frame), softmax in float32, matmuls in the input dtype (not shipped)."""
    key = rearrange(first_and_previous_frames(key), "b f n (h d) -> (b f) h d n", h=num_heads)
    value = rearrange(first_and_previous_frames(value), "b f n (h d) -> (b f) h n d", h=num_heads)
    query = rearrange(query, "bf n (h d) -> bf h n d", h=num_heads)
    query = query * query.shape[-1] ** -0.5
    out = torch.empty_like(query)
    for start in range(0, query.shape[2], chunk):
        scores = torch.matmul(query[:, :, start:start + chunk], key)
        out[:, :, start:start + chunk] = torch.matmul(scores.float().softmax(dim=-1).to(value.dtype), value)
    return rearrange(out, "bf h n d -> bf n (h d)")


def kernels() -> dict:
    return {
        "sdpa": lambda q, k, v: sparse_causal_attention(q, k, v, HEADS, "sdpa"),
        "dedup": lambda q, k, v: sparse_causal_attention(q, k, v, HEADS, "dedup"),
        "math": lambda q, k, v: sparse_causal_attention(q, k, v, HEADS, "math"),
        "sdpa-3d": lambda q, k, v: sdpa_3d(q, k, v, HEADS),
        "lse-merge": lambda q, k, v: lse_merge(q, k, v, HEADS),
        "chunked": lambda q, k, v: query_chunked(q, k, v, HEADS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="videos per call (the exact path batches 2)")
    parser.add_argument("--levels", type=int, nargs="+", default=[32, 16, 8], choices=sorted(LEVELS))
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--kernels", nargs="+", default=list(kernels()), choices=list(kernels()))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with torch.inference_mode():
        for dtype_name in args.dtype:
            for level in args.levels:
                tokens, channels = LEVELS[level]
                generator = torch.Generator().manual_seed(0)
                query = torch.randn(args.batch * args.frames, tokens, channels, generator=generator)
                key = torch.randn(args.batch, args.frames, tokens, channels, generator=generator)
                value = torch.randn(args.batch, args.frames, tokens, channels, generator=generator)
                reference = sparse_causal_attention(query.double(), key.double(), value.double(), HEADS, "math")
                query, key, value = (t.to(DTYPES[dtype_name]) for t in (query, key, value))
                flops = 4 * args.batch * args.frames * tokens * 2 * tokens * channels
                chosen = {name: fn for name, fn in kernels().items() if name in args.kernels}
                times: dict[str, list[float]] = {name: [] for name in chosen}
                deviation = {}
                for name, fn in chosen.items():  # warm-up and deviation
                    out = fn(query, key, value)
                    deviation[name] = float((out.double() - reference).abs().max() / reference.abs().max())
                for _ in range(args.rounds):
                    for name, fn in chosen.items():
                        start = time.perf_counter()
                        fn(query, key, value)
                        times[name].append(time.perf_counter() - start)
                for name in chosen:
                    median = statistics.median(times[name])
                    row = {"dtype": dtype_name, "level": level, "tokens": tokens, "head_width": channels // HEADS,
                           "kernel": name, "median_s": round(median, 4), "all_s": [round(t, 4) for t in times[name]],
                           "gflops": round(flops / median / 1e9, 1),
                           "vs_sdpa": round(median / statistics.median(times["sdpa"]), 3) if "sdpa" in times else None,
                           "deviation_vs_fp64": float(f"{deviation[name]:.3g}")}
                    results.append(row)
                    print(f"{dtype_name} {level}x{level} {name:10s} {median:8.4f} s  {row['gflops']:7.1f} GFLOP/s  "
                          f"x{row['vs_sdpa']} of sdpa  deviation {row['deviation_vs_fp64']:.2e}", flush=True)
    print("RESULT " + json.dumps({"threads": args.threads, "frames": args.frames, "batch": args.batch,
                                  "loadavg": os.getloadavg(), "torch": torch.__version__, "rows": results}))


if __name__ == "__main__":
    main()
