"""``python -m videobooth_core train``: the parser and the command (registered by ``app/cli.py``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import explain
from ..settings import add_setting_flags
from .config import DISTILL_SETTINGS, TRAIN_SETTINGS, TrainConfig, TrainingError, make_config, read_config_file

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

def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` command to the main parser's sub-parsers: one flag per setting of
    :data:`.config.TRAIN_SETTINGS` (flag, type, choices and help with the default come from there). Every flag
    defaults to None (= the config file's value, else the setting's default)."""
    tr = sub.add_parser("train", help="train the mapper: stage 1 (coarse) or stage 2 (fine), official recipe; "
                                      "or distil a LoRA for --sampler lcm (--stage distill)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EXAMPLES,
                        description="Coarse-to-fine training of the VideoBooth mapper on your dataset. The defaults "
                                    "are the official recipe; every deviation is a flag. Writes OUT/checkpoints/, "
                                    "OUT/metrics.jsonl, OUT/loss.png and OUT/videobooth_mapper.safetensors (the EMA "
                                    "weights; copy it into models/videobooth/ for generate and the ComfyUI loader, "
                                    "which prefer that name).")
    tr.add_argument("--config", help="YAML or TOML file of settings (keys: the flags' names, - or _); flags "
                                     "override it")
    distill = tr.add_argument_group("--stage distill (consistency distillation into a LoRA; README: Distillation)")
    add_setting_flags(tr, TRAIN_SETTINGS, unset=True,
                      group_of=lambda spec: distill if spec.key in DISTILL_SETTINGS else tr)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The checked :class:`TrainConfig` of a parsed ``train`` command line (flags over the ``--config`` file)."""
    file_settings: dict[str, Any] = read_config_file(args.config) if args.config else {}
    overrides = {key: getattr(args, key, None) for key in TRAIN_SETTINGS}
    return make_config(file_settings, overrides, Path(args.config).name if args.config else "the config file")


TRAINING_EXTRA = "pip install -r requirements-train.txt (or pip install .[train])"


def check_inputs(config: TrainConfig) -> None:
    """Everything a run reads or writes, checked cheaply before any model loads (each failure is one line
    naming the flag): the training extra, the output and cache folders (writable, not files), the dataset and
    its entries' files, the --mapper's kind and the --resume file."""
    import importlib.util

    from ..dataset.layout import list_entries
    from ..files import check_output_folder
    from ..loading.inputs import check_weight_input
    from .loop import check_dataset_files
    from .state import check_checkpoint_folder

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
        check_checkpoint_folder(config.resume)


def cmd_train(args: argparse.Namespace) -> int:
    from .loop import train

    config = config_from_args(args)
    check_inputs(config)
    result = train(config)  # the one loop; the config's stage picks what it trains (.loop.stage_of)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per data-parallel process
        print(f"wrote {result} (stage {config.stage}, {config.steps} steps; "
              f"metrics in {config.out}/metrics.jsonl)")
    return 0
