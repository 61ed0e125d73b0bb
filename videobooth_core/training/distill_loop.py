"""``train --stage distill``: latent consistency distillation of VideoBooth into a LoRA for the ``lcm`` sampler.

The loss is :mod:`.distill`'s; everything around it is the stage-1/2 trainer's own machinery, imported, not
copied: the dataset reader and its seeded numbering (:class:`.loop.NumberedSamples`, :class:`.loop.RankNumbers`:
a step sees the same clips whatever the number of ranks), the frozen encoders' batches (:class:`.model.BatchMaker`,
as stage 2 makes them: the clean latent and the image prompt's latent), the encoder cache, accelerate (one CPU, one
GPU or data-parallel), the metrics (metrics.jsonl, TensorBoard, loss.png), checkpoints with exact resume
(every random draw is a function of (seed, sample number); the RNG states, optimizer and EMA are saved), and
SIGTERM / Ctrl-C checkpoints.

The teacher is the frozen VideoBooth of ``--models`` with its trained mapper (``--mapper``, else the models
folder's); the student is the same UNet with a LoRA (:mod:`.lora_train`); the result,
``OUT/videobooth_lcm_lora.safetensors``, is a kohya-format LoRA that ``generate --lora`` and the LoRA nodes load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import Terminated, explain
from ..models.mapper import Mapper
from .config import DISTILL_STAGE, TrainConfig, TrainingError
from .distill import DISTILL_PURPOSE, DistillLoss, draw
from .lora_train import LoraHooks, LoraLayers, save_kohya
from .loop import (KILL_AFTER_CHECKPOINT_ENV, SIGTERM_AT_STEP_ENV, Metrics, NumberedSamples, RankNumbers, StepHook,
                   check_dataset_entries, checkpoint_dir, list_checkpoints, load_training_models, rng_states,
                   save_checkpoint, set_rng_states)
from .model import BatchMaker, TrainBatch, compute_dtype, sample_seed, spliced_text

logger = logging.getLogger(__name__)

RESULT_NAME = "videobooth_lcm_lora.safetensors"
CHECKPOINT_FORMAT = "videobooth-distill-checkpoint"
CHECKPOINT_VERSION = 1
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


def load_distill_checkpoint(path: Path, layers: LoraLayers) -> dict[str, Any]:
    """Read and check a distillation checkpoint against this run's LoRA (one-line errors)."""
    if not path.is_file():
        raise TrainingError(explain("the checkpoint to resume does not exist", str(path),
                                    "pass --resume latest or a file in OUT/checkpoints"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which, not a pickle traceback
        raise TrainingError(explain("cannot read the checkpoint", str(path), f"resume from another one ({error})")) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(explain("not a distillation checkpoint", str(path),
                                    "resume a --stage distill run from its own OUT/checkpoints"))
    ours, theirs = layers.state_dict(), state["lora"]
    for key, value in ours.items():
        if key not in theirs or tuple(theirs[key].shape) != tuple(value.shape):
            raise TrainingError(explain(f"the checkpoint's LoRA differs from this run's at {key}:",
                                        tuple(theirs[key].shape) if key in theirs else "missing",
                                        "resume with the same --models, --lora-rank and --lora-targets"))
    return state


def write_lcm_validation(config: TrainConfig, models: dict[str, Any], dataset: Any, step: int) -> list[Path]:
    """OUT/validation/step_XXXXXXXX_<entry>_lcm<N>.gif: the first ``validation_clips`` entries' captions, words and
    first frames through the pipeline's own ``generate`` with the lcm sampler at 1, 2, 4 and 8 steps (the LoRA
    in its hooks acting), at a fixed seed."""
    from ..conditioning.image_prompt import load_mask
    from ..dataset import layout
    from ..pipeline import GenerationRequest, VideoBoothPipeline
    from ..video_io import read_frames, write_frames

    folder = Path(config.out) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    unet = models["unet"]
    pipe = VideoBoothPipeline(unet, models["mapper"], models["vae"], models["text"], models["vision"],
                              models["tokenizer"], device=next(unet.parameters()).device)
    written = []
    for record in dataset.records[:config.validation_clips]:
        items = layout.subject_items(layout.read_json(record.mask_dir / "mask.json", "mask.json"),
                                     record.mask_dir / "mask.json")
        word = record.word or str(items[0].get("label", ""))
        for steps in VALIDATION_STEPS:
            request = GenerationRequest(prompt=record.caption, subject_word=word, image=read_frames(record.video, [0])[0],
                                        mask=load_mask(record.mask_dir / f"mask_{items[0]['value']}.png"),
                                        frames=config.frames, width=config.size, height=config.size, steps=steps,
                                        sampler="lcm", seed=config.seed)
            result = pipe.generate(request)
            written.append(write_frames(result.frames, folder / f"step_{step:08d}_{record.id}_lcm{steps}.gif",
                                        overwrite=True))
    return written


def train_distill(config: TrainConfig, on_step: StepHook | None = None, models: dict[str, Any] | None = None) -> Path:
    """Distil; returns OUT/videobooth_lcm_lora.safetensors (the EMA target's LoRA, or the student's with
    ``target_ema`` 0). ``models``: :func:`load_distill_models`'s result (default: loaded here; the UNet gets the
    LoRA's hooks for the run and loses them at its end).

    Checkpoints every ``checkpoint_every`` steps, at the end, and on Ctrl-C or SIGTERM (re-raised after it)."""
    from accelerate import Accelerator
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from ..dataset.reader import OurDataset

    config.check()
    if config.stage != DISTILL_STAGE:
        raise TrainingError(explain("train_distill runs the distillation stage, not stage", config.stage,
                                    "use --stage distill"))
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    out = Path(config.out)
    if config.resume is None and list_checkpoints(config):
        raise TrainingError(explain("the output folder already holds a run's checkpoints", str(checkpoint_dir(config)),
                                    "pass --resume latest to continue it, or another --out"))
    if config.memory_check:
        logger.info("the distillation stage has no memory estimate yet; training without the check")
    batches_config = batch_config(config)
    models = models if models is not None else load_distill_models(config, device)
    unet, mapper = models["unet"], models["mapper"]
    dataset = OurDataset(config.data, stage=2, flip=config.flip, seed=None, clip_frames=config.frames,
                         window=config.window, size=config.size, read_clip=config.cache is None)
    cache = None
    if config.cache is not None:
        from .cache import EncoderCache

        cache = EncoderCache(config.cache, config.size, config.frames, models.get("vae_file", "unknown"))
        cache.check_index()
    batch_maker = BatchMaker(batches_config, models["vae"], models["vision"], models["text"], models["tokenizer"],
                             device, cache=cache)
    check_dataset_entries(batches_config, dataset, batch_maker)
    if cache is not None:
        if accelerator.is_main_process:
            built = cache.build(dataset.records, models["vae"], config.flip)
            if built:
                logger.info("encoded %d clips into the cache %s", built, config.cache)
        accelerator.wait_for_everyone()

    with torch.random.fork_rng(devices=[]):  # the LoRA's initialisation from the seed alone
        torch.manual_seed(config.seed)
        layers = LoraLayers(unet, config.lora_targets, config.lora_rank, config.lora_alpha)
    layers.to(device, compute_dtype(config))
    hooks = LoraHooks(unet, layers)
    params = list(layers.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    ema = None
    if config.target_ema > 0:
        ema = AveragedModel(layers, multi_avg_fn=get_ema_multi_avg_fn(config.target_ema), use_buffers=False)
        ema.requires_grad_(False)
        ema.update_parameters(layers)  # starts as a copy

    start_step = 0
    if config.resume is not None:
        path = list_checkpoints(config)[-1] if config.resume == "latest" and list_checkpoints(config) else None
        if config.resume == "latest" and path is None:
            logger.warning("--resume latest: no checkpoint in %s yet; starting from step 0", checkpoint_dir(config))
        else:
            state = load_distill_checkpoint(path or Path(config.resume), layers)
            with torch.no_grad():
                layers.load_state_dict(state["lora"])
            if ema is not None and state["ema"]:
                ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_states(state["rng"])
            start_step = int(state["step"])
            logger.info("resumed from %s at step %d", path or config.resume, start_step)

    loss_fn = DistillLoss(unet, hooks, layers, None if ema is None else ema.module, config.distill_cfg,
                          config.distill_skip, config.huber_c)
    module, optimizer = accelerator.prepare(DistillModule(layers, loss_fn, mapper, models["text"], config.seed),
                                            optimizer)
    numbers = RankNumbers(start_step, config.steps, config.grad_accum, accelerator.num_processes,
                          accelerator.process_index, config.batch_size)
    samples = NumberedSamples(dataset, config.seed, config.overfit)
    loader = torch.utils.data.DataLoader(samples, batch_size=config.batch_size, sampler=numbers, collate_fn=_collate,
                                         num_workers=config.num_workers)
    main = accelerator.is_main_process
    metrics = Metrics(config, start_step, main)

    def checkpoint(step: int) -> None:
        if main:
            state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "stage": DISTILL_STAGE, "step": step,
                     "world_size": accelerator.num_processes, "batch_size": config.batch_size,
                     "grad_accum": config.grad_accum, "config": json.dumps(dataclasses.asdict(config)),
                     "lora": {k: v.detach().cpu() for k, v in layers.state_dict().items()},
                     "ema": {} if ema is None else {k: v.detach().cpu() for k, v in ema.state_dict().items()},
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states()}
            save_checkpoint(checkpoint_dir(config) / f"step_{step:08d}.pt", state)
            kept = list_checkpoints(config)
            for old in kept[:-config.keep_checkpoints] if config.keep_checkpoints else []:
                old.unlink()
            metrics.plot(out)
        accelerator.wait_for_everyone()

    bar = None
    if main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc="VideoBooth distill", unit="step", file=sys.stderr)
    step = start_step
    batches = iter(loader)
    kill_after = int(os.environ.get(KILL_AFTER_CHECKPOINT_ENV, "0") or 0)
    term_at = int(os.environ.get(SIGTERM_AT_STEP_ENV, "0") or 0)
    started = time.perf_counter()
    previous_sigterm = _sigterm_as_interrupt()
    try:
        while step < config.steps:
            total = torch.zeros((), device=device)
            for micro in range(config.grad_accum):
                items = next(batches)
                batch = batch_maker([sample for _, sample in items], [number for number, _ in items], step=step)
                with accelerator.no_sync(module) if micro < config.grad_accum - 1 else _no_context():
                    loss = module(batch, [number for number, _ in items])
                    accelerator.backward(loss / config.grad_accum)
                total += loss.detach() / config.grad_accum
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(layers)
            step += 1
            loss_value = float(accelerator.reduce(total, reduction="mean"))
            if not math.isfinite(loss_value):
                raise TrainingError(explain("the loss is not finite at step", step,
                                            "lower --lr, use --mixed-precision no, or resume from an earlier checkpoint"))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
            if step % config.log_every == 0 or step == config.steps:
                metrics.log({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                             "steps_per_s": (step - start_step) / (time.perf_counter() - started)})
            if step % config.checkpoint_every == 0 and step < config.steps:
                checkpoint(step)
                if step == kill_after:  # tests: die as a SIGKILL does, nothing flushed or cleaned up
                    os.kill(os.getpid(), signal.SIGKILL)
            if config.validate_every and (step % config.validate_every == 0 or step == config.steps):
                if main:
                    with hooks.use(layers if ema is None else ema.module), torch.no_grad():
                        write_lcm_validation(config, models, dataset, step)
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(step, loss_value)
            if step == term_at:  # tests: a real SIGTERM, through the handler a scheduler's would meet
                os.kill(os.getpid(), signal.SIGTERM)
    except KeyboardInterrupt as interruption:  # Ctrl-C, or SIGTERM (errors.Terminated)
        signal_name = "SIGTERM" if isinstance(interruption, Terminated) else "interrupted"
        logger.warning("%s: writing a checkpoint at step %d (resume with --resume latest)", signal_name, step)
        if step > start_step:
            checkpoint(step)
        raise
    finally:
        hooks.remove()  # the caller's UNet is the plain teacher again
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if bar is not None:
            bar.close()
    checkpoint(step)
    result = out / RESULT_NAME
    if main:
        save_kohya(layers if ema is None else ema.module, result,
                   {"videobooth_training_stage": DISTILL_STAGE, "videobooth_training_steps": str(step),
                    "videobooth_sampler": "lcm", "videobooth_distill_skip": str(config.distill_skip),
                    "videobooth_distill_cfg": f"{config.distill_cfg:g}"})
        metrics.plot(out)
    metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _collate(items: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    return items  # (sample number, sample) pairs, as read


def _sigterm_as_interrupt() -> Any:
    """SIGTERM raises :class:`~videobooth_core.errors.Terminated` (a KeyboardInterrupt), so a scheduler's stop writes
    a checkpoint as Ctrl-C does (the stage-1/2 loop's rule); returns the previous handler (None off the main thread).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    return signal.signal(signal.SIGTERM, terminate)


def _no_context() -> Any:
    from contextlib import nullcontext

    return nullcontext()


__all__ = ["RESULT_NAME", "batch_config", "load_distill_models", "train_distill", "write_lcm_validation"]
