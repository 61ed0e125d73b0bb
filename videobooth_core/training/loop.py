"""The training loop on Hugging Face ``accelerate``: the same code on one CPU, one GPU, or data-parallel under
``torchrun`` / ``accelerate launch`` (DDP; mixed precision through accelerate).

Data order and all per-clip randomness are functions of (seed, global sample number), where micro-batch ``m`` of
step ``s`` gives rank ``r`` the numbers ``((s * grad_accum + m) * world + r) * batch + j``: a step sees the same
clips whatever the number of ranks, and a resumed run continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..errors import Terminated, explain
from ..models.config import MapperConfig
from ..models.mapper import Mapper
from .config import TrainConfig, TrainingError
from .model import (ORDER_PURPOSE, BatchMaker, TrainingModule, check_elite_start, compute_dtype, init_projections,
                    sample_seed, start_from_elite, trainable_names)
from .state import (TrainingProgress, checkpoint_dir, list_checkpoints, read_checkpoint_info, resume_folder,
                    save_checkpoint, weights_hooks)

logger = logging.getLogger(__name__)

RESULT_NAME = "videobooth_mapper.safetensors"
SCALARS = "train"
"""TensorBoard's tag group of the logged scalars (``train/loss`` ...); metrics.jsonl keeps the plain names."""


class NumberedSamples(torch.utils.data.Dataset):
    """Global sample number -> (number, sample): epoch ``n // len`` visits the clips in a seeded permutation, and
    the reader's augmentations draw from torch's generator seeded by (seed, number)."""

    def __init__(self, dataset: Any, seed: int, overfit: bool = False) -> None:
        self.dataset, self.seed, self.overfit = dataset, seed, overfit

    def __len__(self) -> int:  # the numbers are unbounded; the sampler decides which are read
        return sys.maxsize

    def __getitem__(self, number: int) -> tuple[int, dict[str, Any]]:
        if self.overfit:  # the first epoch, again and again
            number = int(number) % len(self.dataset)
        epoch, position = divmod(int(number), len(self.dataset))
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(
            sample_seed(self.seed, epoch, ORDER_PURPOSE)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, int(number), 0))
            return int(number), self.dataset[int(order[position])]


class RankNumbers(torch.utils.data.Sampler):
    """This rank's sample numbers from ``start_step`` on, micro-batch by micro-batch (see the module docstring)."""

    def __init__(self, start_step: int, steps: int, accum: int, world: int, rank: int, batch: int) -> None:
        self.start_step, self.steps, self.accum, self.world, self.rank, self.batch = (
            start_step, steps, accum, world, rank, batch)

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start_step, self.steps):
            for micro in range(self.accum):
                first = ((step * self.accum + micro) * self.world + self.rank) * self.batch
                yield from range(first, first + self.batch)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum * self.batch


def _collate(items: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    return items


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------
def load_training_models(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """UNet, VAE, CLIP towers and tokenizer from ``config.models`` (frozen, eval) and the mapper to train (from
    ``config.mapper``, else freshly initialised from the seed), joined to the UNet.

    ``config.mapper`` may be a VideoBooth mapper or ELITE's global mapper layout (the official stage-1 start, see
    :func:`start_from_elite`); its kind is read from its keys before any model is loaded."""
    from ..loading.clip import load_clip_text_encoder, load_clip_vision_encoder
    from ..conditioning.tokenizer import load_clip_tokenizer
    from ..loading.vae import load_vae
    from ..loading.checkpoint import load_mapper, load_unet, read_starting_mapper
    from ..loading.models_dir import ModelFiles

    start_kind, start_weights = read_starting_mapper(config.mapper) if config.mapper is not None else (None, None)
    if start_kind == "elite_mapper":
        check_elite_start(config, start_weights)
    # the models folder's own mapper is never used: the trained one comes from --mapper or is new
    files = ModelFiles.from_models_dir(config.models, mapper=config.mapper or config.models)
    dtype = compute_dtype(config)
    unet = load_unet(files.unet, device=device).to(dtype).eval().requires_grad_(False)
    vae = load_vae(files.vae, dtype=dtype, device=device).eval().requires_grad_(False)
    text = load_clip_text_encoder(files.clip_text, dtype=dtype, device=device).eval().requires_grad_(False)
    vision = load_clip_vision_encoder(files.clip_vision, dtype=dtype, device=device).eval().requires_grad_(False)
    tokenizer = load_clip_tokenizer(files.tokenizer)
    sites = tuple(sorted((site.site, site.proj_in.out_channels) for site in unet.attention_sites))
    if start_kind == "videobooth_mapper":
        mapper = load_mapper(config.mapper, device=device).to(dtype)
    elif start_kind == "elite_mapper":
        mapper = start_from_elite(config, start_weights, unet, vision, text, sites, device, dtype)
    else:
        width = vision.config.hidden_size
        mapper_config = MapperConfig(input_dim=width, hidden_dim=width, output_dim=text.config.hidden_size,
                                     site_channels=sites)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            mapper = Mapper(mapper_config).to(device, dtype)
    if config.reinit_projections:
        init_projections(unet, mapper, config.stage)
    unet.attach_projections(mapper.site_projections(), unet_name=Path(files.unet).name,
                            mapper_name=Path(config.mapper).name if config.mapper else "the new mapper")
    if config.gradient_checkpointing:
        unet.gradient_checkpointing = True
    return {"unet": unet, "mapper": mapper, "vae": vae, "text": text, "vision": vision, "tokenizer": tokenizer,
            "vae_file": files.vae}


def set_trainable(mapper: Mapper, stage: int) -> list[torch.nn.Parameter]:
    """Freeze everything but the stage's parameters (:func:`.model.trainable_names`); returns those, in order."""
    names = set(trainable_names(mapper, stage))
    params = []
    for name, param in mapper.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            params.append(param)
    return params


def check_dataset_files(config: TrainConfig) -> None:
    """Every entry of the dataset must pass ``dataset check`` without decoding (files present, JSON and masks
    valid); cheap, so the command line runs it before any model loads."""
    from ..dataset.check import check_dataset

    report = check_dataset(config.data, decode=False)
    if report.problems:
        ident, problems = next(iter(report.problems.items()))
        raise TrainingError(explain(f"dataset entry {ident!r} of {config.data} is unusable", problems[0],
                                    f"fix or remove it ({len(report.problems)} entries have problems: run "
                                    f"`python -m videobooth_core dataset check {config.data}`)"))


def check_dataset_entries(config: TrainConfig, dataset: Any, batch_maker: BatchMaker) -> None:
    """Fail before training: every entry must pass ``dataset check`` (without decoding) and name its subject
    word in its caption."""
    check_dataset_files(config)
    for record in dataset.records:
        word = record.word
        if word:
            batch_maker.subject_ids(record.caption, word, record.id)


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------
StepHook = Callable[[int, float], None]
"""Called on every process after each optimizer step with (steps done, loss); raising stops the run."""


def _sigterm_as_interrupt() -> Any:
    """Make SIGTERM raise :class:`~videobooth_core.errors.Terminated` (a KeyboardInterrupt) in this process, so a
    scheduler's stop writes a checkpoint as Ctrl-C does; returns the previous handler to restore (None where no
    handler can be set: outside the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    return signal.signal(signal.SIGTERM, terminate)


class Stage:
    """What a run trains, plugged into the one loop (:func:`train`), which owns everything around it: the data
    order, the batches, accelerate, the optimizer and schedule, checkpoints and exact resume, metrics, SIGTERM and
    Ctrl-C. :func:`train` calls these hooks at fixed points; :class:`MapperStage` is stages 1 and 2,
    :class:`.distill_loop.DistillStage` the consistency distillation."""

    label = "stage"
    """The progress bar's name."""
    part_count = 0
    """How many loss parts :meth:`forward` returns beside the loss (averaged over micro-batches, then ranks)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    @property
    def batch_config(self) -> TrainConfig:
        """The settings the dataset reader and the batches are made with."""
        return self.config

    def load_models(self, device: torch.device) -> dict[str, Any]:
        """The models of the run (:func:`load_training_models`'s dictionary)."""
        raise NotImplementedError

    def trainable(self, models: dict[str, Any], device: torch.device) -> list[torch.nn.Parameter]:
        """Set up what is trained; returns its parameters (the optimizer's), in order."""
        raise NotImplementedError

    def check_memory(self, models: dict[str, Any], params: list[torch.nn.Parameter], device: torch.device) -> None:
        """Stop before training when the device lacks the memory (the memory_check setting)."""

    def make_ema(self) -> Any:
        """The EMA of the trained weights (a torch AveragedModel, registered for checkpointing), or None."""
        return None

    def module(self) -> torch.nn.Module:
        """The module accelerate prepares (its state_dict is the checkpoint's model.safetensors)."""
        raise NotImplementedError

    def forward(self, module: torch.nn.Module, batch: Any, numbers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the ``part_count`` parts) of one micro-batch (``numbers``: its global sample numbers)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """After each optimizer step (the EMA's update)."""

    def record(self, loss: float, parts: list[float], lr: float, speed: float) -> dict[str, float]:
        """One metrics record (keys without the tag group)."""
        return {"loss": loss, "lr": lr, "steps_per_s": speed}

    def validate(self, dataset: Any, step: int) -> None:
        """Validation videos (main process only)."""

    def save_result(self, step: int) -> Path:
        """Write the run's result file (main process only); returns its path."""
        raise NotImplementedError

    def result_path(self) -> Path:
        raise NotImplementedError

    def close(self) -> None:
        """At the run's end, however it ends (also when it fails before :meth:`trainable`)."""


class MapperStage(Stage):
    """Stages 1 and 2: the mapper (the stage's parameters, :func:`set_trainable`) with the official loss and EMA;
    the result is the EMA mapper in the released key layout."""

    part_count = 3  # mse, reg, reg_text

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"stage {self.config.stage}"

    def load_models(self, device: torch.device) -> dict[str, Any]:
        return load_training_models(self.config, device)

    def trainable(self, models: dict[str, Any], device: torch.device) -> list[torch.nn.Parameter]:
        self.models = models
        return set_trainable(models["mapper"], self.config.stage)

    def check_memory(self, models: dict[str, Any], params: list[torch.nn.Parameter], device: torch.device) -> None:
        from .memory import check_training_memory

        check_training_memory(self.config, models, params, device)

    def make_ema(self) -> Any:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        mapper = self.models["mapper"]
        self.ema = AveragedModel(mapper, multi_avg_fn=get_ema_multi_avg_fn(self.config.ema_decay), use_buffers=False)
        self.ema.requires_grad_(False)
        self.ema.update_parameters(mapper)  # the official EMA starts as a copy (update with decay 0)
        return self.ema

    def module(self) -> torch.nn.Module:
        self.training_module = TrainingModule(self.models["mapper"], self.models["unet"], self.models["text"],
                                              self.config.reg_weight, self.config.reg_text_weight)
        return self.training_module

    def forward(self, module: torch.nn.Module, batch: Any, numbers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        loss, mse, reg = module(batch)
        reg_text = self.training_module.last_reg_text if self.config.reg_text_weight > 0 else torch.zeros_like(reg)
        return loss, torch.stack([mse, reg, reg_text.to(reg)])

    def after_step(self) -> None:
        self.ema.update_parameters(self.models["mapper"])

    def record(self, loss: float, parts: list[float], lr: float, speed: float) -> dict[str, float]:
        record = {"loss": loss, "mse": parts[0], "reg": parts[1], "lr": lr, "steps_per_s": speed}
        if self.config.reg_text_weight > 0:
            record["reg_text"] = parts[2]
        return record

    def validate(self, dataset: Any, step: int) -> None:
        from .watch import write_validation_videos

        write_validation_videos(self.config, self.models, self.ema.module, self.models["mapper"], dataset, step)

    def result_path(self) -> Path:
        return Path(self.config.out) / RESULT_NAME

    def save_result(self, step: int) -> Path:
        from ..loading.weight_files import KIND_METADATA_KEY, save_safetensors

        save_safetensors(self.ema.module.state_dict(), self.result_path(),
                         {KIND_METADATA_KEY: "videobooth_mapper", "videobooth_training_stage": str(self.config.stage),
                          "videobooth_training_steps": str(step)})
        return self.result_path()


def train(config: TrainConfig, on_step: StepHook | None = None, models: dict[str, Any] | None = None,
          stage: Stage | None = None) -> Path:
    """Train one stage; returns its result file (stages 1 and 2: OUT/videobooth_mapper.safetensors, the EMA
    mapper, released key layout; ``--stage distill``: :mod:`.distill_loop`'s LoRA).

    ``models``: the stage's models (:func:`load_training_models`'s result for stages 1 and 2, default: loaded
    here); the weights in it are trained in place. ``stage``: what is trained (default: the config's stage).

    The state is ``accelerate``'s (:mod:`.state`): a checkpoint folder is written every ``checkpoint_every`` steps,
    at the end, and on Ctrl-C or SIGTERM (KeyboardInterrupt / Terminated, re-raised after the checkpoint is
    written). Metrics go through ``Accelerator.log`` to OUT/metrics.jsonl and TensorBoard (OUT/tensorboard).
    """
    config.check()
    if stage is None:
        stage = stage_of(config)
    try:
        return _run(config, on_step, models, stage)
    finally:  # however the run ends (an error before the loop included): the stage lets go of the models
        stage.close()


def _run(config: TrainConfig, on_step: StepHook | None, models: dict[str, Any] | None, stage: Stage) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from ..dataset.reader import OurDataset
    from .watch import JsonlMetrics, tensorboard_available

    out = Path(config.out)
    metrics = JsonlMetrics(out)
    trackers: list[Any] = [metrics]
    if config.tensorboard:
        if tensorboard_available():
            trackers.append("tensorboard")
        else:
            logger.info("tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)")
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu, log_with=trackers,
                              project_config=ProjectConfiguration(project_dir=str(out),
                                                                  logging_dir=str(out / "tensorboard")))
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    if config.resume is None and list_checkpoints(config):
        raise TrainingError(explain("the output folder already holds a run's checkpoints", str(checkpoint_dir(config)),
                                    "pass --resume latest to continue it, or another --out"))
    resume = resume_folder(config)  # before any model loads: a legacy or foreign --resume is refused here

    models = models if models is not None else stage.load_models(device)
    params = stage.trainable(models, device)
    batches_config = stage.batch_config
    # with a cache the reader makes the same draws but decodes only frame 0 (the clip's VAE posteriors are cached)
    dataset = OurDataset(config.data, stage=batches_config.stage, flip=config.flip, seed=None,
                         clip_frames=config.frames, window=config.window, size=config.size,
                         read_clip=config.cache is None)
    cache = None
    if config.cache is not None:
        from .cache import EncoderCache

        cache = EncoderCache(config.cache, config.size, config.frames, models.get("vae_file", "unknown"))
        cache.check_index()
    batch_maker = BatchMaker(batches_config, models["vae"], models["vision"], models["text"], models["tokenizer"],
                             device, cache=cache)
    check_dataset_entries(batches_config, dataset, batch_maker)
    if config.memory_check:
        stage.check_memory(models, params, device)
    if cache is not None:
        if accelerator.is_main_process:
            built = cache.build(dataset.records, models["vae"], config.flip)
            if built:
                logger.info("encoded %d clips into the cache %s", built, config.cache)
        accelerator.wait_for_everyone()

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    ema = stage.make_ema()

    training_module = stage.module()
    # the scheduler is registered, not prepared: accelerate would step it once per process
    module, optimizer = accelerator.prepare(training_module, optimizer)
    progress = TrainingProgress(config.stage, accelerator.num_processes, config.batch_size, config.grad_accum,
                                json.dumps(dataclasses.asdict(config)))
    # progress first: state.PROGRESS_FILE
    accelerator.register_for_checkpointing(progress, *(() if ema is None else (ema,)), scheduler)
    weights_hooks(accelerator)
    if resume is not None:
        read_checkpoint_info(resume, config, training_module)  # stage and sizes, named, before accelerate reads it
        accelerator.load_state(str(resume))
        if progress.resumed_layout != (accelerator.num_processes, config.batch_size, config.grad_accum):
            logger.warning("resuming with another (ranks, batch, accumulation) than %s: the data order changes",
                           progress.resumed_layout)
        logger.info("resumed from %s at step %d", resume, progress.step)
    elif config.resume == "latest":
        logger.warning("--resume latest: no checkpoint in %s yet; starting from step 0", checkpoint_dir(config))
    start_step = progress.step
    main = accelerator.is_main_process
    if main:
        metrics.resume_at(start_step)
    accelerator.init_trackers("videobooth", init_kwargs={"tensorboard": {"purge_step": start_step + 1}})

    numbers = RankNumbers(start_step, config.steps, config.grad_accum, accelerator.num_processes,
                          accelerator.process_index, config.batch_size)
    samples = NumberedSamples(dataset, config.seed, config.overfit)
    loader = torch.utils.data.DataLoader(samples, batch_size=config.batch_size, sampler=numbers, collate_fn=_collate,
                                         num_workers=config.num_workers)

    def checkpoint(step: int) -> None:
        save_checkpoint(accelerator, config, progress, step)
        if main:
            metrics.plot(out)

    bar = None
    if main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc=f"VideoBooth {stage.label}", unit="step",
                   file=sys.stderr)
    step = start_step
    # overfit: no loader iterator (its workers would read ahead what the repeated batches never need)
    batches, numbers_left = (None if config.overfit else iter(loader)), iter(numbers)
    repeated: dict[tuple[int, ...], Any] = {}

    def next_batch() -> tuple[Any, list[int]]:
        if config.overfit:  # the first epoch again and again: each batch read and encoded once
            key = tuple(next(numbers_left) % len(dataset) for _ in range(config.batch_size))
            if key not in repeated:
                repeated[key] = batch_maker([samples[n][1] for n in key], list(key), step=step)
            return repeated[key], list(key)
        items = next(batches)
        drawn = [number for number, _ in items]
        return batch_maker([sample for _, sample in items], drawn, step=step), drawn

    started = time.perf_counter()
    previous_sigterm = _sigterm_as_interrupt()
    try:
        while step < config.steps:
            total = torch.zeros((), device=device)
            parts = torch.zeros(stage.part_count, device=device)
            for micro in range(config.grad_accum):
                batch, batch_numbers = next_batch()
                sync = micro == config.grad_accum - 1
                with nullcontext() if sync else accelerator.no_sync(module):
                    loss, loss_parts = stage.forward(module, batch, batch_numbers)
                    accelerator.backward(loss / config.grad_accum)
                total += loss.detach() / config.grad_accum
                parts += loss_parts.detach() / config.grad_accum
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stage.after_step()
            step += 1
            loss_value = float(accelerator.reduce(total, reduction="mean"))
            if not math.isfinite(loss_value):
                raise TrainingError(explain("the loss is not finite at step", step,
                                            "lower --lr, use --mixed-precision no, or resume from an earlier checkpoint"))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
            if step % config.log_every == 0 or step == config.steps:
                reduced = [float(v) for v in accelerator.reduce(parts, reduction="mean")] if stage.part_count else []
                elapsed = time.perf_counter() - started
                record = stage.record(loss_value, reduced, scheduler.get_last_lr()[0], (step - start_step) / elapsed)
                accelerator.log({f"{SCALARS}/{key}": value for key, value in record.items()}, step=step)
            if step % config.checkpoint_every == 0 and step < config.steps:
                checkpoint(step)
            if config.validate_every and (step % config.validate_every == 0 or step == config.steps):
                if main:
                    stage.validate(dataset, step)
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(step, loss_value)
    except KeyboardInterrupt as interruption:  # Ctrl-C, or SIGTERM (errors.Terminated)
        signal_name = "SIGTERM" if isinstance(interruption, Terminated) else "interrupted"
        logger.warning("%s: writing a checkpoint at step %d (resume with --resume latest)", signal_name, step)
        if step > start_step:
            checkpoint(step)
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if bar is not None:
            bar.close()
    checkpoint(step)
    result = stage.save_result(step) if main else stage.result_path()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def stage_of(config: TrainConfig) -> Stage:
    """The :class:`Stage` that ``config.stage`` names."""
    from .config import DISTILL_STAGE

    if config.stage == DISTILL_STAGE:
        from .distill_loop import DistillStage

        return DistillStage(config)
    return MapperStage(config)
