"""ComfyUI <-> core, in one place: model folders, devices and memory, progress and cancel, data layouts.

This is the only module of the pack that touches ComfyUI (``folder_paths``, ``comfy.*``, ``server``). Every function
also works without ComfyUI (the tests, other hosts): model folders then live under the folder named by
the ``VIDEOBOOTH_MODELS_DIR`` environment variable (``videobooth/``, ``vae/``, ``clip_vision/``,
``text_encoders/``, like ``make-tiny`` writes them), progress and cancel do nothing and everything runs
on the CPU. Errors leave the nodes as ``VideoBooth.<Class>`` (see :func:`reports_errors`).

Layouts translated here:

* ComfyUI ``IMAGE`` (B, H, W, C) float 0..1 and ``MASK`` (B, H, W) float <-> core (H, W, 3) / (H, W);
* ComfyUI ``LATENT`` ``{"samples": (batch * frames, 4, h, w)}`` holds *raw* VAE latents, as ComfyUI's own
  VAE Encode makes and VAE Decode expects (``comfy.sd.VAE`` never applies the 0.18215 factor; only its
  samplers do, through ``latent_format.process_in/out``). The core's latents are VAE latents x 0.18215,
  (b, 4, frames, h, w). So: ComfyUI samples = core latents / 0.18215, frames in the batch axis,
  video-major (all frames of video 0, then video 1, ...).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from ..videobooth_core.conditioning.vae import SD_VAE_SCALING_FACTOR
from ..videobooth_core.errors import CheckpointError, ImagePromptError, SamplingError, VideoBoothError

try:  # inside ComfyUI
    import folder_paths
except ImportError:  # tests, other hosts
    folder_paths = None
try:
    import comfy.utils as comfy_utils
    from comfy import model_management, model_patcher
except ImportError:
    model_management = model_patcher = comfy_utils = None
try:
    from server import PromptServer
except ImportError:
    PromptServer = None

logger = logging.getLogger(__name__)

VIDEOBOOTH_FOLDER = "videobooth"
MODELS_DIR_ENV = "VIDEOBOOTH_MODELS_DIR"
WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin")
"""Weight files listed outside ComfyUI (inside it, each folder's registered extensions apply)."""
LATENT_SCALE = SD_VAE_SCALING_FACTOR
"""Core latents are raw SD-1.x VAE latents times this factor (0.18215)."""

# SD-1.x latent -> approximate RGB per latent channel (R, G, B): ComfyUI's SD1.5 ``latent_rgb_factors``
# (comfy.latent_formats.SD15), rounded. Inside ComfyUI its own values are read (latent_rgb_factors()); these are
# only the stand-in for tests and other hosts.
PREVIEW_RGB_FACTORS = (
    (0.35, 0.23, 0.32),
    (0.33, 0.50, 0.24),
    (-0.28, 0.18, 0.27),
    (-0.21, -0.26, -0.72),
)
PREVIEW_FRAMES = 4
"""How many frames (evenly spread over the video) the sampler preview shows side by side."""


# -- model folders --------------------------------------------------------------------------------------
def register_videobooth_folder(paths_module: Any = None, folder: str = VIDEOBOOTH_FOLDER) -> None:
    """Register ``models/videobooth`` (or ``folder``: ``videocrafter``) with ComfyUI through
    ``folder_paths.add_model_folder_path``.

    ``extra_model_paths.yaml`` is read before packs load and may already have created the key (with an
    empty extension set, which means "any file"): its paths are kept (the default path is appended after them)
    and the weight extensions are added to its extension set. ``paths_module`` defaults to ComfyUI's
    ``folder_paths`` (no-op without it).
    """
    fp = paths_module if paths_module is not None else folder_paths
    if fp is None:
        return
    fp.add_model_folder_path(folder, os.path.join(fp.models_dir, folder))
    # no public call sets a folder's extensions: add ours to the set ComfyUI (or the yaml) made for the folder
    fp.folder_names_and_paths[folder][1].update(fp.supported_pt_extensions)


def folder_locations(folder: str) -> list[str]:
    """The directories searched for ``folder`` (``videobooth``, ``vae``, ``clip_vision``, ``text_encoders``)."""
    if folder_paths is not None:
        return folder_paths.get_folder_paths(folder)
    root = os.environ.get(MODELS_DIR_ENV)
    return [os.path.join(root, folder)] if root else []


def list_models(folder: str) -> list[str]:
    """Weight files in ``folder``, as relative paths with ``/`` (sub-folders included), sorted."""
    if folder_paths is not None:
        return folder_paths.get_filename_list(folder)
    found = set()
    for root in folder_locations(folder):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.lower().endswith(WEIGHT_EXTENSIONS):
                    found.add(Path(os.path.relpath(os.path.join(dirpath, name), root)).as_posix())
    return sorted(found)


def describe_locations(folder: str) -> str:
    locations = folder_locations(folder)
    if locations:
        return f"the '{folder}' model folder ({', '.join(locations)})"
    return f"the '{folder}' model folder (none configured: run inside ComfyUI or set {MODELS_DIR_ENV})"


def model_path(folder: str, name: str) -> Path:
    """The full path of the listed file ``name`` in ``folder``; CheckpointError naming the folder if absent."""
    path = None
    if folder_paths is not None:
        path = folder_paths.get_full_path(folder, name)
    else:
        for root in folder_locations(folder):
            candidate = Path(root, name).resolve()
            if candidate.is_file() and candidate.is_relative_to(Path(root).resolve()):
                path = str(candidate)
                break
    if path is None:
        raise CheckpointError(f"'{name}' was not found in {describe_locations(folder)}; pick a file that exists there.")
    return Path(path)


def file_signature(folder: str, *names: str) -> str:
    """Size and modification time of listed files (to reload a file replaced under the same name)."""
    parts = []
    for name in names:
        try:
            stat = model_path(folder, name).stat()
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
        except (CheckpointError, OSError):
            parts.append(f"{name}:missing")
    return "|".join(parts)


def comfy_sd1_tokenizer_dir() -> Path | None:
    """ComfyUI's bundled CLIP (SD 1.x) tokenizer folder, or None outside ComfyUI."""
    try:
        import comfy.sd1_clip
    except ImportError:
        return None
    folder = Path(os.path.dirname(comfy.sd1_clip.__file__)) / "sd1_tokenizer"
    return folder if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() else None


# -- devices and memory ---------------------------------------------------------------------------------
def devices_for(role: str, choice: str) -> tuple[torch.device, torch.device]:
    """(compute device, offload device) for a model of ``role``; ``choice`` is ``auto`` or ``cpu``."""
    cpu = torch.device("cpu")
    if choice == "cpu" or model_management is None:
        return cpu, cpu
    mm = model_management
    load = {"unet": mm.get_torch_device, "vae": mm.vae_device, "text": mm.text_encoder_device,
            # the vision tower feeds the mapper, which lives with the UNet: same device
            "vision": mm.get_torch_device}[role]()
    offload = {"unet": mm.unet_offload_device, "vae": mm.vae_offload_device,
               "text": mm.text_encoder_offload_device, "vision": mm.text_encoder_offload_device}[role]()
    return torch.device(load), torch.device(offload)


def auto_dtype(role: str, device: torch.device) -> torch.dtype:
    """``auto`` precision: half precision for the UNet and mapper on an accelerator that supports it,
    float32 otherwise and for the small models (VAE, CLIP), as the official code runs them."""
    if role != "unet" or model_management is None or device.type == "cpu":
        return torch.float32
    if model_management.should_use_fp16(device):
        return torch.float16
    if model_management.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


def intermediate_device() -> torch.device:
    """Where IMAGE and LATENT outputs live (the CPU unless ComfyUI runs with --gpu-only)."""
    if model_management is None:
        return torch.device("cpu")
    return torch.device(model_management.intermediate_device())


class VideoBoothModules(torch.nn.Module):
    """Groups the modules that move together; ComfyUI's model patcher may set ``device`` on it (diffusers
    and transformers models have a read-only ``device`` property, so they cannot be handed over directly)."""


class ManagedModel:
    """Modules handed to ComfyUI's memory management (a ``ModelPatcher``) so that other models can be
    unloaded to make room, and unloaded in turn when others need the memory."""

    def __init__(self, modules: dict[str, torch.nn.Module], load_device: torch.device,
                 offload_device: torch.device) -> None:
        self.holder = VideoBoothModules()
        for name, module in modules.items():
            self.holder.add_module(name, module)
        self.load_device, self.offload_device = load_device, offload_device
        self.patcher = None
        if model_patcher is not None:
            self.patcher = model_patcher.ModelPatcher(self.holder, load_device=load_device,
                                                      offload_device=offload_device)

    def module(self, name: str) -> torch.nn.Module:
        return getattr(self.holder, name)

    def on_device(self) -> bool:
        want = (self.load_device.type, self.load_device.index or 0)
        return all((t.device.type, t.device.index or 0) == want
                   for t in (*self.holder.parameters(), *self.holder.buffers()))


def activate(models: Sequence[ManagedModel], memory_required: int = 0) -> None:
    """Put ``models`` on their compute devices, letting ComfyUI free ``memory_required`` bytes of working
    memory first (by unloading other models). Always loads them completely: the core's modules cannot run
    partially offloaded."""
    patchers = [m.patcher for m in models if m.patcher is not None]
    if patchers:
        model_management.load_models_gpu(patchers, memory_required=int(memory_required), force_full_load=True)
    for model in models:
        if not model.on_device():
            # ComfyUI declined a full load (e.g. --novram); run anyway rather than fail on mixed devices
            if model.patcher is not None:
                logger.warning("ComfyUI kept part of a VideoBooth model off %s; moving it there", model.load_device)
            model.holder.to(model.load_device)


# -- errors and messages shown in the frontend ------------------------------------------------------------
ERROR_MODULE = "VideoBooth"
"""The module name errors carry to the frontend: ComfyUI reports an exception's type as ``module.qualname``
(execution.full_type_name), which for the core's classes would be the pack's folder and the whole module path
(``ComfyUI-VideoBooth.videobooth_core.errors.SamplingError``) in front of the message."""
_HOST_ERRORS: dict[type, type] = {}


def host_error_class(cls: type[VideoBoothError]) -> type[VideoBoothError]:
    """A subclass of ``cls`` (so ``except SamplingError`` still catches it) whose type reads
    ``VideoBooth.SamplingError`` in the frontend's error details."""
    if cls not in _HOST_ERRORS:
        _HOST_ERRORS[cls] = type(cls.__name__, (cls,), {"__module__": ERROR_MODULE, "__qualname__": cls.__name__,
                                                        "__doc__": cls.__doc__})
    return _HOST_ERRORS[cls]


def reports_errors(function: Callable) -> Callable:
    """Wrap a node's FUNCTION: a VideoBoothError leaves it as the same error (same message, attributes and
    traceback) of a class the frontend shows as ``VideoBooth.<Class>``; other exceptions pass untouched."""
    if getattr(function, "_reports_errors", False):
        return function

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except VideoBoothError as error:
            if type(error).__module__ == ERROR_MODULE:
                raise
            host = BaseException.__new__(host_error_class(type(error)), *error.args)
            host.__dict__.update(error.__dict__)
            raise host.with_traceback(error.__traceback__) from None

    run._reports_errors = True
    return run


def show_on_node(node_id: str | None, text: str) -> None:
    """Show ``text`` on the node in the frontend (ComfyUI's progress text, drawn under the node's widgets) and in
    the server log; only the log outside ComfyUI."""
    logger.warning(text)
    server = getattr(PromptServer, "instance", None) if PromptServer is not None else None
    if server is not None and node_id is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, node_id)


# -- progress, previews, cancel -------------------------------------------------------------------------
def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (never swallow it)."""
    if model_management is not None:
        model_management.throw_exception_if_processing_interrupted()


def previews_enabled() -> bool:
    """Whether ComfyUI was asked for sampler previews (``--preview-method``, default none)."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    method = getattr(args.preview_method, "value", args.preview_method)
    return str(method) != "none"


def _preview_size() -> int:
    try:
        from comfy.cli_args import args
    except ImportError:
        return 512
    return int(getattr(args, "preview_size", 512) or 512)


class Progress:
    """A ComfyUI progress bar (with optional previews) for one node; does nothing outside ComfyUI."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        self.total = int(total)
        self.bar = comfy_utils.ProgressBar(self.total, node_id=node_id) if comfy_utils is not None else None

    def update(self, value: int, preview: Any = None) -> None:
        """``value`` done out of ``total``; ``preview`` a PIL image or None."""
        if self.bar is not None:
            image = ("JPEG", preview, _preview_size()) if preview is not None else None
            self.bar.update_absolute(value, self.total, image)


def latent_rgb_factors() -> tuple[torch.Tensor, torch.Tensor | None]:
    """ComfyUI's SD1.5 latent -> RGB factors (4, 3) and bias (3,) or None; the rounded stand-in without ComfyUI."""
    try:
        from comfy.latent_formats import SD15
    except ImportError:
        return torch.tensor(PREVIEW_RGB_FACTORS, dtype=torch.float32), None
    latent_format = SD15()
    bias = getattr(latent_format, "latent_rgb_factors_bias", None)
    return (torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32),
            None if bias is None else torch.tensor(bias, dtype=torch.float32))


def latent_preview(latents: torch.Tensor) -> Any:
    """A PIL preview of core latents (b, 4, frames, h, w): up to 4 frames of video 0, side by side, in the colours
    of ComfyUI's latent2rgb preview."""
    from PIL import Image

    video = latents[0].detach().float().cpu()  # (4, f, h, w)
    frames = video.shape[1]
    picks = sorted({round(i * (frames - 1) / max(PREVIEW_FRAMES - 1, 1)) for i in range(min(frames, PREVIEW_FRAMES))})
    factors, bias = latent_rgb_factors()
    rgb = torch.einsum("cfhw,cr->fhwr", video[:, picks], factors)
    if bias is not None:
        rgb = rgb + bias
    strip = rearrange(rgb, "f h w r -> h (f w) r")
    pixels = ((strip + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def step_reporter(progress: Progress, offset: int) -> Callable[[int, int, Any], None]:
    """A core StepCallback: progress (``offset`` + step + 1), a preview of the predicted clean latent, and
    the Cancel check at every step."""
    show_previews = previews_enabled()

    def on_step(step: int, total: int, output: Any) -> None:
        preview = latent_preview(output.pred_x0) if show_previews else None
        progress.update(offset + step + 1, preview)
        check_interrupt()

    return on_step


# -- data layouts ---------------------------------------------------------------------------------------
def first_image(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) 0..1 -> the first image as (H, W, 3) float32 on the CPU (alpha dropped)."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ImagePromptError(f"expected a ComfyUI IMAGE of shape (batch, height, width, channels); got {shape}.")
    if image.ndim == 3:
        image = image[None]
    if image.shape[0] < 1 or image.shape[-1] < 3:
        raise ImagePromptError(f"the IMAGE needs at least one RGB image; got shape {tuple(image.shape)}.")
    if image.shape[0] > 1:
        logger.warning("the image prompt uses the first of %d images", image.shape[0])
    return image[0, :, :, :3].detach().float().cpu()


def subject_mask(mask: torch.Tensor, image_hw: tuple[int, int], invert: bool) -> torch.Tensor:
    """ComfyUI MASK (B, H, W) or (H, W), subject = 1 -> the first mask as (H, W) float32 on the CPU.

    With ``invert`` the mask is flipped (1 - mask), e.g. for LoadImage's mask, which is 1 where the picture
    is transparent. Raises ImagePromptError for an empty mask or a size that does not match the image.
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ImagePromptError(f"expected a ComfyUI MASK of shape (batch, height, width); got {shape}.")
    if mask.ndim == 3:
        if mask.shape[0] > 1:
            logger.warning("the image prompt uses the first of %d masks", mask.shape[0])
        mask = mask[0]
    raw = mask.detach().float().cpu()
    mask = 1.0 - raw if invert else raw
    if tuple(mask.shape) != tuple(image_hw):
        hint = ""
        if tuple(raw.shape) == (64, 64) and not bool(raw.any()):
            hint = (" LoadImage outputs an empty 64x64 mask when the picture has no alpha channel: paint the "
                    "subject in the mask editor, use a segmentation node's mask, or disconnect the mask.")
        raise ImagePromptError(
            f"the mask is {tuple(mask.shape)[::-1]} (width x height) but the image is {tuple(image_hw)[::-1]}; "
            f"use the mask made for this image.{hint}"
        )
    if not bool(mask.any()):
        raise ImagePromptError(
            "the mask is empty: no pixel marks the subject. The subject must be 1 (white) in the mask. "
            + ("Turn invert_mask off: with it on, the mask is entirely 1 before inverting."
               if invert else
               "LoadImage's own mask is 1 where the picture is transparent: for a cut-out PNG turn invert_mask on; "
               "otherwise paint the subject in the mask editor or disconnect the mask to use the whole image.")
        )
    return mask


def _touches_every_border(region: torch.Tensor) -> bool:
    return all(bool(edge.any()) for edge in (region[0], region[-1], region[:, 0], region[:, -1]))


def inverted_mask_warning(image: torch.Tensor, mask: torch.Tensor, invert: bool) -> str | None:
    """Why the (H, W) subject mask (after ``invert``) looks like the background, or None.

    Two signs, each of which a subject photo almost never shows: the "subject" touches all four borders of the
    image while the rest does not (a background around a subject), or every "subject" pixel of the (H, W, 3)
    image has one flat colour while the rest does not (the transparent area of a cut-out PNG, which LoadImage's
    mask marks with 1 unless invert_mask is on).
    """
    subject = mask != 0  # the core's rule: only exact zeros are background
    rest = ~subject
    if not bool(rest.any()):
        return None
    signs = []
    if _touches_every_border(subject) and not _touches_every_border(rest):
        signs.append("it touches every border of the image and the rest does not")
    spread = image[subject].amax(dim=0) - image[subject].amin(dim=0)  # per channel, over the "subject" pixels
    rest_spread = image[rest].amax(dim=0) - image[rest].amin(dim=0)
    if float(spread.max()) <= 1.5 / 255 < float(rest_spread.max()):
        signs.append("all of it is one flat colour, as the transparent area of a cut-out picture")
    if not signs:
        return None
    fix = ("turn invert_mask off: the mask already marks the subject with 1" if invert else
           "turn invert_mask on: LoadImage's mask of a cut-out PNG is 1 where the picture is transparent")
    return (f"VideoBooth Image Prompt: the mask's subject looks like the background ({'; '.join(signs)}); {fix}. "
            "The preview output shows what is used as the subject.")


def video_latents_to_comfy(latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Core latents (b, 4, frames, h, w), x 0.18215 -> ComfyUI LATENT {samples: (b * frames, 4, h, w)} raw."""
    samples = rearrange(latents.float(), "b c f h w -> (b f) c h w") / LATENT_SCALE
    return {"samples": samples.to(intermediate_device())}


def comfy_latent_samples(latent: Any, what: str) -> torch.Tensor:
    """The (n, 4, h, w) raw samples of a ComfyUI LATENT, checked."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise SamplingError(f"{what}: expected a ComfyUI LATENT (a dict with 'samples'); got {type(latent).__name__}.")
    if samples.ndim != 4 or samples.shape[1] != 4:
        raise SamplingError(
            f"{what}: expected SD 1.x latents of shape (frames, 4, height/8, width/8); got {tuple(samples.shape)}. "
            "Use latents of an SD 1.x VAE (4 channels, frames in the batch axis)."
        )
    return samples


def comfy_latent_to_core(samples: torch.Tensor) -> torch.Tensor:
    """Raw (n, 4, h, w) ComfyUI samples -> core scale (x 0.18215), float32."""
    return samples.float() * LATENT_SCALE


def comfy_latent_to_video(samples: torch.Tensor) -> torch.Tensor:
    """Raw (n, 4, h, w) ComfyUI samples (frames in the batch axis) -> one core video (1, 4, n, h, w), x 0.18215."""
    return rearrange(comfy_latent_to_core(samples), "n c h w -> 1 c n h w")


def comfy_latent_to_exemplar(samples: torch.Tensor) -> torch.Tensor:
    """The first raw latent of a ComfyUI LATENT (e.g. from VAE Encode) -> a core exemplar (1, 4, 1, h, w)."""
    return rearrange(comfy_latent_to_core(samples[:1]).cpu(), "b c h w -> b c 1 h w")


def image_to_comfy(image: torch.Tensor) -> torch.Tensor:
    """Core (n, H, W, 3) float images in [0, 1] -> ComfyUI IMAGE on the intermediate device."""
    return image.float().to(intermediate_device())
