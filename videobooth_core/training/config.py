"""The training settings: :class:`TrainConfig`, whose defaults are the official recipe (reference §7), described
by the same :class:`~videobooth_core.settings.Setting` table mechanism as generation's settings.

Every field carries its :class:`Setting` (kind, default, range or choices, help, flag), and :data:`TRAIN_SETTINGS`
collects them: the ``train`` command's flags, the config file's keys and the checks all come from it. Every
deviation from the official recipe is a named field; :data:`OFFICIAL` lists which fields hold an official value by
default. A config file (YAML or TOML, keys = field names, ``-`` or ``_``) sets fields; command-line flags override
the file; a bad value is named as the flag or the file's key that gave it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrainingError, explain
from ..settings import MAX_SEED, REQUIRED, Setting, settings_table
from ..settings import setting_field as _setting

MIXED_PRECISIONS = ("no", "bf16", "fp16")
DTYPES = ("float32", "float64")
GREY_EXEMPLARS = ("shared", "per-clip")
TIMESTEP_GRIDS = (250, 1000)
DISTILL_STAGE = "distill"
"""The consistency-distillation stage (:mod:`.distill_loop`): a LoRA for the ``lcm`` sampler."""
STAGES = (1, 2, DISTILL_STAGE)
DISTILL_SETTINGS = ("lora_rank", "lora_alpha", "lora_targets", "distill_cfg", "distill_skip", "huber_c", "target_ema")
"""The settings only ``--stage distill`` reads (their own group in ``train --help``)."""
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "attn_temp.to_q", "attn_temp.to_k", "attn_temp.to_v", "attn_temp.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
"""The distillation LoRA's layers (module-path endings): every attention projection (spatial, text, temporal; K/V
through the mapper's projections, which VideoBooth attends with) and the transformer blocks' feed-forward layers."""


def parse_stage(value: str) -> int | str:
    """``--stage``: 1 and 2 as numbers, ``distill`` as itself (argparse then checks the choices)."""
    return int(value) if value in ("1", "2") else value


@dataclass
class TrainConfig:
    """One training run. Settings marked *official* default to the released recipe (reference §7.1-7.4); each
    field's help is its :class:`~videobooth_core.settings.Setting` (``TRAIN_SETTINGS[name].help``)."""

    stage: int | str = _setting(
        "choice", REQUIRED, "1 (coarse: the mapper's MLPs and attn2 K/V), 2 (fine: every mapper weight, with the "
        "image-prompt branch) or distill (consistency distillation into a LoRA for --sampler lcm: 1-8 steps)",
        choices=STAGES, parse=parse_stage)
    data: str = _setting("str", REQUIRED, "dataset folder in our layout (dataset build / dataset synthetic)")
    models: str = _setting("str", REQUIRED, "models folder (UNet, VAE, CLIP towers, tokenizer), laid out as for "
                           "generate --models")
    out: str = _setting("str", REQUIRED, "output folder: checkpoints/, metrics.jsonl, loss.png, "
                        "videobooth_mapper.safetensors")
    mapper: str | None = _setting(
        "str", None, "start from this mapper (stage 1: ELITE's global mapper, the official start, or the MLPs "
        "only; stage 2: the stage-1 result, required there; or the released mapper.pt to fine-tune); its kind is "
        "read from its keys", shown_default="none: stage 1 from freshly initialised MLPs")
    reinit_projections: bool = _setting(
        "bool", True, "keep the --mapper's projections (fine-tuning) instead of the official copies of the UNet's "
        "(stage 1: its attn2 and attn1 to_k/to_v; stage 2: its attn1 ones into the _new/_exemplar projections)",
        flag="--keep-mapper-projections", shown_default="the UNet's copies, official")
    steps: int = _setting("int", 10_000, "optimizer steps (the official scripts run until stopped)", minimum=1)
    batch_size: int = _setting("int", 2, "*official* clips per device per micro-batch (2 per GPU, 8 GPUs: global "
                               "batch 16)", minimum=1)
    grad_accum: int = _setting("int", 1, "micro-batches per optimizer step (*official* 1)", minimum=1)
    lr: float = _setting("float", 1e-4, "*official* AdamW learning rate", above=0.0)
    weight_decay: float = _setting("float", 0.0, "AdamW weight decay (*official*: none)", minimum=0.0)
    warmup_steps: int = _setting("int", 0, "linear learning-rate warm-up (*official* 0: constant)", minimum=0)
    max_grad_norm: float = _setting("float", 0.1, "*official* gradient clipping (0 turns it off)", minimum=0.0)
    reg_weight: float = _setting("float", 0.01, "*official* weight of mean|injected word vectors| in the loss",
                                 minimum=0.0)
    cond_dropout: float | None = _setting(
        "float", None, "condition dropout probability (*official* per stage)", minimum=0.0, maximum=1.0,
        shown_default="0 in stage 1, 0.1 in stage 2")
    reg_text_weight: float = _setting(
        "float", 0.0, "weight of mean|text states - the caption's plain states| in the loss (the official "
        "--reg-text-weight, on the states after the dropout; *official* 0 as the README's commands, the scripts' "
        "own default is 0.01)", minimum=0.0)
    ema_decay: float = _setting("float", 0.9999, "*official* EMA decay (DiT's update_ema; the EMA starts as a copy)",
                                minimum=0.0, below=1.0)
    seed: int = _setting("int", 3407, "*official* base seed (all randomness derives from it and the sample number, "
                         "so runs are reproducible)", minimum=0, maximum=MAX_SEED)
    frames: int = _setting("int", 16, "*official* frames per clip", minimum=1)
    size: int = _setting("int", 256, "*official* frame size in pixels, a multiple of 8", multiple_of=8)
    window: int = _setting("int", 64, "*official* frame window the clip's frames are spread over", minimum=1)
    checkpoint_every: int = _setting("int", 1000, "*official* checkpoint interval in steps", minimum=1)
    keep_checkpoints: int = _setting("int", 3, "checkpoints kept in OUT/checkpoints (older ones are deleted; 0 keeps "
                                     "all)", minimum=0)
    log_every: int = _setting("int", 10, "steps between metrics.jsonl / TensorBoard records", minimum=1)
    num_workers: int = _setting("int", 0, "DataLoader worker processes reading clips", minimum=0)
    validate_every: int = _setting("int", 0, "every N steps (and at the end), fixed-seed validation videos with the "
                                   "EMA mapper (0: off)", minimum=0)
    validation_clips: int = _setting("int", 2, "validation videos per round: the prompts, words and first frames of "
                                     "the dataset's first entries", minimum=0)
    validation_steps: int = _setting("int", 25, "sampling steps of the validation videos (the official respaced "
                                     "DDPM with fewer steps)", minimum=1)
    timestep_grid: int = _setting("int", 250, "timesteps drawn from the 250-step respaced grid (*official*, the "
                                  "official scripts' quirk) or from all 1000", choices=TIMESTEP_GRIDS)
    grey_exemplar: str = _setting(
        "str", "shared", "stage 2's dropped clips: one VAE sample of the mid-grey exemplar per step, shared by "
        "every dropped clip of the step (*official*; drawn from (seed, step), so the number of GPUs does not "
        "change it) or one per clip", choices=GREY_EXEMPLARS)
    mixed_precision: str = _setting("str", "no", "no (*official* fp32), bf16 or fp16 autocast through accelerate",
                                    choices=MIXED_PRECISIONS)
    dtype: str = _setting(
        "str", "float32", "weights and arithmetic: float32 (*official*) or float64, a checking precision for "
        "exactness tests (kernel rounding no longer hides behind the tiny test models' ill-conditioned backward "
        "pass), never for training", choices=DTYPES)
    cache: str | None = _setting(
        "str", None, "folder of cached encoder outputs (VAE posteriors of every frame, token ids), built on first "
        "use and shared by runs: later steps skip the VAE on the clips; the loss is unchanged (the image prompt's "
        "random augmentations stay live)", shown_default="none")
    flip: bool = _setting("bool", True, "no random horizontal flip of the clips", shown_default="flip, official")
    tf32: bool = _setting("bool", True, "no TF32 matmuls on NVIDIA GPUs", shown_default="TF32, official")
    gradient_checkpointing: bool = _setting("bool", False, "recompute the UNet's blocks in the backward pass (less "
                                            "memory, slower)", shown_default="off, official")
    overfit: bool = _setting("bool", False, "repeat the first epoch exactly (same augmentations, timesteps, noise, "
                             "dropout): a memorisation check, not for real training")
    cpu: bool = _setting("bool", False, "train on the CPU even when a GPU is present")
    progress: bool = _setting("bool", True, "no progress bar")
    memory_check: bool = _setting("bool", True, "skip the memory estimate before training (weights, optimizer state, "
                                  "EMA and a dry run of the step against the device's free memory)")
    tensorboard: bool = _setting("bool", True, "no TensorBoard scalars in OUT/tensorboard (written when tensorboard "
                                 "is installed)")
    lora_rank: int = _setting("int", 64, "the LoRA's rank (LCM-LoRA's 64)", minimum=1)
    lora_alpha: float = _setting("float", 64.0, "the LoRA's alpha (its update is scaled by alpha / "
                                 "rank)", above=0.0)
    lora_targets: tuple[str, ...] = _setting(
        "strs", DEFAULT_LORA_TARGETS, "module-path endings of the UNet layers the LoRA trains",
        shown_default="every attention projection and the feed-forward layers")
    distill_cfg: float = _setting("float", 4.0, "the teacher's guidance scale (the official rule; 4 "
                                  "is the released model's setting)", minimum=1.0)
    distill_skip: int = _setting("int", 5, "points of the 250-step training grid per DDIM solver "
                                 "step (5: a 50-point skipping grid)", minimum=1, maximum=250)
    huber_c: float = _setting("float", 0.001, "c of the pseudo-Huber loss (LCM's 0.001)", minimum=0.0)
    target_ema: float = _setting("float", 0.95, "EMA decay of the target LoRA (LCM's 0.95); 0: no "
                                 "EMA, the student's own weights are the target", minimum=0.0, below=1.0)
    resume: str | None = _setting("str", None, "'latest' (the newest checkpoint in OUT/checkpoints) or a checkpoint "
                                  "folder: continue a run", shown_default="none")

    @property
    def dropout(self) -> float:
        """The condition dropout probability in effect."""
        if self.cond_dropout is not None:
            return float(self.cond_dropout)
        return 0.1 if self.stage == 2 else 0.0

    def check(self) -> None:
        """Raise :class:`TrainingError` naming the first bad value and the fix: every setting's type, range and
        choice (:data:`TRAIN_SETTINGS`), then the rules between settings and the folders."""
        for spec in TRAIN_SETTINGS.values():
            spec.check(getattr(self, spec.name))
        self.lora_targets = tuple(self.lora_targets)  # a config file's list, kept as the hashable default's type
        if self.dtype == "float64" and self.mixed_precision != "no":
            raise TrainingError(explain("float64 is a checking precision; it cannot be mixed with",
                                        self.mixed_precision, "use --mixed-precision no with --dtype float64"))
        if self.stage == 2 and self.mapper is None:
            raise TrainingError(explain("stage 2 starts from a trained mapper; --mapper is", None,
                                        "pass --mapper OUT1/videobooth_mapper.safetensors (the stage-1 result) or the "
                                        "released mapper.pt"))
        for name in ("data", "models"):
            if not Path(getattr(self, name)).is_dir():
                raise TrainingError(explain(f"the --{name} folder does not exist", getattr(self, name),
                                            "give an existing folder" + (" (`dataset synthetic --out DIR` writes a tiny "
                                                                         "one)" if name == "data" else "")))
        if self.mapper is not None and not Path(self.mapper).is_file():
            raise TrainingError(explain("the --mapper file does not exist", self.mapper, "give a mapper .safetensors/.pt"))


TRAIN_SETTINGS: dict[str, Setting] = settings_table(("train", TrainConfig), error=TrainingError)
"""Every training setting by its config-file key (also the command line's ``dest``), in help order."""
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
OFFICIAL = ("reinit_projections", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "max_grad_norm",
            "reg_weight", "reg_text_weight", "grey_exemplar", "cond_dropout", "timestep_grid", "ema_decay", "seed",
            "frames", "size", "window", "flip", "mixed_precision", "dtype", "tf32", "gradient_checkpointing", "checkpoint_every")
"""Fields whose defaults are the official recipe's values (the README's table)."""


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file, keys normalised to field names.

    Raises:
        TrainingError: unreadable file, unknown format, or an unknown key (naming the closest field).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TrainingError(explain("cannot read the config file", str(path), f"check the path ({error.strerror})")) from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise TrainingError(explain("the TOML config file is not valid", str(path), f"fix it: {error}")) from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise TrainingError(explain("YAML config files need PyYAML; the file is", str(path),
                                        "pip install pyyaml (or .[train]), or write the settings as TOML")) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise TrainingError(explain("the YAML config file is not valid", str(path), f"fix it: {error}")) from None
    else:
        raise TrainingError(explain("the config file must be YAML or TOML", path.name, "name it .yaml, .yml or .toml"))
    if not isinstance(data, dict):
        raise TrainingError(explain("the config file must hold a mapping of settings", type(data).__name__,
                                    "write one `name: value` per line"))
    settings = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in TRAIN_SETTINGS:
            import difflib

            close = difflib.get_close_matches(name, list(TRAIN_SETTINGS), n=1)
            raise TrainingError(explain(f"unknown setting in {path.name}", key, f"did you mean {close[0]!r}?" if close
                                        else f"use one of {', '.join(TRAIN_SETTINGS)}"))
        settings[name] = value
    return settings


def make_config(file_settings: dict[str, Any], overrides: dict[str, Any], file_name: str = "the config file") -> TrainConfig:
    """A checked :class:`TrainConfig` from a config file's settings overridden by flags (None = not given). A bad
    value is named as what gave it: the flag (``--lr``) or the file's key (``lr in stage.yaml``)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = {**file_settings, **given}
    for key, value in merged.items():
        spec = TRAIN_SETTINGS[key]
        spec.check(value, spec.flag if key in given else f"{key} in {file_name}")
    missing = [spec for spec in TRAIN_SETTINGS.values() if spec.required and merged.get(spec.key) is None]
    if missing:
        raise TrainingError(explain("missing required setting", missing[0].key,
                                    f"pass {missing[0].flag} (or set it in the --config file)"))
    config = TrainConfig(**merged)
    config.check()
    return config
