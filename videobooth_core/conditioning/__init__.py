"""What the UNet is conditioned on: image-prompt preparation (white background, box crop, square pad;
``image_prompt``), tokenisation and the subject-word splice of the mapper's word vectors (``text``), and the frozen
encoders that turn them into features: the CLIP towers (``clip``), the CLIP tokenizer (``tokenizer``) and the VAE
(``vae``)."""
