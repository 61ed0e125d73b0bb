"""VideoBooth training data: build a dataset from your own videos, read it (or the official subset) for training.

Modules: ``video`` (the official frame window; decoding is :mod:`videobooth_core.video_io`'s), ``layout`` (our
on-disk layout, captions, subject words), ``segment`` (Grounding DINO + SAM), ``build`` (the resumable builder),
``reader`` (torch Datasets for both layouts), ``check`` (``dataset check`` and ``dataset preview``), ``synthetic``
(a tiny generated set) and ``cli``.
Importing this package does no heavy work.
"""
