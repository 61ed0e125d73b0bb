"""The core's four-step road inside ComfyUI (issue 27): *VideoBooth LCM Schedule* gives ComfyUI's ``SamplerCustom``
(sampler ``lcm``) the distilled LoRA's own timesteps.

ComfyUI's ``ModelSamplingDiscrete`` (lcm) keeps a 50-point table of every 20th timestep (19, 39, ..., 999) and its
``simple`` scheduler picks every 12.5th point, so 4 steps visit 999, 759, 499, 259. The LoRA was distilled on another
50-point grid, every 5th point of the 250-step grid VideoBooth was trained on (16, 36, ..., 999), and the core's
``lcm`` sampler visits 999, 758, 518, 277 of it. This node puts that grid in the model's sampling object (ComfyUI's own
discrete sampling and LCM boundary, one sigma per grid point, so ``timestep(sigma)`` returns the grid's original
timestep) and outputs the sigmas of the core's steps: ComfyUI's ``lcm`` sampler then computes what the core's does.
The grid and the steps' timesteps come from :mod:`..videobooth_core.sampling.lcm`; ComfyUI is imported when the node
runs (the pack imports without it).
"""

from __future__ import annotations

from typing import Any

import torch

from ..videobooth_core.errors import VideoBoothError, explain
from ..videobooth_core.sampling.lcm import grid_positions, solver_timesteps
from ..videobooth_core.settings import widget
from ._widgets import check_widgets

_SAMPLING_CLASSES: dict[tuple[type, type], type] = {}


def comfy_lcm_parts() -> tuple[type, type]:
    """ComfyUI's discrete sampling class and its LCM boundary (``calculate_denoised`` with LCM's c_skip/c_out).

    Feature-tested: 0.3.64 defines the boundary beside its ``ModelSamplingDiscrete`` node
    (``comfy_extras.nodes_model_advanced.LCM``); a release that moves it into ``comfy.model_sampling`` is taken too."""
    try:
        import comfy.model_sampling as model_sampling
    except ImportError as error:
        raise VideoBoothError("VideoBooth LCM Schedule runs inside ComfyUI only (comfy.model_sampling was not found); "
                              "outside it use generate --sampler lcm --steps 4 or the pack's VideoBooth Sampler "
                              "(sampler lcm)") from error
    boundary = getattr(model_sampling, "LCM", None)
    if boundary is None:
        try:
            from comfy_extras.nodes_model_advanced import LCM as boundary
        except ImportError as error:
            raise VideoBoothError("this ComfyUI has no LCM model sampling (comfy.model_sampling.LCM or "
                                  "comfy_extras.nodes_model_advanced.LCM); update ComfyUI to 0.3.64 or later") \
                from error
    return model_sampling.ModelSamplingDiscrete, boundary


def grid_sampling_class(discrete: type, boundary: type) -> type:
    """ComfyUI's ``discrete`` sampling with its LCM ``boundary``, on a grid of original timesteps (made once per pair,
    as ComfyUI's own ``ModelSamplingDiscrete`` node combines them; ComfyUI's classes are left as they are).

    The sigma table is one sigma per grid point (ComfyUI's floats of the model's schedule), so ComfyUI's schedulers
    pick grid points and ``timestep(sigma)`` is the nearest grid point's original timestep (as ComfyUI's distilled
    sampling maps its own 50 points); ``sigma(timestep)`` reads the model's whole schedule, so ``percent_to_sigma``
    (the image prompt's injection window) is what it is without this node."""
    key = (discrete, boundary)
    if key not in _SAMPLING_CLASSES:
        class VideoBoothLCMSampling(discrete, boundary):
            def __init__(self, model_config: Any, grid: list[int]) -> None:
                super().__init__(model_config)
                self.schedule = discrete(model_config)  # every timestep of the model's schedule
                self.register_buffer("grid_timesteps", torch.tensor(grid, dtype=torch.long))
                self.set_sigmas(self.schedule.sigmas[self.grid_timesteps])

            def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
                index = super().timestep(sigma)  # the nearest table entry in log sigma: ComfyUI's rule
                return self.grid_timesteps.to(index.device)[index]

            def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
                return self.schedule.sigma(timestep)

        _SAMPLING_CLASSES[key] = VideoBoothLCMSampling
    return _SAMPLING_CLASSES[key]


class VideoBoothLCMSchedule:
    DESCRIPTION = ("The distilled LoRA's own four-step road on the native MODEL: put it after LoraLoaderModelOnly (the "
                   "videobooth_lcm_lora) and feed SamplerCustom its model and sigmas, with KSamplerSelect lcm and cfg "
                   "1. ComfyUI's lcm sampler then visits the timesteps the LoRA was distilled on (999, 758, 518, 277 "
                   "at 4 steps; ModelSamplingDiscrete lcm + KSampler visit 999, 759, 499, 259) and gives the pack's "
                   "lcm result. No ModelSamplingDiscrete node is needed.")
    CATEGORY = "VideoBooth/native"
    FUNCTION = "schedule"
    RETURN_TYPES = ("MODEL", "SIGMAS")
    RETURN_NAMES = ("model", "sigmas")
    OUTPUT_TOOLTIPS = ("The model with LCM sampling on the distilled LoRA's grid, for SamplerCustom's model input.",
                       "The steps' noise levels (noisiest first, then 0), for SamplerCustom's sigmas input.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": (
                "The model of VideoBooth Native Loader, with the distilled LoRA (LoraLoaderModelOnly, "
                "videobooth_lcm_lora.safetensors).")}),
            "steps": ("INT", {**widget("lcm_steps"), "tooltip": (
                "Consistency steps: 1, 2, 4 or 8 are the distilled settings (the same steps as generate --sampler "
                "lcm --steps N).")}),
        }}

    def schedule(self, model: Any, steps: int) -> tuple[Any, torch.Tensor]:
        check_widgets({"steps": steps}, {"steps": "lcm_steps"})
        discrete, boundary = comfy_lcm_parts()
        inner = getattr(model, "model", None)
        if getattr(inner, "videobooth_mapper", None) is None:
            raise VideoBoothError(explain(
                "VideoBooth LCM Schedule needs the MODEL of VideoBooth Native Loader (its grid is VideoBooth's "
                "schedule); the connected model is", type(inner if inner is not None else model).__name__,
                "connect VideoBooth Native Loader's model (through LoraLoaderModelOnly)"))
        sampling = grid_sampling_class(discrete, boundary)(inner.model_config, solver_timesteps())
        patched = model.clone()
        patched.add_object_patch("model_sampling", sampling)
        sigmas = torch.cat([sampling.sigmas[grid_positions(int(steps))], sampling.sigmas.new_zeros(1)]).cpu()
        return patched, sigmas


NODE_CLASS_MAPPINGS = {"VideoBoothLCMSchedule": VideoBoothLCMSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"VideoBoothLCMSchedule": "VideoBooth LCM Schedule"}
