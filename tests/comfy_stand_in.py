"""A stand-in for the few ComfyUI 0.3.64 classes VideoBooth LCM Schedule builds on (CI has no ComfyUI), written from
their arithmetic: ``comfy.model_sampling``'s discrete sampling and EPS, and ``comfy_extras.nodes_model_advanced``'s LCM
boundary; plus a model patcher with ``clone`` and ``add_object_patch``. The real classes are exercised in a real
ComfyUI by the harness the README describes."""

from __future__ import annotations

import sys
import types
from typing import Any

import torch

from videobooth_core.sampling.schedule import BETA_END, BETA_START, TRAIN_TIMESTEPS


class EPS:
    """ComfyUI's epsilon parameterisation in its sigma space (``x = x0 + sigma * noise``)."""

    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise / (_view(sigma, noise) ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        return model_input - model_output * _view(sigma, model_output)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        sigma = _view(sigma, noise)
        scaled = noise * torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else noise * sigma
        return scaled + latent_image


class LCM(EPS):
    """LCM's boundary (sigma_data 0.5, timestep x 10) on the unscaled latent, as ComfyUI 0.3.64."""

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        timestep = _view(self.timestep(sigma), model_output)
        x0 = model_input - model_output * _view(sigma, model_output)
        scaled = timestep * 10.0
        c_skip = 0.25 / (scaled ** 2 + 0.25)
        c_out = scaled / (scaled ** 2 + 0.25) ** 0.5
        return c_out * x0 + c_skip * model_input


class ModelSamplingDiscrete(torch.nn.Module):
    """The sigma table of the model's ``sqrt_linear`` schedule (float64 betas, float32 table); ``timestep``: the
    nearest entry in log sigma; ``sigma``: log-linear between entries."""

    def __init__(self, model_config: Any = None, zsnr: bool | None = None) -> None:
        super().__init__()
        settings = model_config.sampling_settings
        assert settings["beta_schedule"] == "sqrt_linear"
        betas = torch.linspace(settings["linear_start"], settings["linear_end"], settings["timesteps"],
                               dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.set_sigmas(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
        self.sigma_data = 1.0

    def set_sigmas(self, sigmas: torch.Tensor) -> None:
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        distances = sigma.log() - self.log_sigmas[:, None]
        return distances.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


def _view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.view(()) if sigma.nelement() == 1 else sigma.view(sigma.shape[:1] + (1,) * (like.ndim - 1))


class Patcher:
    """A model patcher: ``model`` (with ``model_config`` and, for a VideoBooth model, ``videobooth_mapper``),
    ``clone`` and ``add_object_patch``."""

    def __init__(self, model: Any, object_patches: dict | None = None) -> None:
        self.model = model
        self.object_patches = dict(object_patches or {})

    def clone(self) -> "Patcher":
        return Patcher(self.model, self.object_patches)

    def add_object_patch(self, name: str, obj: Any) -> None:
        self.object_patches[name] = obj


def native_patcher(mapper: Any = object()) -> Patcher:
    """A patcher around a stand-in of the native model: VideoBooth's sampling settings, the mapper riding along."""
    config = types.SimpleNamespace(sampling_settings={"beta_schedule": "sqrt_linear", "linear_start": BETA_START,
                                                      "linear_end": BETA_END, "timesteps": TRAIN_TIMESTEPS})
    return Patcher(types.SimpleNamespace(model_config=config, videobooth_mapper=mapper))


def install(monkeypatch: Any) -> None:
    """Make ``import comfy.model_sampling`` and ``comfy_extras.nodes_model_advanced`` find the stand-ins (0.3.64's
    layout: the LCM boundary beside the ModelSamplingDiscrete node)."""
    comfy = types.ModuleType("comfy")
    model_sampling = types.ModuleType("comfy.model_sampling")
    model_sampling.EPS, model_sampling.ModelSamplingDiscrete = EPS, ModelSamplingDiscrete
    comfy.model_sampling = model_sampling
    extras = types.ModuleType("comfy_extras")
    advanced = types.ModuleType("comfy_extras.nodes_model_advanced")
    advanced.LCM = LCM
    extras.nodes_model_advanced = advanced
    for name, module in (("comfy", comfy), ("comfy.model_sampling", model_sampling), ("comfy_extras", extras),
                         ("comfy_extras.nodes_model_advanced", advanced)):
        monkeypatch.setitem(sys.modules, name, module)

