"""What the UNet is conditioned on: image-prompt preparation (white background, box crop, square pad;
``image_prompt``), tokenisation and the subject-word splice of the mapper's word vectors (``text``, ``tokenizer``;
several subjects: ``subjects``), the frozen encoders' outputs (the CLIP vision features, ``clip``; VAE encode and
decode, ``vae``) and the stage functions with what they give one generation (``embeddings``). Loading the
encoders: :mod:`videobooth_core.loading`."""
