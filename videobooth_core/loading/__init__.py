"""Weight files, one home per model family: reading and writing them safely (``weight_files``), telling their kind
by their keys (``kinds``), strict assignment on the meta device (``strict``), one component
(a CLIP tower, a VAE) read from a folder or a file (``component``), the VideoBooth UNet and mapper and
their conversion (``checkpoint``), the CLIP text and vision towers (``clip``), the SD VAE (``vae``), SD 1.x
checkpoints and LoRAs for styles (``sd_checkpoint``, ``lora``, ``weight_patch``), the models folder layout
(``models_dir``) and weight streaming (``streaming``)."""
