"""``train --stage distill``: latent consistency distillation of VideoBooth into a LoRA for the ``lcm`` sampler.

The loss is :mod:`.distill`'s, plugged into the one training loop (:func:`.loop.train`) as a :class:`.loop.Stage`:
everything around it is the stage-1/2 trainer's, reused, not copied: the dataset reader and its seeded numbering
(a step sees the same clips whatever the number of ranks), the frozen encoders' batches (:class:`.model.BatchMaker`,
as stage 2 makes them: the clean latent and the image prompt's latent), the encoder cache, accelerate (one CPU, one
GPU or data-parallel), the metrics (``Accelerator.log``: metrics.jsonl, TensorBoard, loss.png), checkpoints with
exact resume (:mod:`.state`: ``accelerate``'s save_state/load_state; every random draw is a function of (seed,
sample number); the LoRA, optimizer, RNG states, EMA target and schedule are saved), and SIGTERM / Ctrl-C
checkpoints.

The teacher is the frozen VideoBooth of ``--models`` with its trained mapper (``--mapper``, else the models
folder's); the student is the same UNet with a LoRA (:mod:`.lora_train`); the result,
``OUT/videobooth_lcm_lora.safetensors``, is a kohya-format LoRA that ``generate --lora`` and the LoRA nodes load.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import explain
from ..models.mapper import Mapper
from .config import DISTILL_STAGE, TrainConfig, TrainingError
from .distill import DISTILL_PURPOSE, DistillLoss, draw
from .lora_train import LoraHooks, LoraLayers, save_kohya
from .loop import Stage, StepHook, load_training_models, train
from .model import TrainBatch, compute_dtype, sample_seed, spliced_text

logger = logging.getLogger(__name__)

RESULT_NAME = "videobooth_lcm_lora.safetensors"
VALIDATION_STEPS = (1, 2, 4, 8)
"""The lcm sampler's step counts of the validation videos."""


def batch_config(config: TrainConfig) -> TrainConfig:
    """The settings the stage's batches and models are made with: stage 2's (the image prompt's latent), no
    condition dropout (the teacher's guidance makes its own unconditional pass), the trained mapper kept as it is
    (``--mapper``, else the models folder's)."""
    mapper = config.mapper
    if mapper is None:
        from ..loading.models_dir import ModelFiles

        mapper = str(ModelFiles.from_models_dir(config.models).mapper)
    return dataclasses.replace(config, stage=2, cond_dropout=0.0, reinit_projections=False, mapper=mapper)


def load_distill_models(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The frozen VideoBooth (UNet with the trained mapper's projections attached, VAE, CLIP towers, tokenizer),
    loaded by the trainer's own :func:`.loop.load_training_models`."""
    models = load_training_models(batch_config(config), device)
    models["mapper"].eval().requires_grad_(False)
    return models


class DistillModule(nn.Module):
    """The LoRA (registered: the only parameters data parallelism sees) and the loss over a micro-batch."""

    def __init__(self, layers: LoraLayers, loss: DistillLoss, mapper: Mapper, text_encoder: Any, seed: int) -> None:
        super().__init__()
        self.layers = layers
        self._frozen = (loss, mapper, text_encoder)  # outside the module tree: never wrapped or saved
        self.seed = seed

    def forward(self, batch: TrainBatch, numbers: list[int]) -> torch.Tensor:
        """The mean of the clips' losses (:class:`.distill.DistillLoss`), each with its own seeded draws."""
        loss_fn, mapper, text_encoder = self._frozen
        with torch.no_grad():  # the coarse embedding: the frozen mapper's words spliced into the caption
            param = next(mapper.parameters())
            injected = mapper([f.to(param.device, param.dtype) for f in batch.clip_features])
            states = spliced_text(text_encoder, batch.input_ids, batch.placeholder_ids, injected).last_hidden_state
        losses = []
        for row, number in enumerate(numbers):
            clean = batch.clean[row:row + 1]
            generator = torch.Generator().manual_seed(sample_seed(self.seed, number, DISTILL_PURPOSE))
            drawn = draw(generator, tuple(clean.shape), loss_fn.pairs)
            exemplar = None if batch.exemplar_clean is None else batch.exemplar_clean[row:row + 1]
            losses.append(loss_fn(clean, exemplar, states[row:row + 1], batch.null_states[row:row + 1], drawn))
        return torch.stack(losses).mean()


def write_lcm_validation(config: TrainConfig, models: dict[str, Any], dataset: Any, step: int) -> list[Path]:
    """OUT/validation/step_XXXXXXXX_<entry>_lcm<N>.gif: the first ``validation_clips`` entries' captions, words and
    first frames through the core's stages in the pipeline's order (:func:`.watch.validation_frames`) with the lcm
    sampler at 1, 2, 4 and 8 steps (the LoRA in its hooks acting), at a fixed seed."""
    from ..conditioning.image_prompt import load_mask
    from ..dataset import layout
    from ..video_io import read_frames, write_frames
    from .watch import validation_frames

    folder = Path(config.out) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for record in dataset.records[:config.validation_clips]:
        items = layout.subject_items(layout.read_json(record.mask_dir / "mask.json", "mask.json"),
                                     record.mask_dir / "mask.json")
        word = record.word or str(items[0].get("label", ""))
        for steps in VALIDATION_STEPS:
            video = validation_frames(models, models["mapper"], record.caption, word,
                                      read_frames(record.video, [0])[0],
                                      load_mask(record.mask_dir / f"mask_{items[0]['value']}.png"), config.frames,
                                      config.size, steps, config.seed, sampler="lcm")
            written.append(write_frames(video, folder / f"step_{step:08d}_{record.id}_lcm{steps}.gif",
                                        overwrite=True))
    return written


class DistillStage(Stage):
    """``--stage distill`` in the one loop: the LoRA (:mod:`.lora_train`) on the frozen teacher's UNet is trained,
    the EMA target (``target_ema``; none at 0) follows it, the result is a kohya LoRA for the lcm sampler."""

    label = "distill"

    def __init__(self, config: TrainConfig) -> None:
        if config.stage != DISTILL_STAGE:
            raise TrainingError(explain("the distillation stage runs --stage distill, not stage", config.stage,
                                        "use --stage distill"))
        super().__init__(config)
        self._batch_config: TrainConfig | None = None
        self.ema: Any = None
        self.hooks: LoraHooks | None = None

    @property
    def batch_config(self) -> TrainConfig:
        if self._batch_config is None:
            self._batch_config = batch_config(self.config)
        return self._batch_config

    def load_models(self, device: torch.device) -> dict[str, Any]:
        return load_distill_models(self.config, device)

    def trainable(self, models: dict[str, Any], device: torch.device) -> list[nn.Parameter]:
        config = self.config
        self.models = models
        with torch.random.fork_rng(devices=[]):  # the LoRA's initialisation from the seed alone
            torch.manual_seed(config.seed)
            self.layers = LoraLayers(models["unet"], config.lora_targets, config.lora_rank, config.lora_alpha)
        self.layers.to(device, compute_dtype(config))
        self.hooks = LoraHooks(models["unet"], self.layers)  # removed by close(): the UNet is the teacher again
        return list(self.layers.parameters())

    def check_memory(self, models: dict[str, Any], params: list[nn.Parameter], device: torch.device) -> None:
        """Stage 2's estimate with the LoRA as the trained parameters: the student's backward runs through the
        whole UNet with the image prompt, as stage 2's does, so its activations are the step's peak (the teacher's
        and the target's passes run without gradients and hold less); the LoRA's weights, gradients, AdamW moments
        and EMA target are the trained bytes. The LoRA's own rank-r activations are not counted (a few % at most)."""
        from .memory import check_training_memory

        check_training_memory(self.batch_config, models, params, device)

    def make_ema(self) -> Any:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        if self.config.target_ema > 0:
            self.ema = AveragedModel(self.layers, multi_avg_fn=get_ema_multi_avg_fn(self.config.target_ema),
                                     use_buffers=False)
            self.ema.requires_grad_(False)
            self.ema.update_parameters(self.layers)  # starts as a copy
        return self.ema

    def module(self) -> nn.Module:
        config = self.config
        target = None if self.ema is None else self.ema.module
        loss_fn = DistillLoss(self.models["unet"], self.hooks, self.layers, target, config.distill_cfg,
                              config.distill_skip, config.huber_c)
        return DistillModule(self.layers, loss_fn, self.models["mapper"], self.models["text"], config.seed)

    def forward(self, module: nn.Module, batch: Any, numbers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        loss = module(batch, numbers)
        return loss, loss.new_zeros(0)

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.layers)

    def target(self) -> LoraLayers:
        """The LoRA the result holds: the EMA target's, or the student's without one."""
        return self.layers if self.ema is None else self.ema.module

    def validate(self, dataset: Any, step: int) -> None:
        with self.hooks.use(self.target()), torch.no_grad():
            write_lcm_validation(self.config, self.models, dataset, step)

    def result_path(self) -> Path:
        return Path(self.config.out) / RESULT_NAME

    def save_result(self, step: int) -> Path:
        config = self.config
        return save_kohya(self.target(), self.result_path(),
                          {"videobooth_training_stage": DISTILL_STAGE, "videobooth_training_steps": str(step),
                           "videobooth_sampler": "lcm", "videobooth_distill_skip": str(config.distill_skip),
                           "videobooth_distill_cfg": f"{config.distill_cfg:g}"})

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()  # the caller's UNet is the plain teacher again
            self.hooks = None


def train_distill(config: TrainConfig, on_step: StepHook | None = None, models: dict[str, Any] | None = None) -> Path:
    """Distil; returns OUT/videobooth_lcm_lora.safetensors (the EMA target's LoRA, or the student's with
    ``target_ema`` 0): :func:`.loop.train` with :class:`DistillStage`. ``models``: :func:`load_distill_models`'s
    result (default: loaded here; the UNet gets the LoRA's hooks for the run and loses them at its end)."""
    return train(config, on_step, models, DistillStage(config))


__all__ = ["RESULT_NAME", "DistillStage", "batch_config", "load_distill_models", "train_distill",
           "write_lcm_validation"]
