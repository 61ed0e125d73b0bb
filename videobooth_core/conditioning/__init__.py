"""What the UNet is conditioned on: image-prompt preparation (white background, box crop, square pad), CLIP
features, tokenisation and the subject-word splice of the mapper's word vectors, the VAE latent of the image prompt."""
