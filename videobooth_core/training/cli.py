"""``python -m videobooth_core train``: the parser and the command (registered by ``app/cli.py``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import explain
from .config import (DISTILL_STAGE, DTYPES, FIELDS, GREY_EXEMPLARS, MIXED_PRECISIONS, TIMESTEP_GRIDS, TrainConfig,
                     TrainingError,
                     make_config,
                     read_config_file)

TRAIN_EXAMPLES = """examples:
  # stage 1 (coarse), then stage 2 (fine) from its result - the official recipe (AdamW 1e-4, clip 0.1, EMA ...)
  python -m videobooth_core train --stage 1 --data my_dataset --models models --out runs/stage1
  python -m videobooth_core train --stage 2 --data my_dataset --models models --out runs/stage2 \\
      --mapper runs/stage1/videobooth_mapper.safetensors

  # encode the clips' frames once (VAE posteriors, shared by both stages): later steps skip the VAE on the clips
  python -m videobooth_core train --stage 1 --data my_dataset --models models --out runs/stage1 --cache runs/cache

  # settings from a file (YAML or TOML, keys = the flags' names), flags override it; continue a stopped run
  python -m videobooth_core train --config stage2.yaml --resume latest

  # data-parallel on 8 GPUs (same command; --batch-size is per GPU), bf16 and gradient checkpointing
  torchrun --nproc_per_node 8 -m videobooth_core train --stage 2 ... --mixed-precision bf16 --gradient-checkpointing
  accelerate launch -m videobooth_core train --stage 2 ...

  # consistency distillation into a LoRA for the lcm sampler (1-8 steps), then generate with it
  python -m videobooth_core train --stage distill --data my_dataset --models models --out runs/lcm
  python -m videobooth_core generate --models models --lora runs/lcm/videobooth_lcm_lora.safetensors \\
      --sampler lcm --steps 4 ...

  # a tiny run on the CPU with the tiny models and a synthetic dataset
  python -m videobooth_core make-tiny --out tiny && python -m videobooth_core dataset synthetic --out synth
  python -m videobooth_core train --stage 1 --data synth --models tiny --out run --steps 20 --size 64 --frames 4
"""

_BOOLEAN_FLAGS = {
    "reinit_projections": ("--keep-mapper-projections", False,
                           "keep the --mapper's projections (fine-tuning) instead of the official copies of the UNet's"),
    "flip": ("--no-flip", False, "no random horizontal flip of the clips (official: flip)"),
    "tf32": ("--no-tf32", False, "no TF32 matmuls on NVIDIA GPUs (official: TF32)"),
    "gradient_checkpointing": ("--gradient-checkpointing", True, "recompute the UNet's blocks in the backward pass "
                                                                 "(less memory; official: off)"),
    "overfit": ("--overfit", True, "repeat the first epoch exactly (a memorisation check, not for real training)"),
    "cpu": ("--cpu", True, "train on the CPU even when a GPU is present"),
    "progress": ("--no-progress", False, "no progress bar"),
    "memory_check": ("--no-memory-check", False, "skip the memory estimate before training"),
    "tensorboard": ("--no-tensorboard", False, "no TensorBoard scalars"),
}


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` command to the main parser's sub-parsers. Every flag defaults to None (= the config
    file's value, else :class:`TrainConfig`'s default, shown in the help)."""
    defaults = TrainConfig(stage=1, data="", models="", out="")
    tr = sub.add_parser("train", help="train the mapper: stage 1 (coarse) or stage 2 (fine), official recipe",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EXAMPLES,
                        description="Coarse-to-fine training of the VideoBooth mapper on your dataset. The defaults "
                                    "are the official recipe; every deviation is a flag. Writes OUT/checkpoints/, "
                                    "OUT/metrics.jsonl, OUT/loss.png and OUT/videobooth_mapper.safetensors (the EMA "
                                    "weights; copy it into models/videobooth/ for generate and the ComfyUI loader, which prefer that name).")
    tr.add_argument("--config", help="YAML or TOML file of settings (keys: the flag names); flags override it")
    tr.add_argument("--stage", type=_stage, choices=(1, 2, DISTILL_STAGE),
                    help="1 (coarse), 2 (fine), or distill (a LoRA for --sampler lcm: 1-8 steps); required")
    tr.add_argument("--data", help="dataset folder (dataset build / dataset synthetic); required")
    tr.add_argument("--models", help="models folder (UNet, VAE, CLIP, tokenizer); required")
    tr.add_argument("--out", help="output folder; required")
    tr.add_argument("--mapper", help="start from this mapper (stage 1: ELITE's global mapper, the official start; "
                                     "stage 2: the stage-1 result, required there)")
    tr.add_argument("--resume", help="'latest' or a checkpoint file: continue a run")
    numbers = (("steps", int), ("batch_size", int), ("grad_accum", int), ("lr", float), ("weight_decay", float),
               ("warmup_steps", int), ("max_grad_norm", float), ("reg_weight", float), ("cond_dropout", float),
               ("reg_text_weight", float), ("ema_decay", float), ("seed", int), ("frames", int), ("size", int),
               ("window", int),
               ("checkpoint_every", int), ("keep_checkpoints", int), ("log_every", int), ("num_workers", int),
               ("validate_every", int), ("validation_clips", int), ("validation_steps", int))
    for name, kind in numbers:
        default = getattr(defaults, name)
        shown = "0 in stage 1, 0.1 in stage 2" if name == "cond_dropout" else default
        tr.add_argument("--" + name.replace("_", "-"), type=kind, help=f"(default: {shown})")
    tr.add_argument("--timestep-grid", type=int, choices=TIMESTEP_GRIDS, help="(default: 250, official)")
    tr.add_argument("--grey-exemplar", choices=GREY_EXEMPLARS, help="stage 2's dropped clips: one VAE sample of the "
                                                                     "grey exemplar per step (default: shared, "
                                                                     "official) or one each")
    tr.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, help="(default: no = fp32, official)")
    tr.add_argument("--dtype", choices=DTYPES, help="(default: float32, official; float64 = a checking precision "
                                                    "for exactness tests, not for training)")
    tr.add_argument("--cache", help="folder of cached encoder outputs (VAE posteriors of every frame, token ids), "
                                    "built on first use and shared by runs: later steps skip the VAE on the clips; "
                                    "the loss is unchanged (the image prompt's random augmentations stay live)")
    for name, (flag, value, text) in _BOOLEAN_FLAGS.items():
        tr.add_argument(flag, dest=name, action="store_const", const=value, default=None, help=text)
    distill = tr.add_argument_group("--stage distill (consistency distillation into a LoRA; README: Distillation)")
    for name, kind, text in (
            ("lora_rank", int, "the LoRA's rank"), ("lora_alpha", float, "the LoRA's alpha (scale alpha / rank)"),
            ("distill_cfg", float, "the teacher's guidance scale, official rule"),
            ("distill_skip", int, "points of the 250-step training grid per solver step (5: 50 solver points)"),
            ("huber_c", float, "c of the pseudo-Huber loss"),
            ("target_ema", float, "EMA decay of the target LoRA; 0: none, the student is its own target")):
        distill.add_argument("--" + name.replace("_", "-"), type=kind,
                             help=f"{text} (default: {getattr(defaults, name)})")
    distill.add_argument("--lora-targets", nargs="+", help="module-path endings of the LoRA's layers (default: every "
                                                           "attention projection and the feed-forward layers)")


def _stage(value: str) -> int | str:
    """``--stage``: 1 and 2 as numbers, ``distill`` as itself (argparse checks the choices)."""
    return int(value) if value in ("1", "2") else value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The checked :class:`TrainConfig` of a parsed ``train`` command line."""
    file_settings: dict[str, Any] = read_config_file(args.config) if args.config else {}
    overrides = {name: getattr(args, name, None) for name in FIELDS}
    return make_config(file_settings, overrides)


TRAINING_EXTRA = "pip install -r requirements-train.txt (or pip install .[train])"


def check_inputs(config: TrainConfig) -> None:
    """Everything a run reads or writes, checked cheaply before any model loads (each failure is one line
    naming the flag): the training extra, the output and cache folders (writable, not files), the dataset and
    its entries' files, the --mapper's kind and the --resume file."""
    import importlib.util

    from ..dataset.layout import list_entries
    from ..files import check_output_folder
    from ..loading.inputs import check_training_checkpoint, check_weight_input
    from .loop import check_dataset_files

    if importlib.util.find_spec("accelerate") is None:
        raise TrainingError(explain("train needs the training extra; not installed", "accelerate", TRAINING_EXTRA))
    check_output_folder(config.out)
    if config.cache is not None:
        check_output_folder(config.cache, "--cache")
    if not list_entries(config.data):
        raise TrainingError(explain("the dataset has no entries", config.data,
                                    "build it with `dataset build` (or `dataset synthetic`), then check it"))
    check_dataset_files(config)  # every entry's files (no decoding): a broken entry fails before the models load
    if config.mapper is not None:
        check_weight_input(config.mapper, "--mapper", "starting_mapper")  # a VideoBooth or ELITE mapper
    if config.resume is not None and config.resume != "latest":
        check_training_checkpoint(config.resume)


def cmd_train(args: argparse.Namespace) -> int:
    from .loop import train

    config = config_from_args(args)
    check_inputs(config)
    if config.stage == DISTILL_STAGE:
        from .distill_loop import train_distill

        result = train_distill(config)
    else:
        result = train(config)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per data-parallel process
        print(f"wrote {result} (stage {config.stage}, {config.steps} steps; "
              f"metrics in {config.out}/metrics.jsonl)")
    return 0
