"""How well each sampler converges: final-latent error against a high-accuracy solution of the same ODE.

    nice -n 10 python benchmarks/sampler_convergence.py --threads 1

What it measures. The deterministic samplers (DDIM eta=0, DPM-Solver++ 2M, Euler, UniPC) are solvers of one
probability-flow ODE on the linear-beta training schedule. Each is run from the same initial noise at several step
counts and both timestep spacings, and its final latent is compared with a reference solution of that ODE:

    rel_max = max|x - ref| / max|ref|        rel_rms = rms(x - ref) / rms(ref)

Reference: DDIM eta=0, trailing spacing, ``--reference-steps`` (1000: every training timestep) and half as many; the
two are combined by Richardson extrapolation (2 x_N - x_N/2; DDIM is first order), which is the reference used by
default (``--reference ddim`` uses x_N itself). The script prints the reference's own error estimates: |x_N - x_N/2|
(the error of plain DDIM at N steps) and, for the extrapolated reference, its difference from the extrapolation of
the next coarser pair (N/2, N/4). On a smooth ODE (``--denoiser gaussian-mixture``) the extrapolation is ~50x more
accurate than x_N; on the rough ODE of the random tiny network it gains little, and the printed self-checks (about
0.5% there) are the floor below which differences are not resolved.

Fixed image-prompt noise. In production the image prompt (exemplar latent) is re-noised with FRESH noise at every
step, as the official sampler does, so the denoiser is not a deterministic function of (x, t) and no ODE is defined.
Here a noise source returns the SAME exemplar noise tensor at every step (per-frame independent, drawn once from the
seed), so the noised exemplar is a smooth function of t and the probability-flow ODE is well defined. The production
sampling path is unchanged; only the benchmark's noise source differs.

Stochastic samplers (the official respaced ancestral DDPM at 250 steps, Euler ancestral, DDIM eta=1) have no
pathwise reference: their output is a different draw for each noise sequence. They are listed with their cost only.

Cost. Every sampler here makes the same UNet calls per step (one guided step = one batched unconditional +
image-prompt UNet call and one conditional call; no sampler needs a second model evaluation per step), so cost
relative to the official 250-step DDPM is steps / 250.

Model: the tiny random model set written by ``make_tiny`` (cached in ``--models``), fp32 on the CPU, 8 frames of 8x8
latents by default (about 70 ms per guided step on one thread; the default run takes about 4.5 minutes). The
image-prompt path is exercised as ``pipeline.generate`` does: a synthetic subject image and mask -> CLIP vision ->
mapper words injected into the prompt's subject word; VAE posterior sample of the same image -> exemplar latent,
resized to the latent size.

Random tiny weights: these numbers measure the solvers' integration error on the linear-beta schedule, NOT visual
quality. A random network is also a poor stand-in for a trained denoiser: its epsilon is not close to the noise at
high noise levels (so the final latent is huge, and a late start, as with ``leading`` spacing, changes it a lot) and
it varies quickly with t (presumably high timestep-embedding frequencies that training would damp), so its ODE is
rough and every solver converges slowly (measured: eps changes ~4% between adjacent timesteps, vs ~0.1% for the
analytic denoiser). ``--denoiser gaussian-mixture`` runs the same sweep on the exact denoiser of a Gaussian-mixture
distribution (a smooth ODE of realistic shape, milliseconds per run): compare the two before drawing conclusions.
The columns t_first / t_last are the first and last scheduled timesteps (with ``leading`` spacing diffusers'
multistep solvers start well below 999, non-monotonically in the step count).

Ends with one line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from videobooth_core.conditioning.image_prompt import prepare_image_prompt  # noqa: E402
from videobooth_core.pipeline import VideoBoothPipeline, fit_exemplar, latent_shape  # noqa: E402
from videobooth_core.settings import VAE_SCALE  # noqa: E402
from videobooth_core.sampling.schedulers import make_scheduler, sample_with_scheduler  # noqa: E402
from videobooth_core.sampling.denoiser import VideoDenoiser  # noqa: E402
from videobooth_core.sampling.schedule import base_betas  # noqa: E402
from videobooth_core.app.tiny import MARKER_FILE, make_tiny  # noqa: E402

DETERMINISTIC = ("ddim", "dpmpp_2m", "euler", "unipc")
STOCHASTIC = (("ddpm (official)", 250), ("euler_ancestral", None), ("ddim eta=1", None))
OFFICIAL_STEPS = 250
PROMPT, SUBJECT = "a dog running on the beach", "dog"


class FixedExemplarNoise:
    """A :class:`sampling.NoiseSource` with fixed initial noise and the SAME exemplar noise at every step."""

    def __init__(self, initial: torch.Tensor, exemplar: torch.Tensor) -> None:
        self._initial, self._exemplar = initial, exemplar

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        assert tuple(shape) == tuple(self._initial.shape), (shape, self._initial.shape)
        return self._initial.clone()

    def exemplar(self, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        assert tuple(shape) == tuple(self._exemplar.shape), (shape, self._exemplar.shape)
        return self._exemplar

    def step(self, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        raise RuntimeError("deterministic samplers draw no step noise")


class GaussianMixtureDenoiser:
    """The exact epsilon of a Gaussian-mixture data distribution (``--denoiser gaussian-mixture``).

    Data: x0 ~ sum_k w_k N(mu_k, s^2 I) in latent space (K means with unit-variance entries, s = 0.5, equal
    weights). With x_t = a x0 + b n (a^2 = alpha-bar_t, b^2 = 1 - a^2) the posterior mean is
    E[x0 | x_t] = sum_k r_k (mu_k + a s^2 / (a^2 s^2 + b^2) (x_t - a mu_k)), r_k the component responsibilities,
    and eps = (x_t - a E[x0 | x_t]) / b. Unlike a random network it behaves like a trained denoiser (eps ~ x_t at
    high noise, a sharp nonlinear choice of component at low noise), so its ODE has a realistic shape; it ignores
    the text and the image prompt.
    """

    def __init__(self, shape: tuple[int, ...], components: int = 8, std: float = 0.5, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed + 1)
        self.means = torch.randn((components, *shape[1:]), generator=generator, dtype=torch.float64)
        self.var = std**2
        self.abar = torch.from_numpy(base_betas()).neg().add(1).cumprod(0)

    def predict(self, x_t: torch.Tensor, timestep: int, exemplar_t: torch.Tensor | None, exemplar_timestep=None):
        a, b2 = float(self.abar[timestep].sqrt()), float(1 - self.abar[timestep])
        x = x_t.double()
        total_var = a * a * self.var + b2
        centred = x - a * self.means  # (K, 4, f, h, w), batch of one
        log_r = -centred.pow(2).flatten(1).sum(1) / (2 * total_var)
        r = torch.softmax(log_r, 0).view(-1, *[1] * (centred.ndim - 1))
        x0 = (r * (self.means + a * self.var / total_var * centred)).sum(0, keepdim=True)
        eps = ((x - a * x0) / b2**0.5).float()
        return eps, eps, None


def synthetic_subject(size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A (size, size, 3) uint8 image (an orange disk on a blue-green gradient) and its (size, size) disk mask."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    mask = ((xs - 0.55 * size) ** 2 + (ys - 0.45 * size) ** 2) < (0.3 * size) ** 2
    image = torch.stack([40 + 60 * xs / size, 120 + 80 * ys / size, 180 - 60 * xs / size], dim=-1)
    image[mask] = torch.tensor([230.0, 140.0, 40.0])
    return image.round().to(torch.uint8), mask


def relative_errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max|x - ref| / max|ref|, rms(x - ref) / rms(ref)), in float64."""
    diff = x.double() - ref.double()
    ref = ref.double()
    return float(diff.abs().max() / ref.abs().max()), float(diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def scheduled_range(name: str, steps: int, spacing: str) -> tuple[int, int]:
    """The first and last timesteps ``name`` evaluates the model at."""
    scheduler = make_scheduler(name, spacing)
    scheduler.set_timesteps(steps)
    return round(float(scheduler.timesteps[0])), round(float(scheduler.timesteps[-1]))


def load_pipeline(models: str | None) -> tuple[VideoBoothPipeline, str]:
    folder = Path(models) if models else Path(tempfile.gettempdir()) / "videobooth_tiny_models"
    if not (folder / MARKER_FILE).is_file():
        make_tiny(folder)
    return VideoBoothPipeline.from_models_dir(str(folder), dtype="fp32", device="cpu"), str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help="tiny model folder (make_tiny writes it if missing; default <tmp>/videobooth_tiny_models)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--latent", type=int, default=8, help="latent height = width (8 = 64x64 video)")
    parser.add_argument("--steps-list", default="10,15,20,25,30,50,100")
    parser.add_argument("--samplers", default=",".join(DETERMINISTIC))
    parser.add_argument("--spacings", default="trailing,leading")
    parser.add_argument("--reference-steps", type=int, default=1000, help="DDIM steps of the reference (even)")
    parser.add_argument("--reference", default="richardson", choices=("richardson", "ddim"))
    parser.add_argument("--denoiser", default="tiny", choices=("tiny", "gaussian-mixture"),
                        help="tiny: the tiny random VideoBooth models; gaussian-mixture: an analytic denoiser")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps_list = [int(s) for s in args.steps_list.split(",") if s]
    samplers = [s for s in args.samplers.split(",") if s]
    spacings = [s for s in args.spacings.split(",") if s]
    for name in samplers:
        if name not in DETERMINISTIC:
            parser.error(f"--samplers: {name!r} is not a deterministic sampler ({', '.join(DETERMINISTIC)})")
    if args.reference_steps % 4 or not 4 <= args.reference_steps <= 1000:
        parser.error("--reference-steps must be a multiple of 4 between 4 and 1000")
    started = time.perf_counter()

    pipe, models_dir = load_pipeline(args.models)
    height = width = args.latent * VAE_SCALE
    shape = latent_shape(args.frames, height, width)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    initial = torch.randn(shape, generator=generator)
    image, mask = synthetic_subject()
    prepared = prepare_image_prompt(image, mask)
    null_text, _ = pipe.encode_prompt("None")
    injected = pipe.encode_image_prompt(prepared)
    cond_text, used_prompt = pipe.encode_prompt(PROMPT, SUBJECT, injected)
    exemplar = fit_exemplar(pipe.encode_exemplar(prepared, generator), height, width)
    exemplar_noise = torch.randn((1, 4, args.frames, args.latent, args.latent), generator=generator)
    noise = FixedExemplarNoise(initial, exemplar_noise)
    denoiser = VideoDenoiser(pipe.unet, cond_text, null_text, args.cfg_scale, "official")
    if args.denoiser == "gaussian-mixture":
        denoiser = GaussianMixtureDenoiser(shape, seed=args.seed)
    setup_seconds = time.perf_counter() - started

    def solve(name: str, steps: int, spacing: str) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        with torch.no_grad():
            x = sample_with_scheduler(denoiser, name, steps, shape, noise, None, exemplar, spacing=spacing, eta=0.0)
        return x, time.perf_counter() - start

    # -- reference ------------------------------------------------------------------------------
    n = args.reference_steps
    x_n, t_n = solve("ddim", n, "trailing")
    x_half, t_half = solve("ddim", n // 2, "trailing")
    x_quarter, t_quarter = solve("ddim", n // 4, "trailing")
    richardson = 2 * x_n.double() - x_half.double()
    richardson_coarse = 2 * x_half.double() - x_quarter.double()
    ref = richardson if args.reference == "richardson" else x_n.double()
    seconds_per_step = (t_n + t_half + t_quarter) / (n + n // 2 + n // 4)
    self_error = {
        f"ddim{n}_vs_ddim{n // 2}": relative_errors(x_n, x_half),
        f"ddim{n // 2}_vs_ddim{n // 4}": relative_errors(x_half, x_quarter),
        f"richardson({n},{n // 2})_vs_richardson({n // 2},{n // 4})": relative_errors(richardson, richardson_coarse),
        f"ddim{n}_vs_reference": relative_errors(x_n, ref),
    }
    if args.denoiser == "tiny":
        print(f"tiny random models: {models_dir}; prompt used: {used_prompt!r}")
    else:
        print("analytic Gaussian-mixture denoiser (no UNet; text and image prompt unused)")
    print(f"latent {tuple(shape)} (video {args.frames}x{height}x{width}), fp32 cpu, {args.threads} thread(s), "
          f"cfg {args.cfg_scale}, seed {args.seed}; {seconds_per_step * 1e3:.1f} ms per guided step")
    print(f"reference: {'Richardson 2*x_N - x_N/2 of ' if args.reference == 'richardson' else ''}DDIM eta=0 trailing, "
          f"N={n}; max|ref| = {float(ref.abs().max()):.4g}, rms(ref) = {float(ref.pow(2).mean().sqrt()):.4g}")
    for key, (emax, erms) in self_error.items():
        print(f"  reference self-check {key:48s} rel_max={emax:.2e} rel_rms={erms:.2e}")
    print()

    # -- sweep ----------------------------------------------------------------------------------
    header = (f"{'sampler':18s} {'spacing':9s} {'steps':>5s} {'t_first':>7s} {'t_last':>6s} {'cost/ddpm250':>12s} "
              f"{'rel_max':>9s} {'rel_rms':>9s} {'seconds':>8s}")
    print(header)
    print("-" * len(header))
    table = []
    for name in samplers:
        for spacing in spacings:
            for steps in steps_list:
                x, seconds = solve(name, steps, spacing)
                emax, erms = relative_errors(x, ref)
                t_first, t_last = scheduled_range(name, steps, spacing)
                row = {"sampler": name, "spacing": spacing, "steps": steps, "t_first": t_first, "t_last": t_last,
                       "cost_vs_ddpm250": steps / OFFICIAL_STEPS, "rel_max": emax, "rel_rms": erms,
                       "seconds": round(seconds, 3)}
                table.append(row)
                print(f"{name:18s} {spacing:9s} {steps:5d} {t_first:7d} {t_last:6d} {steps / OFFICIAL_STEPS:12.3f} "
                      f"{emax:9.2e} {erms:9.2e} {seconds:8.2f}", flush=True)
    for name, steps in STOCHASTIC:
        cost = f"{steps / OFFICIAL_STEPS:12.3f}" if steps else f"{'steps/250':>12s}"
        print(f"{name:18s} {'-':9s} {steps or '-':>5} {'-':>7s} {'-':>6s} {cost} "
              "n/a: stochastic, no pathwise reference")
        table.append({"sampler": name, "spacing": None, "steps": steps,
                      "cost_vs_ddpm250": steps / OFFICIAL_STEPS if steps else None, "rel_max": None, "rel_rms": None,
                      "note": "stochastic: no pathwise reference"})
    total = time.perf_counter() - started
    print(f"\ntotal {total:.1f} s (setup {setup_seconds:.1f} s)")
    result = {
        "frames": args.frames, "latent": [args.latent, args.latent], "video": [height, width], "threads": args.threads,
        "dtype": "fp32", "device": "cpu", "seed": args.seed, "cfg_scale": args.cfg_scale,
        "denoiser": "tiny random models" if args.denoiser == "tiny" else "analytic gaussian mixture",
        "reference": {"kind": args.reference, "sampler": "ddim", "eta": 0.0, "spacing": "trailing", "steps": n,
                      "max_abs": float(ref.abs().max())},
        "reference_self_error": {k: {"rel_max": v[0], "rel_rms": v[1]} for k, v in self_error.items()},
        "seconds_per_guided_step": round(seconds_per_step, 4), "total_seconds": round(total, 1),
        "table": table, "torch": torch.__version__,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
