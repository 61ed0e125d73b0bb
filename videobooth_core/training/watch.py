"""Watching a run: ``OUT/metrics.jsonl`` and the loss curve ``OUT/loss.png`` (an ``accelerate`` tracker, logged to
with ``Accelerator.log`` beside TensorBoard's), and the validation videos, generated with the core's stages.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_path

logger = logging.getLogger(__name__)

from accelerate.tracking import GeneralTracker  # imported by train() only: accelerate is the training extra


class JsonlMetrics(GeneralTracker):
    """OUT/metrics.jsonl, one object per logged step, as an ``accelerate`` tracker (main process only), and the
    loss curve drawn from it. A resumed run keeps the records up to its checkpoint (:meth:`resume_at`)."""

    name = "videobooth_metrics_jsonl"
    requires_logging_directory = False

    def __init__(self, out: str | Path) -> None:
        super().__init__()
        self.path = Path(out) / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []

    @property
    def tracker(self) -> Any:
        return self.path

    def resume_at(self, step: int) -> None:
        """Keep the file's records of steps up to ``step`` (all of a fresh run's folder's are dropped, step 0)."""
        self.records = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record["step"] <= step:
                        self.records.append(record)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        """Append one record; a key's tag group (``train/loss``: TensorBoard's) is dropped (``loss``)."""
        record = {"step": step, **{key.rsplit("/", 1)[-1]: value for key, value in values.items()}}
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def plot(self, out: Path) -> None:
        """The loss curve as OUT/loss.png (skipped without matplotlib)."""
        if not self.records:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in self.records], [r["loss"] for r in self.records], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(Path(out) / "loss.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


# ----------------------------------------------------------------------------------------------------------------
# validation videos
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def validation_frames(models: dict[str, Any], mapper: Any, caption: str, word: str, image: Any, mask: Any,
                      frames: int, size: int, steps: int, seed: int, sampler: str | None = None) -> torch.Tensor:
    """One video of ``mapper`` with the generation defaults (official sampler, guidance and options) at
    ``steps`` steps: the core's stages in the pipeline's order, so it equals ``VideoBoothPipeline.generate`` of
    the same request (tested). ``sampler``: another sampler (the distillation stage's ``lcm``). Returns (frames,
    size, size, 3) uint8.

    The UNet must have ``mapper``'s projections attached."""
    from ..conditioning.embeddings import encode_image_prompt, encode_prompt
    from ..conditioning.image_prompt import prepare_image_prompt
    from ..conditioning.vae import decode_video, frames_to_uint8
    from ..sampling.run import prepare_denoiser
    from ..sampling.seeded import latent_shape, sample_seeded
    from ..settings import GenerationSettings

    unet, device = models["unet"], next(models["unet"].parameters()).device
    settings = GenerationSettings(frames=frames, width=size, height=size, steps=steps, seed=seed,
                                  **({} if sampler is None else {"sampler": sampler}))
    options = settings.options
    prepared = prepare_image_prompt(image, mask, None, settings.image_prompt_padding)
    null_text, _ = encode_prompt(models["text"], models["tokenizer"], settings.negative_prompt)
    injected = encode_image_prompt(models["vision"], mapper, prepared)
    cond_text, _ = encode_prompt(models["text"], models["tokenizer"], caption, word, injected, settings.subject_match)
    shape = latent_shape(frames, size, size)
    denoiser, _ = prepare_denoiser(
        unet, cond_text, null_text, shape, device, image_prompt=True, cfg_scale=settings.cfg_scale,
        guidance=settings.guidance, image_prompt_strength=options.image_prompt_strength,
        single_frame_image_prompt=options.single_frame_image_prompt, watermark_branch=options.watermark_branch,
        batch_passes=options.batch_passes)
    latents = sample_seeded(denoiser, settings.seed, shape, device, sampler=settings.sampler, steps=settings.steps,
                            spacing=settings.spacing, eta=settings.eta, image_prompt_steps=options.image_prompt_steps,
                            vae=models["vae"], image_prompt=prepared)
    return frames_to_uint8(decode_video(models["vae"], latents, 4))


def write_validation_videos(config: Any, models: dict[str, Any], ema_mapper: Any, mapper: Any, dataset: Any,
                            step: int) -> list[Path]:
    """OUT/validation/step_XXXXXXXX_<entry>.gif: the first ``validation_clips`` entries' captions, words and first
    frames, generated with the EMA mapper at a fixed seed (:func:`validation_frames`)."""
    from ..conditioning.image_prompt import load_mask
    from ..dataset import layout
    from ..video_io import read_frames, write_frames

    unet = models["unet"]
    folder = Path(config.out) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    unet.attach_projections(ema_mapper.site_projections())
    written = []
    try:
        for record in dataset.records[:config.validation_clips]:
            items = layout.subject_items(layout.read_json(record.mask_dir / "mask.json", "mask.json"),
                                         record.mask_dir / "mask.json")
            word = record.word or str(items[0].get("label", ""))
            video = validation_frames(models, ema_mapper, record.caption, word, read_frames(record.video, [0])[0],
                                      load_mask(record.mask_dir / f"mask_{items[0]['value']}.png"), config.frames,
                                      config.size, config.validation_steps, config.seed)
            written.append(write_frames(video, folder / f"step_{step:08d}_{record.id}.gif", overwrite=True))
    finally:  # back to the mapper being trained
        unet.attach_projections(mapper.site_projections())
    return written
