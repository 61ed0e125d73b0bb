"""Coarse-to-fine training (issue 13): ``python -m videobooth_core train --stage 1|2``.

* :mod:`.config` - :class:`TrainConfig`, the official recipe as defaults, its settings table (the generation
  settings' mechanism: flags, config-file keys, ranges, checks), YAML/TOML files;
* :mod:`.model` - which parameters each stage trains, their initialisation, and the loss, computed with the
  inference model code (``UNet3DModel.capture_image_prompt_features`` / ``forward``, ``encode_text``);
* :mod:`.loop` - the loop on ``accelerate`` (one CPU, one GPU, DDP under ``torchrun``/``accelerate launch``),
  EMA, the exported mapper;
* :mod:`.state` - checkpoints and resume on ``accelerate``'s ``save_state``/``load_state`` (atomic folders);
* :mod:`.watch` - metrics.jsonl and the loss curve (an ``accelerate`` tracker), the validation videos;
* :mod:`.cache` - ``--cache``: the clips' VAE posterior parameters, encoded once, sampled per step (exact);
* :mod:`.memory` - the memory check before training (a dry run of the step on storage-free twins);
* :mod:`.cli` - the ``train`` command.

Importing this package does no heavy work (``accelerate`` is imported when training starts).
"""
