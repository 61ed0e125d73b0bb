"""Denoising: the noise schedules, the guided denoiser with the image-prompt stream, the official DDPM loop and the
diffusers samplers, and the peak-memory estimate of a step."""
