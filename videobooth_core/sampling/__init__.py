"""Denoising, from noise to a clean video latent.

``schedule`` the training noise schedule, q_sample and the official respaced DDPM's coefficients;
``noise`` the run's random draws in the official order and the image prompt's per-step noising;
``denoiser`` one guided prediction (the UNet passes with the image prompt, classifier-free guidance);
``ddpm`` the official sampling loop; ``schedulers`` the diffusers samplers' loop on the same schedule;
``run`` building the denoiser and running the chosen sampler; ``windows`` long videos by context windows;
``known_frames`` the first frames held at every step (image-to-video, extension);
``memory`` the peak-memory estimate of a step (a dry run on the meta device)."""
