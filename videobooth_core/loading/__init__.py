"""Weight files: reading and writing them safely (``weight_files``), telling their kind by their keys (``kinds``),
strict assignment on the meta device (``strict``), the VideoBooth UNet and mapper and their conversion
(``checkpoint``), the models folder layout (``models_dir``) and weight streaming (``streaming``)."""
