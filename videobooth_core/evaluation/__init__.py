"""Measuring what VideoBooth makes: the paper's metrics (CLIP-T, CLIP-I, DINO) and VBench's subject consistency,
best-of-N generation ranked by one of them, and the ``evaluate`` command with its report.

    models.py    finding and loading the metric models (a full CLIP, DINO ViT-S/16) with their own processors
    metrics.py   the scores of one video (:class:`Scorer`)
    drift.py     per-frame likeness to the image prompt across a video (DINO, else CLIP-I), its figures and plot
    media.py     reading the videos (through :mod:`videobooth_core.video_io`) and the evaluation sets
    compare.py   ``evaluate --reference``: each video against the reference of its seed, prompt and image prompt,
                 the latent MSE, the table and chart per configuration
    report.py    scores.csv / scores.json, the HTML page, the PNG sheet and the charts (matplotlib, optional)
    best_of.py   best-of-N generation: N seeds, ranked by a metric
    cli.py       ``python -m videobooth_core evaluate`` and the ``generate --best-of`` flags

Importing this package does no heavy work (torch and transformers are imported inside the functions).
"""
