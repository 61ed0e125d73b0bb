"""How much of a LoRA's effect lives in its key/value layers, which VideoBooth only sees through the mapper?

One UNet evaluation (random weights, seeded) is compared with: no LoRA (y0); a random SD-1.x-style LoRA on every
layer kohya trains (attention q/k/v/out, feed-forwards, proj_in/out) with its K/V deltas left out (``kv="ignore"``,
y_ignore); the same with them on the mapper's projections (``kv="mapper"``, y_mapper). Every LoRA layer gets
``||scale * up @ down|| = rel * ||W||`` (the same relative size everywhere; real LoRAs differ per layer).

Printed: the relative output change of each, and the K/V share ``||y_mapper - y_ignore|| / ||y_mapper - y0||``:
the part of the LoRA's effect lost when K/V deltas are left out.

    python benchmarks/lora_kv_effect.py --size tiny
    python benchmarks/lora_kv_effect.py --size real --latent 8 --frames 2     # ~7 GB RAM, one evaluation

Random weights only say how the architecture propagates the deltas; with real weights (released UNet + mapper,
a trained style LoRA) the number would be measured the same way on real prompts and a real LoRA.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from videobooth_core.app.tiny import TINY_UNET, _randomise
from videobooth_core.loading.lora import LoraFile, LoraLayer, LoraSpec, apply_loras
from videobooth_core.models.config import MapperConfig, UNetConfig
from videobooth_core.models.mapper import Mapper
from videobooth_core.models.unet_3d import UNet3DModel

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def build(config: UNetConfig, seed: int) -> tuple[UNet3DModel, Mapper]:
    generator = torch.Generator().manual_seed(seed)
    unet = UNet3DModel(config)
    _randomise(unet, generator)
    sites = tuple(sorted((s.site, s.proj_in.out_channels) for s in unet.attention_sites))
    mapper = Mapper(MapperConfig(input_dim=8, hidden_dim=8, output_dim=config.cross_attention_dim,
                                 site_channels=sites))
    _randomise(mapper, generator)
    # the mapper's projections start as copies of the UNet's own (as VideoBooth's were initialised from SD's)
    with torch.no_grad():
        for site in unet.attention_sites:
            block, p = site.transformer_blocks[0], mapper.site_projections()[site.site]
            for own, copies in ((block.attn1.to_k, (p.attn1_key, p.image_prompt_key)),
                                (block.attn1.to_v, (p.attn1_value, p.image_prompt_value)),
                                (block.attn2.to_k, (p.text_key,)), (block.attn2.to_v, (p.text_value,))):
                for copy in copies:
                    copy.weight.copy_(own.weight)
    unet.attach_projections(mapper.site_projections(), release_own=True)
    return unet.eval(), mapper.eval()


def random_lora(unet: UNet3DModel, rank: int, rel: float, seed: int) -> LoraFile:
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for site in unet.attention_sites:
        p = unet.attached_projections[site.site]
        kv = {"attn1.to_k": p.attn1_key, "attn1.to_v": p.attn1_value, "attn2.to_k": p.text_key,
              "attn2.to_v": p.text_value}
        names = [f"{site.site}.transformer_blocks.0.{t}" for t in TARGETS] + [f"{site.site}.proj_in",
                                                                              f"{site.site}.proj_out"]
        for name in names:
            short = name.split("transformer_blocks.0.")[-1]
            weight = (kv[short] if short in kv else unet.get_submodule(name)).weight.flatten(1).float()
            down = torch.randn(rank, weight.shape[1], generator=generator)
            up = torch.randn(weight.shape[0], rank, generator=generator)
            scale = rel * weight.norm() / (up @ down).norm()
            layers["lora_unet_" + name.replace(".", "_")] = LoraLayer(down, up * scale, alpha=None)
    return LoraFile(layers, "random LoRA")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--latent", type=int, default=8, help="latent height = width")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rel", type=float, default=0.05, help="||delta|| / ||W|| per LoRA layer")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    config = TINY_UNET if args.size == "tiny" else UNetConfig()
    start = time.perf_counter()
    unet, _ = build(config, 0)
    built = time.perf_counter() - start
    results = []
    for seed in range(args.seeds):
        generator = torch.Generator().manual_seed(100 + seed)
        sample = torch.randn(1, 4, args.frames, args.latent, args.latent, generator=generator)
        text = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
        y0 = unet(sample, 500, text)
        lora = random_lora(unet, args.rank, args.rel, seed)
        outputs = {}
        for kv in ("ignore", "mapper"):
            patch, _ = apply_loras(unet, [LoraSpec(lora)], kv=kv)
            outputs[kv] = unet(sample, 500, text)
            patch.undo()
        change = lambda y: float((y - y0).norm() / y0.norm())  # noqa: E731
        results.append({
            "seed": seed, "change_kv_ignore": change(outputs["ignore"]), "change_kv_mapper": change(outputs["mapper"]),
            "kv_share": float((outputs["mapper"] - outputs["ignore"]).norm() / (outputs["mapper"] - y0).norm()),
        })
    mean = {k: sum(r[k] for r in results) / len(results) for k in results[0] if k != "seed"}
    print(json.dumps({"size": args.size, "latent": args.latent, "frames": args.frames, "rank": args.rank,
                      "rel": args.rel, "build_s": round(built, 1), "per_seed": results, "mean": mean}, indent=1))


if __name__ == "__main__":
    main()
