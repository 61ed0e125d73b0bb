"""Proof of the consistency distillation (issue 27) on tiny random models: does a short ``train --stage distill``
make the student's few-step ``lcm`` result closer to the teacher's 50-step DDIM result than the teacher's own
few-step DDIM result?

    nice -n 10 python benchmarks/distill_proof.py --threads 2 --out /tmp/distill_proof

What it does.
1. The tiny random model set (``make_tiny``) and a synthetic training dataset (``dataset synthetic``, seed 0).
2. ``train_distill`` for ``--train-steps`` steps (the real stage: the trainer's data, BatchMaker, checkpoints) with the
   settings given (LoRA rank/alpha, learning rate, EMA target or none).
3. Held-out cases: image prompts (frame 0 and mask) and subject words of synthetic videos drawn with ANOTHER seed
   (1), prompts with wording the training captions never use, and seeds 1000 + i. For each case, through the
   pipeline's own ``generate`` (latents, no decode):
   - reference: the teacher, DDIM (``--sampler ddim``, eta 0, trailing) at 50 steps, cfg 4 with the official rule;
   - teacher DDIM at 1/2/4/8 steps (same settings);
   - teacher + lcm sampler at 1/2/4/8 steps without the LoRA (a control: the sampler alone);
   - student: the LoRA loaded with the pack's LoRA loader (``use_sd_models``, kohya format, K/V onto the mapper's
     projections), lcm sampler at 1/2/4/8 steps, guidance-free (``lcm_cfg`` 1).
4. Per configuration the latent MSE to the reference, averaged over the cases, and relative to the reference's
   mean square (rel = MSE / mean(ref^2)); the margin = teacher DDIM MSE / student MSE at the same step count.

``--evaluate`` adds the ``evaluate`` readout: every held-out case decoded as the teacher's recommended sampler
(dpmpp_2m, 25 steps, cfg 4) and the student's lcm 1/2/4/8-step videos, with their latents, scored by ``python -m
videobooth_core evaluate --set student.jsonl --reference teacher.jsonl`` (CLIP-T, CLIP-I, DINO, consistency and the
latent MSE to the teacher's video of the same case, per configuration; compare.md, chart_compare.png and the report
in OUT/eval_<run>/report/) with the tiny random metric models (so the scores exercise the path, they measure
nothing; the latent MSE is real).

Caveat (see benchmarks/sampler_convergence.py): a random tiny network is a poor stand-in for a trained denoiser (its
epsilon is far from the noise at high noise levels, so its final latents are large and its ODE is rough). The
numbers show that the distillation machinery does what it should (learns the teacher's guided ODE endpoint in a few
steps); they say nothing about visual quality.

Ends with one line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from videobooth_core.app.tiny import MARKER_FILE, make_tiny  # noqa: E402
from videobooth_core.dataset.synthetic import make_synthetic, synthetic_video  # noqa: E402
from videobooth_core.evaluation.compare import latent_mse  # noqa: E402
from videobooth_core.pipeline import GenerationRequest, VideoBoothPipeline  # noqa: E402
from videobooth_core.training.config import TrainConfig  # noqa: E402
from videobooth_core.training.distill_loop import train_distill  # noqa: E402

STEPS = (1, 2, 4, 8)
REFERENCE_STEPS = 50
WORDINGS = ("the {word} crossing a meadow", "a {word} jumping near a wall", "one {word} turning around",
            "a {word} running past a fence")


def held_out_cases(count: int, frames: int, size: int) -> list[dict]:
    """Image prompts from synthetic videos of seed 1 (training uses seed 0), unseen wordings, seeds 1000 + i."""
    cases = []
    for index in range(count):
        video, mask, _, word = synthetic_video(index, seed=1)
        cases.append({"prompt": WORDINGS[index % len(WORDINGS)].format(word=word), "subject_word": word,
                      "image": torch.from_numpy(video[0]), "mask": torch.from_numpy(mask), "seed": 1000 + index,
                      "frames": frames, "width": size, "height": size})
    return cases


def latents(pipe: VideoBoothPipeline, case: dict, **settings) -> torch.Tensor:
    request = GenerationRequest(**case, **settings)
    return pipe.generate(request, decode=False).latents.double()


def evaluate_readout(pipe: VideoBoothPipeline, cases: list[dict], videos: dict[str, list[torch.Tensor]],
                     reference: str, models: Path, folder: Path) -> None:
    """Decode ``videos`` (configuration -> one latent per case), write each one's latents beside it and score them
    with ``evaluate --set student.jsonl --reference teacher.jsonl`` (the ``reference`` configuration is the
    teacher's set); print its comparison table (the scores and the latent MSE to the teacher's video of the same
    case, per configuration)."""
    import csv
    import subprocess

    from PIL import Image

    from videobooth_core.app.tiny import METRIC_CLIP_DIR, write_tiny_metric_models
    from videobooth_core.evaluation.compare import save_latents
    from videobooth_core.video_io import write_frames

    if not (models / METRIC_CLIP_DIR).is_dir():
        write_tiny_metric_models(models)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[str]] = {"teacher": [], "student": []}
    for index, case in enumerate(cases):
        image, mask = folder / f"case{index}.png", folder / f"case{index}_mask.png"
        Image.fromarray(case["image"].numpy()).save(image)
        Image.fromarray(case["mask"].numpy().astype("uint8") * 255).save(mask)
        for name, results in videos.items():
            stem = folder / "videos" / f"case{index}_{name}"
            video = write_frames(pipe.decode(results[index].float()), stem.with_suffix(".gif"), overwrite=True)
            latents = save_latents(stem.with_suffix(".safetensors"), results[index])
            sets["teacher" if name == reference else "student"].append(json.dumps(
                {"id": f"case{index}_{name}", "config": name, "video": str(video), "latents": str(latents),
                 "prompt": case["prompt"], "word": case["subject_word"], "image": str(image), "mask": str(mask),
                 "seed": case["seed"]}))
    for kind, lines in sets.items():
        (folder / f"{kind}.jsonl").write_text("\n".join(lines) + "\n")
    subprocess.run([sys.executable, "-m", "videobooth_core", "evaluate", "--set", str(folder / "student.jsonl"),
                    "--reference", str(folder / "teacher.jsonl"), "--models", str(models),
                    "--out", str(folder / "report")], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    print(f"\nevaluate readout ({folder / 'report'}/compare.md; reference: {reference}; tiny random metric models):")
    print(f"{'configuration':>22} | {'clip_t':>8} | {'clip_i':>8} | {'dino':>8} | {'consistency':>11} | "
          f"{'latent MSE (rel)':>20}")
    with open(folder / "report" / "compare.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            scores = [float(row[k]) for k in ("clip_t", "clip_i", "dino", "consistency")]
            print(f"{row['config']:>22} | " + " | ".join(f"{m:8.3f}" for m in scores[:3]) + f" | {scores[3]:11.4f} | "
                  f"{float(row['latent_mse']):10.4g} ({float(row['latent_rel_mse']):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="work folder (models, dataset, run)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--videos", type=int, default=8, help="training clips")
    parser.add_argument("--cases", type=int, default=6, help="held-out (prompt, image prompt, seed) cases")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=8.0)
    parser.add_argument("--target-ema", type=float, default=0.95)
    parser.add_argument("--distill-cfg", type=float, default=4.0)
    parser.add_argument("--huber-c", type=float, default=0.001)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evaluate", action="store_true", help="also the evaluate readout (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    models = out / "models"
    if not (models / MARKER_FILE).is_file():
        make_tiny(models)
    data = out / f"data_{args.videos}"
    if not data.is_dir():
        make_synthetic(data, videos=args.videos, seed=0)
    tag = f"s{args.train_steps}_r{args.lora_rank}_lr{args.lr:g}_ema{args.target_ema:g}_c{args.huber_c:g}"
    run = out / f"run_{tag}"
    lora = run / "videobooth_lcm_lora.safetensors"
    started = time.perf_counter()
    if not lora.is_file():
        config = TrainConfig(stage="distill", data=str(data), models=str(models), out=str(run),
                             steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, size=args.size,
                             frames=args.frames, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                             target_ema=args.target_ema, distill_cfg=args.distill_cfg, huber_c=args.huber_c,
                             max_grad_norm=args.max_grad_norm, checkpoint_every=10 ** 6, memory_check=False,
                             tensorboard=False, progress=False, log_every=10, cpu=True)
        train_distill(config)
    train_s = time.perf_counter() - started

    cases = held_out_cases(args.cases, args.frames, args.size)
    pipe = VideoBoothPipeline.from_models_dir(str(models))
    common = {"cfg_scale": args.distill_cfg, "guidance": "official"}
    references = [latents(pipe, case, sampler="ddim", steps=REFERENCE_STEPS, **common) for case in cases]
    rows: dict[str, dict[int, float]] = {"teacher_ddim": {}, "teacher_lcm_no_lora": {}, "student_lcm": {}}
    relative: dict[str, dict[int, float]] = {name: {} for name in rows}

    kept: dict[str, list[torch.Tensor]] = {}

    def measure(name: str, steps: int, **settings) -> None:
        errors = []
        for case, reference in zip(cases, references):
            result = latents(pipe, case, steps=steps, **settings)
            kept.setdefault(f"{name}{steps}", []).append(result)
            errors.append(latent_mse(result, reference))  # (MSE, MSE / mean(reference^2)), as `evaluate` reports
        rows[name][steps] = sum(mse for mse, _ in errors) / len(errors)
        relative[name][steps] = sum(rel for _, rel in errors) / len(errors)

    for steps in STEPS:
        measure("teacher_ddim", steps, sampler="ddim", **common)
        measure("teacher_lcm_no_lora", steps, sampler="lcm")
    if args.evaluate:  # the teacher's recommended sampler, before the LoRA is merged
        kept["teacher_dpmpp_2m25"] = [latents(pipe, case, sampler="dpmpp_2m", steps=25, **common) for case in cases]
    for line in pipe.use_sd_models(loras=[(str(lora), 1.0)]):
        print(line)
    for steps in STEPS:
        measure("student_lcm", steps, sampler="lcm")

    if args.evaluate:  # the videos are decoded with the VAE alone, which the LoRA does not touch
        evaluate_readout(pipe, cases, {k: v for k, v in kept.items() if k.startswith(("student", "teacher_dpmpp"))},
                         "teacher_dpmpp_2m25", models, out / f"eval_{tag}")
    print(f"\ntrained {args.train_steps} steps in {train_s:.0f} s ({tag}); {len(cases)} held-out cases; "
          f"reference: teacher DDIM {REFERENCE_STEPS} steps, cfg {args.distill_cfg:g} official")
    print(f"{'steps':>5} | {'teacher DDIM MSE (rel)':>24} | {'teacher lcm, no LoRA (rel)':>27} | "
          f"{'student lcm MSE (rel)':>23} | DDIM/student | no-LoRA/student")
    for steps in STEPS:
        cells = [f"{rows[n][steps]:10.4g} ({relative[n][steps]:.3f})" for n in rows]
        margin = rows["teacher_ddim"][steps] / rows["student_lcm"][steps]
        control = rows["teacher_lcm_no_lora"][steps] / rows["student_lcm"][steps]
        print(f"{steps:>5} | {cells[0]:>24} | {cells[1]:>27} | {cells[2]:>23} | {margin:11.2f}x | {control:14.2f}x")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    result = {"train_steps": args.train_steps, "tag": tag, "train_seconds": round(train_s, 1), "cases": len(cases),
              "mse": rows, "relative_mse": relative,
              "margin_4_steps": rows["teacher_ddim"][4] / rows["student_lcm"][4],
              "margin_4_steps_vs_no_lora": rows["teacher_lcm_no_lora"][4] / rows["student_lcm"][4],
              "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"]}
    (out / f"proof_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
