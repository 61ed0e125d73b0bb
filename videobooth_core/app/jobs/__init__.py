"""Batch generation: ``python -m videobooth_core generate --models DIR --jobs FILE.jsonl --out-dir OUT``.

The jobs file holds one JSON object per line, with keys named like the command line's flags::

    {"id": "dog", "prompt": "a dog running on the beach", "word": "dog", "image": "dog.jpg", "mask": "dog_mask.png"}
    {"prompt": "a cat sleeping on a sofa", "frames": 16, "steps": 50, "seed": 3, "out": "cat.mp4"}

Keys: ``prompt`` (required), ``word``, ``image``, ``mask``, ``bbox`` ([x1, y1, x2, y2]), ``subjects`` (several
subjects: ``[{"word", "image", "mask"?, "strength"?, "region"?, "bbox"?}, ...]``, see :mod:`.subjects`), ``out``, ``id``, and
every setting of :data:`videobooth_core.settings.SETTINGS` under its flag's name: ``negative``, ``frames``,
``width``, ``height``, ``steps``, ``sampler``, ``spacing``, ``eta``, ``cfg``, ``guidance``, ``seed``, ``padding``,
``subject_match``, ``fps``, ``single_frame_image_prompt`` (true/false), ``image_prompt_steps`` ([start, end]),
``watermark_branch`` (false = ``--no-watermark-branch``), ``image_prompt_strength`` and ``save_latents`` (true:
the final latents beside the output as ``<out>.latents.safetensors``, named in the done-record and the manifest as
``latents``, so ``evaluate --manifest M --reference R`` computes the latent MSE; ``--save-latents`` sets it for
every line); and best of N,
``best_of`` (N seeds: seed, seed + 1, ...; the best is written) and ``rank_by`` (``dino``, ``clip-i``,
``clip-t``); and SD 1.x styles, ``base_checkpoint`` (a file or diffusers UNet folder), ``loras`` (a list of
``[path, strength]`` or ``"path:strength"``) and ``lora_kv`` (``mapper`` or ``ignore``), applied before the
line generates and undone exactly after it, so lines never leak styles into each other (the files' sizes and
modification times enter the resume fingerprint; ``--base-checkpoint``, ``--lora`` and ``--lora-kv`` set every
line's default). Settings a line leaves out come from the command line (``--steps 50`` sets every job's default);
``--dtype``, ``--device``, ``--stream-weights`` and the metric models ``--clip`` and ``--dino`` hold for the
whole run (the metric models load once per rank, and only if some job of the rank ranks by them). ``id``
defaults to the line number, zero-padded (``00001``); ``out`` defaults to ``<id>.gif`` and is relative to
``--out-dir`` (``.mp4``, ``.gif``, ``.webp``, or no suffix for a folder of PNG frames). Relative image and
mask, checkpoint and LoRA paths are resolved against the jobs file's folder. Blank lines are ignored.
Long videos: ``context_window``, ``context_overlap``, ``context_fuse``, ``noise_reuse`` (settings), and the
first frames, ``start_image`` (an image) or ``extend`` (a video continued from its last ``extend_frames``
frames), paths like ``image``.

A VideoCrafter models folder (``generate`` picks the family as for one video; ``--model`` when it holds several)
runs every line with its checkpoint: a line holds ``prompt``, ``start_image`` (the image-to-video model), ``id``,
``out`` and the settings of :data:`videobooth_core.settings.VIDEOCRAFTER_SETTINGS` (``negative``, ``frames``,
``width``, ``height``, ``steps``, ``eta``, ``cfg``, ``fps``, ``seed``, ``context_window``, ``context_overlap``,
``context_fuse``; width, height and fps left out: the checkpoint kind's), through the one request builder
(``app.request.build_videocrafter_request``); other keys are refused by name, and the checkpoint's kind and file
name enter the resume fingerprint.

Every line is validated (JSON, keys, values, images, masks, style files' existence, subject words, the
prompt's fit in CLIP's 77 tokens with the models folder's tokenizer) and the device checked before anything is
written or any model loads: the first problem ends the run with exit code 2 and one line naming the line number.

Under ``torchrun`` the jobs are sharded across the ranks (job ``i`` goes to rank ``i % WORLD_SIZE``), one
device per rank (``--device cuda`` becomes ``cuda:LOCAL_RANK``; CPU ranks work too). Each rank loads the
pipeline once, and only if it has work left.

Outputs. ``out`` names a new path inside ``--out-dir`` (relative, no ``..``, no hidden names, not the folder
itself). Before any model loads, every output that already exists is refused unless this job wrote it (its
done-record or its claim, see below, names it) or ``--overwrite`` is given; even then a folder is replaced
only when it holds nothing but PNG frames, so other jobs' and the user's files are never replaced.

Resuming. Before writing its output an item records a claim ``OUT/.videobooth/claims/<id>.json``; the output
is written atomically by :func:`videobooth_core.video_io.write_frames`, then the done-record
``OUT/.videobooth/done/<id>.json`` (written atomically: temporary file, ``os.replace``). An item is skipped when
its output (with ``save_latents``, also its latents file) and its done-record both exist and the record's settings
match the job's (a job whose latents file is gone is redone), so a killed run restarted with the same command redoes
only unfinished items; a job whose line changed is redone (replacing its own earlier output).
``OUT/manifest.json`` lists every finished item of the jobs file (id, output, seed, settings, seconds, rank; for
best of N, ``seed`` is the winner's, which alone reproduces the output, and ``best_of`` lists every candidate's
seed and scores, best first)
and every failed one (id, line, output, error); it is rebuilt from the records - under an exclusive file lock
(``filelock``), after every item and at the end, and by rank 0 once more after all ranks have finished - so
concurrent ranks never lose each other's entries. Temporary files left by a killed run (``.videobooth-*.partial``
files and folders) are removed on start, so one output folder serves one run at a time (the ranks of one
torchrun launch count as one run).

A job that fails at run time (out of memory; a failed write; a problem only visible with the models loaded) is
reported on its own ``error:`` line and recorded with its reason in ``OUT/.videobooth/failed/<id>.json`` and the
manifest's ``failed`` list; the other jobs go on, the run exits with 1 and the next run retries it. Missing or
broken weights end the run (exit 2) before anything is written.

The package: :mod:`.schema` (the keys and :class:`Job`), :mod:`.lines` (reading and validating the file, the
request of a line through the one request builder, :mod:`videobooth_core.app.request`), :mod:`.records` (claims,
done- and failure records, output checks, the manifest),
:mod:`.ranks` (torchrun ranks and devices) and :mod:`.run` (the run loop).
"""

from __future__ import annotations

from .lines import check_job, job_request, load_jobs, parse_line
from .run import run_jobs
from .schema import Job

__all__ = ["Job", "check_job", "job_request", "load_jobs", "parse_line", "run_jobs"]
