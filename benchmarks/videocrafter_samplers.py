"""VideoCrafter's samplers measured (issue 26): the official DDIM against the pack's fast ones on the model's schedule.

    OMP_NUM_THREADS=1 python benchmarks/videocrafter_samplers.py

1. Equivalence: the diffusers DDIM (eta 0, ``leading`` spacing: the official timesteps) on the variance-preserving
   view of each kind's process against the official DDIM, on a tiny random UNet of each of the four kinds (the
   tests' model, guidance 12, 2 frames of 8x8 latents), at 10 and 50 steps: ``max|diff| / max|official|``.
2. Integration error on a smooth ODE: a Gaussian data distribution (x0 ~ N(0.3, 0.8^2) per element) has an exact
   eps for the kind's process (``use_scale`` included), and its probability-flow ODE an exact solution: in the
   variance-preserving view, ``(x~_t - sqrt(a~_t) m) / sqrt(a~_t v + 1 - a~_t)`` is constant along a path. Each
   deterministic sampler's final latent against the exact solution from its own first timestep and starting value
   to its own end (x0 for dpmpp_2m, euler and unipc; the level of timestep 0 for the official DDIM, whose last step
   goes to ``alphas_cumprod[0]``): ``rms(x - exact) / rms(exact)``. The stochastic ones (official eta 1,
   euler_ancestral) are other draws, not listed.
3. The tiny random UNet (guidance 12): each sampler at 25 steps, and the official DDIM at 25, against the official
   DDIM at 50 (eta 0); a random network is no denoiser (its latents grow to tens), so this shows only that the runs
   are of the same order, not quality.

Prints one line per measurement and ends with ``RESULT {json}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from videobooth_core.app.tiny_videocrafter import tiny_guided_eps  # noqa: E402
from videobooth_core.models.videocrafter.config import RELEASED_SAMPLING, RELEASED_UNETS  # noqa: E402
from videobooth_core.sampling.noise import GeneratorNoise  # noqa: E402
from videobooth_core.sampling.videocrafter import (  # noqa: E402
    FAST_SAMPLERS,
    VideoCrafterDDIM,
    alphas_cumprod,
    sample_videocrafter_ddim,
    sample_videocrafter_scheduler,
    variance_preserving_schedule,
    x0_scale_array,
)

SHAPE = (1, 4, 2, 8, 8)


def scale_of(kind: str) -> dict:
    return RELEASED_SAMPLING[kind].x0_scale


MEAN, STD = 0.3, 0.8


def gaussian_eps(kind: str):
    """The exact eps of x_t = sqrt(a) s x0 + sqrt(1 - a) eps for x0 ~ N(MEAN, STD^2) elementwise."""
    scale = scale_of(kind)
    a = alphas_cumprod().double()
    s = x0_scale_array(scale["scale_b"], scale["fix_scale_bug"])[:1000].double() if scale["use_scale"] \
        else torch.ones(1000, dtype=torch.float64)

    def eps(x, timesteps):
        t = int(timesteps[0])
        signal, noise2 = a[t].sqrt() * s[t], 1 - a[t]
        x0 = MEAN + signal * STD ** 2 / (signal ** 2 * STD ** 2 + noise2) * (x.double() - signal * MEAN)
        e = ((x.double() - signal * x0) / noise2.sqrt()).float()
        return e, e
    return eps


def gaussian_error(kind: str, run, to_clean: bool) -> float:
    """``run(on_step)``'s final latent against the exact ODE solution from its first step (see the docstring)."""
    vp, norms = variance_preserving_schedule(**scale_of(kind))
    first = []
    x = run(lambda record: first.append((record.timestep, record.x_in)) if not first else None).double()
    t, x_in = first[0]
    start = x_in.double() / float(norms[t])
    z = (start - vp[t] ** 0.5 * MEAN) / (vp[t] * STD ** 2 + 1 - vp[t]) ** 0.5
    end = 1.0 if to_clean else float(vp[0])  # n_0 = 1: the level of timestep 0 is the same in both views
    exact = end ** 0.5 * MEAN + (end * STD ** 2 + 1 - end) ** 0.5 * z
    return rel_rms(x, exact)


def official(eps, kind: str, steps: int, eta: float = 0.0, on_step=None) -> torch.Tensor:
    return sample_videocrafter_ddim(eps, VideoCrafterDDIM(steps, eta, **scale_of(kind)), SHAPE,
                                    GeneratorNoise(torch.Generator().manual_seed(3)), guidance=12.0, on_step=on_step)


def fast(eps, kind: str, name: str, steps: int, **kwargs) -> torch.Tensor:
    return sample_videocrafter_scheduler(eps, name, steps, SHAPE, GeneratorNoise(torch.Generator().manual_seed(3)),
                                         guidance=12.0, **scale_of(kind), **kwargs)


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    result: dict = {"equivalence": {}, "gaussian": {}, "tiny": {}}
    for kind in sorted(RELEASED_UNETS):
        eps = tiny_guided_eps(kind)
        for steps in (10, 50):
            ref = official(eps, kind, steps)
            ours = fast(eps, kind, "ddim", steps, spacing="leading")
            value = float((ours - ref).abs().max() / ref.abs().max())
            result["equivalence"][f"{kind}@{steps}"] = value
            print(f"equivalence {kind} {steps} steps: max|diff|/max|official| {value:.2e}", flush=True)
    for kind in ("videocrafter1-t2v-512", "videocrafter2", "videocrafter1-t2v-1024"):
        eps = gaussian_eps(kind)
        rows = {f"ddim@{n} (official)": (lambda on_step, n=n: official(eps, kind, n, on_step=on_step), False)
                for n in (25, 50, 250)}
        rows.update({f"{name}@{n}": (lambda on_step, name=name, n=n: fast(eps, kind, name, n, on_step=on_step), True)
                     for name in FAST_SAMPLERS if name != "euler_ancestral" for n in (10, 25)})
        for label, (run, to_clean) in rows.items():
            error = gaussian_error(kind, run, to_clean)
            result["gaussian"][f"{kind} {label}"] = error
            print(f"gaussian ODE {kind} {label}: rel rms vs the exact solution {error:.2e}", flush=True)
    kind = "videocrafter2"
    eps = tiny_guided_eps(kind)
    ref = official(eps, kind, 50)
    rows = {"ddim@25 (official)": official(eps, kind, 25)}
    rows.update({f"{name}@25": fast(eps, kind, name, 25) for name in FAST_SAMPLERS})
    for label, x in rows.items():
        result["tiny"][f"{kind} {label}"] = rel_rms(x, ref)
        print(f"tiny random {kind} {label}: rel rms vs official ddim@50 {rel_rms(x, ref):.3f} "
              f"(max|official| {ref.abs().max():.1f})", flush=True)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
