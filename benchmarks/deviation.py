"""How far each precision and each opt-in speed mode moves the result, on the official tiny fixture.

    python benchmarks/deviation.py [--fixture tests/fixtures/official_tiny]

Runs the fixture's whole sampling loop (recorded z and noise replayed) with the exact fp32 path, then with
fp16 / bf16 weights and compute, and with each speed mode, and reports for ``final_sample`` and the first
step's guided epsilon: max|diff| / max|reference| against the exact fp32 path and against the official
recording. Ends with one line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from safetensors.torch import load_file  # noqa: E402

from videobooth_core.loading.checkpoint import load_mapper, load_unet  # noqa: E402
from videobooth_core.models.config import UNetConfig  # noqa: E402
from videobooth_core.sampling.ddpm import sample_ddpm  # noqa: E402
from videobooth_core.sampling.denoiser import VideoDenoiser  # noqa: E402
from videobooth_core.sampling.schedule import RespacedDDPM  # noqa: E402


class Replay:
    def __init__(self, inputs, outputs):
        self.inputs, self.outputs = inputs, outputs

    def initial(self, shape):
        return self.inputs["z"]

    def exemplar(self, step, shape):
        return self.outputs["loop.exemplar_noise"][step][:1]

    def step(self, step, shape):
        return self.outputs["loop.sample_noise"][step][:1]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def run(folder: Path, dtype: torch.dtype, **options) -> tuple[torch.Tensor, torch.Tensor]:
    config = json.loads((folder / "config.json").read_text())
    inputs = load_file(str(folder / "inputs.safetensors"))
    outputs = load_file(str(folder / "outputs.safetensors"))
    unet = load_unet(folder / "unet.safetensors",
                     UNetConfig.from_official(config["unet"], tuple(config["unet_watermark_block_out_channels"])), dtype=dtype)
    mapper = load_mapper(folder / "mapper.safetensors", dtype=dtype)
    unet.attach_projections(mapper.site_projections())
    image_prompt_steps = options.pop("image_prompt_steps", (0.0, 1.0))
    denoiser = VideoDenoiser(unet, outputs["text.cond_last_hidden_state"], outputs["text.null_last_hidden_state"],
                             config["sampling"]["cfg_scale"], **options)
    first_eps = []
    with torch.no_grad():
        final = sample_ddpm(denoiser, RespacedDDPM(config["sampling"]["num_steps"]), tuple(inputs["z"].shape),
                            Replay(inputs, outputs), inputs["exemplar_latent_clean"],
                            callback=lambda s, t, o: first_eps.append(o.eps) if s == 0 else None,
                            image_prompt_steps=image_prompt_steps)
    return final, first_eps[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default=str(REPO / "tests" / "fixtures" / "official_tiny"))
    args = parser.parse_args()
    folder = Path(args.fixture)
    outputs = load_file(str(folder / "outputs.safetensors"))
    official_final, official_eps = outputs["final_sample"], outputs["loop.model_output"][0][:1]
    exact_final, exact_eps = run(folder, torch.float32)
    cases = {
        "exact-fp32": dict(dtype=torch.float32),
        "official-call-order-fp32": dict(dtype=torch.float32, batch_passes=False),
        "fp16": dict(dtype=torch.float16),
        "bf16": dict(dtype=torch.bfloat16),
        "single-frame-image-prompt": dict(dtype=torch.float32, single_frame_image_prompt=True),
        "image-prompt-first-half-only": dict(dtype=torch.float32, image_prompt_steps=(0.0, 0.5)),
        "no-watermark-branch": dict(dtype=torch.float32, watermark_branch=False),
        "no-image-prompt (scale of the image prompt's effect)": dict(dtype=torch.float32, image_prompt_strength=0.0),
    }
    report = {}
    for name, options in cases.items():
        dtype = options.pop("dtype")
        final, eps = run(folder, dtype, **options)
        report[name] = {
            "final_vs_exact_fp32": relative(final, exact_final), "final_vs_official": relative(final, official_final),
            "first_eps_vs_exact_fp32": relative(eps, exact_eps), "first_eps_vs_official": relative(eps, official_eps),
        }
        print(f"{name:55s} " + " ".join(f"{k}={v:.2e}" for k, v in report[name].items()))
    print("RESULT " + json.dumps({"fixture": str(folder), "relative_max_abs_diff": report}))


if __name__ == "__main__":
    main()
