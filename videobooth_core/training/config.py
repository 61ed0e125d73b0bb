"""The training settings: :class:`TrainConfig`, whose defaults are the official recipe (reference §7).

Every deviation from the official recipe is a named field; :data:`OFFICIAL` lists which fields hold an official
value by default. A config file (YAML or TOML, keys = field names, ``-`` or ``_``) sets fields; command-line
flags override the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrainingError, explain


MIXED_PRECISIONS = ("no", "bf16", "fp16")
DTYPES = ("float32", "float64")
GREY_EXEMPLARS = ("shared", "per-clip")
TIMESTEP_GRIDS = (250, 1000)
DISTILL_STAGE = "distill"
"""The consistency-distillation stage (:mod:`.distill_loop`): a LoRA for the ``lcm`` sampler."""
STAGES = (1, 2, DISTILL_STAGE)
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "attn_temp.to_q", "attn_temp.to_k", "attn_temp.to_v", "attn_temp.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
"""The distillation LoRA's layers (module-path endings): every attention projection (spatial, text, temporal; K/V
through the mapper's projections, which VideoBooth attends with) and the transformer blocks' feed-forward layers."""


@dataclass
class TrainConfig:
    """One training run. Fields marked *official* default to the released recipe (reference §7.1-7.4)."""

    stage: int | str
    """1 (coarse: mapper MLPs + attn2 K/V), 2 (fine: every mapper parameter, with the image-prompt branch) or
    ``"distill"`` (consistency distillation of the whole model into a LoRA, :mod:`.distill_loop`)."""
    data: str
    """A dataset folder in our layout (``dataset build`` / ``dataset synthetic``)."""
    models: str
    """Models folder (UNet, VAE, CLIP towers, tokenizer), laid out as for ``generate --models``."""
    out: str
    """Output folder: checkpoints/, metrics.jsonl, loss.png, videobooth_mapper.safetensors."""
    mapper: str | None = None
    """Start from this mapper (stage 2: the stage-1 result; or the released mapper.pt to fine-tune). Stage 1 starts
    officially from ELITE's global mapper (its ``train_global.py`` layout: MLPs with attn2 to_k/to_v per site, or
    the MLPs only; the K/V are re-copied from the UNet unless ``reinit_projections`` is off); without it, from
    freshly initialised MLPs. The kind is read from the file's keys."""
    reinit_projections: bool = True
    """*official*: stage 1 copies the UNet's attn2 (and attn1) to_k/to_v into the mapper's projections, stage 2
    its attn1 to_k/to_v into the ``_new``/``_exemplar`` ones. False keeps the given mapper's (fine-tuning)."""
    steps: int = 10_000
    """Optimizer steps (the official scripts run until stopped)."""
    batch_size: int = 2
    """*official*: clips per device per micro-batch (2 per GPU, 8 GPUs: global batch 16)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (*official* 1)."""
    lr: float = 1e-4
    """*official* AdamW learning rate."""
    weight_decay: float = 0.0
    """*official* (none)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up (*official* 0: constant)."""
    max_grad_norm: float = 0.1
    """*official* gradient clipping (0 turns it off)."""
    reg_weight: float = 0.01
    """*official*: weight of mean|injected word vectors| in the loss."""
    reg_text_weight: float = 0.0
    """*official* 0 (the README's commands; the scripts' own default is 0.01): weight of mean|text states - the
    caption's plain states| in the loss (the official ``--reg-text-weight``: keeps the spliced states near the
    caption's own)."""
    grey_exemplar: str = "shared"
    """Stage 2's dropped clips: ``shared`` (*official*: one VAE sample of the mid-grey exemplar per step, shared by
    every dropped clip of the step; drawn from (seed, step), so the number of GPUs does not change it) or
    ``per-clip`` (each dropped clip its own sample, from its own generator)."""
    cond_dropout: float | None = None
    """Condition dropout probability; None = *official* per stage (0 in stage 1, 0.1 in stage 2)."""
    timestep_grid: int = 250
    """*official* 250: timesteps drawn from the 250-step respaced grid (the official scripts' quirk); 1000: all."""
    ema_decay: float = 0.9999
    """*official* (DiT's update_ema default; the EMA starts as a copy)."""
    seed: int = 3407
    """*official* base seed (all randomness derives from it and the sample number, so runs are reproducible)."""
    frames: int = 16
    """*official* frames per clip."""
    size: int = 256
    """*official* frame size in pixels (multiple of 8)."""
    window: int = 64
    """*official* frame window the clip's frames are spread over."""
    flip: bool = True
    """*official* random horizontal flip of the clip."""
    mixed_precision: str = "no"
    """``no`` (*official* fp32), ``bf16`` or ``fp16`` autocast through accelerate."""
    tf32: bool = True
    """*official* TF32 matmuls on NVIDIA GPUs."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's blocks in the backward pass (less memory, ~30 % slower; *official* off)."""
    dtype: str = "float32"
    """Weights and arithmetic: ``float32`` (*official*) or ``float64``, a *checking* precision (about 2x slower on
    the CPU, unsupported on most GPUs' fast paths) in which kernel rounding no longer hides behind the tiny test
    models' ill-conditioned backward pass; for exactness tests, never for real training."""
    cache: str | None = None
    """A folder of cached encoder outputs (built on first use, shared by runs and stages): the VAE posterior
    parameters of every frame of every clip (both flips) and of the mid-grey exemplar, and the token ids, so later
    steps decode only frame 0 and skip the VAE on the clip. The image prompt's augmentations are random per step
    (official), so its CLIP features and VAE latent stay live. The loss equals the uncached one (the posterior is
    still sampled per step from the same generator)."""
    memory_check: bool = True
    """Estimate the training peak (weights, optimizer state, EMA, a dry run of the step on storage-free twins)
    before training and stop when the device has less free memory."""
    checkpoint_every: int = 1000
    """*official* checkpoint interval in steps."""
    keep_checkpoints: int = 3
    """Checkpoints kept in OUT/checkpoints (older ones are deleted; 0 keeps all)."""
    log_every: int = 10
    """Steps between metrics.jsonl / TensorBoard records."""
    validate_every: int = 0
    """Every N steps (and at the end), fixed-seed validation videos with the EMA mapper (0: off)."""
    validation_clips: int = 2
    """Validation videos per round: the prompts, words and first frames of the dataset's first entries."""
    validation_steps: int = 25
    """Sampling steps of the validation videos (the official respaced DDPM with fewer steps)."""
    num_workers: int = 0
    """DataLoader worker processes reading clips."""
    overfit: bool = False
    """Every epoch repeats the first one exactly (same augmentations, timesteps, noise, dropout): a check that the
    model can memorise a few clips. Never for real training."""
    lora_rank: int = 64
    """Distillation: the LoRA's rank (LCM-LoRA's 64)."""
    lora_alpha: float = 64.0
    """Distillation: the LoRA's alpha (its update is scaled by alpha / rank)."""
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Distillation: the UNet layers the LoRA trains, as module-path endings (:data:`DEFAULT_LORA_TARGETS`)."""
    distill_cfg: float = 4.0
    """Distillation: the teacher's guidance scale (the official rule; 4 is the released model's setting)."""
    distill_skip: int = 5
    """Distillation: points of the 250-step training grid per DDIM solver step (5: a 50-point skipping grid)."""
    huber_c: float = 0.001
    """Distillation: ``c`` of the pseudo-Huber loss (LCM's 0.001)."""
    target_ema: float = 0.95
    """Distillation: EMA decay of the target LoRA (LCM's 0.95); 0: no EMA, the student's own weights are the target."""
    resume: str | None = None

    """``latest`` (newest checkpoint in OUT/checkpoints) or a checkpoint file."""
    cpu: bool = False
    """Train on the CPU even when a GPU is present."""
    progress: bool = True
    """Draw a progress bar."""
    tensorboard: bool = True
    """Write TensorBoard scalars to OUT/tensorboard when the tensorboard package is installed."""

    @property
    def dropout(self) -> float:
        """The condition dropout probability in effect."""
        if self.cond_dropout is not None:
            return float(self.cond_dropout)
        return 0.1 if self.stage == 2 else 0.0

    def check(self) -> None:
        """Raise :class:`TrainingError` naming the first bad value and the fix."""
        if self.stage not in STAGES or isinstance(self.stage, bool):
            raise TrainingError(explain("the training stage must be 1 (coarse), 2 (fine) or distill", self.stage,
                                        "pass --stage 1 first, then --stage 2 --mapper OUT1/videobooth_mapper.safetensors"))
        if self.stage == DISTILL_STAGE:
            self._check_distill()
        for name in ("lr", "weight_decay", "max_grad_norm", "reg_weight", "cond_dropout", "ema_decay"):
            value = getattr(self, name)  # NaN passes every comparison below: named here instead
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise TrainingError(explain(f"{name} must be a finite number", value,
                                            f"set --{name.replace('_', '-')} to a number (the default is "
                                            f"{FIELDS[name].default})"))
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "frames": self.frames, "window": self.window, "checkpoint_every": self.checkpoint_every,
                    "log_every": self.log_every, "validation_steps": self.validation_steps}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise TrainingError(explain(f"{name} must be a whole number of at least 1", value,
                                            f"set --{name.replace('_', '-')} to 1 or more"))
        for name in ("warmup_steps", "keep_checkpoints", "num_workers", "validate_every", "validation_clips"):
            if getattr(self, name) < 0:
                raise TrainingError(explain(f"{name} must not be negative", getattr(self, name), "use 0 or more"))
        if self.size < 8 or self.size % 8:
            raise TrainingError(explain("the frame size must be a positive multiple of 8", self.size,
                                        "use --size 256 (official) or another multiple of 8"))
        if not 0.0 <= self.dropout <= 1.0:
            raise TrainingError(explain("the condition dropout must be in [0, 1]", self.dropout, "use 0.1 (official)"))
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainingError(explain("the EMA decay must be in [0, 1)", self.ema_decay, "use 0.9999 (official)"))
        if self.reg_text_weight < 0:
            raise TrainingError(explain("reg_text_weight must not be negative", self.reg_text_weight,
                                        "use 0 (official README) or the scripts' 0.01"))
        if self.grey_exemplar not in GREY_EXEMPLARS:
            raise TrainingError(explain("unknown grey_exemplar", self.grey_exemplar,
                                        f"choose one of {', '.join(GREY_EXEMPLARS)} (official: shared)"))
        if self.lr <= 0 or self.max_grad_norm < 0 or self.reg_weight < 0 or self.weight_decay < 0:
            raise TrainingError(explain("lr must be positive; max_grad_norm, reg_weight and weight_decay not negative",
                                        (self.lr, self.max_grad_norm, self.reg_weight, self.weight_decay),
                                        "use the official 1e-4, 0.1, 0.01 and 0"))
        if self.timestep_grid not in TIMESTEP_GRIDS:
            raise TrainingError(explain("timestep_grid must be 250 (official) or 1000", self.timestep_grid,
                                        "use --timestep-grid 250"))
        if self.dtype not in DTYPES:
            raise TrainingError(explain("unknown training dtype", self.dtype,
                                        "use float32 (official); float64 only to check exactness"))
        if self.dtype == "float64" and self.mixed_precision != "no":
            raise TrainingError(explain("float64 is a checking precision; it cannot be mixed with",
                                        self.mixed_precision, "use --mixed-precision no with --dtype float64"))
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise TrainingError(explain("unknown mixed precision", self.mixed_precision,
                                        f"choose one of {', '.join(MIXED_PRECISIONS)}"))
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

    def _check_distill(self) -> None:
        """The distillation settings (one line naming the value and the fix)."""
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise TrainingError(explain("lora_rank must be a whole number of at least 1", self.lora_rank,
                                        "use --lora-rank 64 (LCM-LoRA's) or smaller for a smaller file"))
        for name, low, fix in (("lora_alpha", 0.0, "use --lora-alpha equal to the rank (scale 1)"),
                               ("distill_cfg", 1.0, "use --distill-cfg 4 (the official guidance scale)"),
                               ("huber_c", 0.0, "use --huber-c 0.001 (LCM's)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (name == "lora_alpha" and value == 0):
                raise TrainingError(explain(f"{name} must be a finite number of at least {low:g}"
                                            + (" (not 0)" if name == "lora_alpha" else ""), value, fix))
        if isinstance(self.distill_skip, bool) or not isinstance(self.distill_skip, int) \
                or not 1 <= self.distill_skip <= 250:
            raise TrainingError(explain("distill_skip must be a whole number from 1 to 250", self.distill_skip,
                                        "use --distill-skip 5 (a 50-point solver grid on the 250-step training grid)"))
        if isinstance(self.target_ema, bool) or not isinstance(self.target_ema, (int, float)) \
                or not 0.0 <= self.target_ema < 1.0:
            raise TrainingError(explain("target_ema must be in [0, 1)", self.target_ema,
                                        "use --target-ema 0.95 (LCM's), or 0 for no EMA target"))
        if isinstance(self.lora_targets, str) or not self.lora_targets or \
                not all(isinstance(t, str) and t for t in self.lora_targets):
            raise TrainingError(explain("lora_targets must be a list of module-path endings", self.lora_targets,
                                        "e.g. --lora-targets attn1.to_q attn1.to_k attn1.to_v"))
        self.lora_targets = tuple(self.lora_targets)


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
        if name not in FIELDS:
            import difflib

            close = difflib.get_close_matches(name, list(FIELDS), n=1)
            raise TrainingError(explain(f"unknown setting in {path.name}", key,
                                        f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(FIELDS)}"))
        settings[name] = value
    return settings


def make_config(file_settings: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """A checked :class:`TrainConfig` from a config file's settings overridden by flags (None = not given)."""
    merged = dict(file_settings)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    missing = [name for name in ("stage", "data", "models", "out") if merged.get(name) is None]
    if missing:
        raise TrainingError(explain("missing required setting", missing[0],
                                    f"pass --{missing[0]} (or set it in the --config file)"))
    try:
        config = TrainConfig(**merged)
    except TypeError as error:
        raise TrainingError(explain("bad settings", str(error), "check the config file")) from None
    config.check()
    return config
