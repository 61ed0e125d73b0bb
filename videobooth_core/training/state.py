"""A run's training state on ``accelerate``'s checkpointing: ``Accelerator.save_state`` / ``load_state`` write and
read the trained module, the optimizer (and fp16's gradient scaler), every process's RNG states and the objects
registered with ``register_for_checkpointing`` (:class:`TrainingProgress`, the EMA, the learning-rate schedule).

One checkpoint is one folder, ``OUT/checkpoints/step_XXXXXXXX``, written atomically: every process saves into
a temporary sibling (``.videobooth-step_XXXXXXXX.partial``, a name that every rank knows), and the main process
renames it into place only when all of it is written. A run killed mid-write leaves that temporary folder, which
is never read and is removed by the next save of the same step; the checkpoint before it stays complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError, explain
from ..files import PARTIAL_SUFFIX, TEMP_PREFIX, PathLike, is_temporary

CHECKPOINT_FORMAT = "videobooth-training-checkpoint"
CHECKPOINT_VERSION = 2
"""2: a folder written by ``accelerate`` (version 1 was one ``step_*.pt`` file, no longer read)."""
PROGRESS_FILE = "custom_checkpoint_0.pkl"
""":class:`TrainingProgress`, the first object registered for checkpointing (``accelerate`` numbers them)."""
MODEL_FILE = "model.safetensors"
"""The trained module's weights (``accelerate``'s name): ``mapper.<the mapper's key>``."""
CHECKPOINT_PREFIX = "step_"


class TrainingProgress:
    """Where a run is (registered for checkpointing first): the optimizer steps done and what the data order
    depends on, so a resumed run continues exactly where the checkpoint left off (the sample numbers of step
    ``s`` are a function of ``s`` and this layout: :class:`.loop.RankNumbers`)."""

    def __init__(self, stage: int, world_size: int, batch_size: int, grad_accum: int, config: str) -> None:
        self.step = 0
        self.stage, self.world_size, self.batch_size, self.grad_accum, self.config = (
            stage, world_size, batch_size, grad_accum, config)
        self.resumed_layout: tuple[int, int, int] | None = None
        """(ranks, batch, accumulation) of the checkpoint this run resumed, when resumed."""

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and strings only: :func:`read_checkpoint_info` reads it with ``weights_only=True``."""
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "stage": self.stage, "step": self.step,
                "samples_seen": self.step * self.grad_accum * self.world_size * self.batch_size,
                "world_size": self.world_size, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "config": self.config}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.resumed_layout = (int(state["world_size"]), int(state["batch_size"]), int(state["grad_accum"]))


def checkpoint_dir(config: Any) -> Path:
    return Path(config.out) / "checkpoints"


def checkpoint_path(config: Any, step: int) -> Path:
    return checkpoint_dir(config) / f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(config: Any) -> list[Path]:
    """Complete checkpoints in OUT/checkpoints (folders), oldest first; a killed write's temporary folder is not
    one."""
    folder = checkpoint_dir(config)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(CHECKPOINT_PREFIX + "*")
                  if p.is_dir() and not is_temporary(p) and p.name[len(CHECKPOINT_PREFIX):].isdigit())


def legacy_checkpoints(config: Any) -> list[Path]:
    """``step_*.pt`` files of the trainer before checkpoints were ``accelerate`` folders (refused, named)."""
    folder = checkpoint_dir(config)
    return sorted(folder.glob(CHECKPOINT_PREFIX + "*.pt")) if folder.is_dir() else []


LEGACY_FIX = ("a step_*.pt file is a checkpoint of the trainer before version 2, which cannot be resumed: finish "
              "that run with the version that wrote it, or start a new run (--out elsewhere, or --mapper with a "
              "mapper it exported)")


def check_checkpoint_folder(path: PathLike, flag: str = "--resume") -> Path:
    """A checkpoint to resume checked cheaply, before any model loads: a folder holding this trainer's state
    (its contents, stage and sizes are checked against the run by :func:`read_checkpoint_info`)."""
    fix = "pass --resume latest or a step_* folder of a training run's checkpoints folder"
    p = Path(path).expanduser()
    if not p.exists():
        raise TrainingError(explain(f"{flag}: no such file or folder", str(path), fix))
    if not p.is_dir():
        legacy = p.suffix == ".pt" and p.name.startswith(CHECKPOINT_PREFIX)
        raise TrainingError(explain(f"{flag} is not a training checkpoint (checkpoints are step_* folders)", str(path),
                                    LEGACY_FIX if legacy else fix))
    if not (p / PROGRESS_FILE).is_file() or not (p / MODEL_FILE).is_file():
        raise TrainingError(explain(f"{flag} is not a training checkpoint (no {PROGRESS_FILE} and {MODEL_FILE})",
                                    str(path), fix))
    return p


def read_checkpoint_info(path: PathLike, config: Any, trained: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint's :class:`TrainingProgress` state, checked against this run (stage; the shapes of
    ``trained``, the module whose weights the checkpoint holds, unwrapped) before ``accelerate`` loads anything
    from it: every mismatch is one line naming the value and the fix."""
    from safetensors import safe_open

    folder = check_checkpoint_folder(path)
    try:
        state = torch.load(folder / PROGRESS_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which, not a pickle traceback
        raise TrainingError(explain("cannot read the checkpoint", str(folder),
                                    f"resume from another one ({error})")) from None
    # accelerate unpickles the registered objects' files fully: read first as weights-only, so a file holding
    # anything beyond tensors, numbers and containers (code a foreign pickle could run) is refused, never run
    for extra in sorted(folder.glob("custom_checkpoint_*.pkl")):
        try:
            torch.load(extra, map_location="cpu", weights_only=True)
        except Exception as error:
            raise TrainingError(explain("the checkpoint holds a file that is not weights only (refused unread)",
                                        str(extra), f"resume from a checkpoint this trainer wrote ({error})"
                                        [:400])) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(explain("not a VideoBooth training checkpoint", str(folder),
                                    "pass a step_* folder of a training run's checkpoints folder"))
    if state["stage"] != config.stage:
        raise TrainingError(explain(f"the checkpoint is from stage {state['stage']}, this run is stage", config.stage,
                                    "resume with the same --stage; to start stage 2 from a stage-1 run pass "
                                    "--mapper OUT1/videobooth_mapper.safetensors instead of --resume"))
    try:
        with safe_open(str(folder / MODEL_FILE), framework="pt") as handle:
            theirs = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:
        raise TrainingError(explain("cannot read the checkpoint's weights", str(folder / MODEL_FILE),
                                    f"resume from another one ({error})")) from None
    for key, value in trained.state_dict().items():
        found = theirs.get(key, "missing")
        if found != tuple(value.shape):
            raise TrainingError(explain(f"the checkpoint is for another model size: {key} is", found,
                                        f"resume with the --models it was trained with (this one needs "
                                        f"{tuple(value.shape)})"))
    return state


def resume_folder(config: Any) -> Path | None:
    """The checkpoint ``config.resume`` names (``latest``: the newest complete one; None when there is none
    yet), or None when the run does not resume."""
    if config.resume is None:
        return None
    if config.resume != "latest":
        return check_checkpoint_folder(config.resume)
    found = list_checkpoints(config)
    if not found and legacy_checkpoints(config):
        raise TrainingError(explain("--resume latest: OUT/checkpoints holds only checkpoints of an earlier trainer",
                                    str(legacy_checkpoints(config)[-1]), LEGACY_FIX))
    return found[-1] if found else None


def save_checkpoint(accelerator: Any, config: Any, progress: TrainingProgress, step: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, renamed to OUT/checkpoints/step_XXXXXXXX once complete;
    then the oldest are removed beyond ``keep_checkpoints``. Called on every process (each saves its RNG states)."""
    final = checkpoint_path(config, step)
    partial = final.parent / f"{TEMP_PREFIX}{final.name}{PARTIAL_SUFFIX}"
    if accelerator.is_main_process:
        if partial.exists():  # a killed write of this step: ours, never read
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    progress.step = step
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # this step again (a run resumed from an earlier checkpoint): the new one replaces it
            old = final.parent / f"{TEMP_PREFIX}{final.name}.old{PARTIAL_SUFFIX}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old)
        else:
            os.replace(partial, final)
        kept = list_checkpoints(config)
        for stale in kept[:-config.keep_checkpoints] if config.keep_checkpoints else []:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def weights_hooks(accelerator: Any) -> None:
    """Save and load the trained module's weights unwrapped (keys ``mapper.<key>``, never DDP's ``module.``), so
    a checkpoint reads the same whatever the number of processes that wrote or resumes it."""

    def unwrapped_weights(models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        weights[:] = [accelerator.unwrap_model(model).state_dict() for model in models]

    def unwrapped_models(models: list[torch.nn.Module], input_dir: str) -> None:
        models[:] = [accelerator.unwrap_model(model) for model in models]

    accelerator.register_save_state_pre_hook(unwrapped_weights)
    accelerator.register_load_state_pre_hook(unwrapped_models)


__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "TrainingProgress", "check_checkpoint_folder", "checkpoint_dir",
           "list_checkpoints", "read_checkpoint_info", "resume_folder", "save_checkpoint", "weights_hooks"]
