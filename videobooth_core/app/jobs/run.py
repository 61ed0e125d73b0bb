"""The run: every line validated and every output checked, the pipeline loaded once per rank, then each job of
this rank generated and written in order; a job failing at run time is recorded and the others go on."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import JobsError, VideoBoothError, explain, out_of_memory
from ...files import write_json_atomic
from ...settings import DEFAULT_ATTENTION, DEFAULT_DEVICE, DEFAULT_PRECISION, load_prompt_tokenizer
from .lines import job_request, load_jobs
from .ranks import peak_memory, process_group, rank_device, rank_info
from .records import (
    CLAIMS_DIR,
    DONE_DIR,
    FAILED_DIR,
    MANIFEST,
    check_outputs,
    cleanup_stale,
    done_record_path,
    finished_record,
    now,
    read_done_record,
    rebuild_manifest,
)
from .schema import BEST_OF_KEYS, CLI_ONLY_FLAGS, SETTINGS, VIDEOBOOTH, Job


@dataclass(frozen=True)
class RankRun:
    """What every item of one rank's run shares: where the outputs and records go, the whole jobs file (for the
    manifest), the models folder and dtype (recorded), and this rank's place and device."""

    out_dir: Path
    jobs: list[Job]
    """Every job of the file, not only this rank's: the manifest lists them all."""
    jobs_file: Path
    models: str
    dtype: str
    device: str
    rank: int
    world: int
    replace: frozenset[str] = frozenset()
    """Ids of the jobs allowed to replace their existing output (:func:`.records.check_outputs`)."""

    @property
    def tag(self) -> str:
        """The prefix of this rank's lines when several ranks print."""
        return f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""

    def rebuild_manifest(self) -> dict[str, Any]:
        return rebuild_manifest(self.out_dir, self.jobs, self.jobs_file, self.models, self.dtype)


def _defaults_from(args: argparse.Namespace) -> dict[str, Any]:
    """Every line's defaults: the command line's setting flags (each setting's dest is its jobs key) and its
    SD 1.x style files (relative to the current folder, as every path on the command line)."""
    from ...loading.lora import parse_lora_argument

    defaults = {key: getattr(args, key) for key in (*SETTINGS, *BEST_OF_KEYS) if getattr(args, key, None) is not None}
    if getattr(args, "base_checkpoint", None):
        defaults["base_checkpoint"] = str(Path(args.base_checkpoint).expanduser().resolve())
    if getattr(args, "lora", None):
        defaults["loras"] = tuple((str(Path(path).expanduser().resolve()), strength)
                                  for path, strength in map(parse_lora_argument, args.lora))
    if getattr(args, "lora_kv", None):
        defaults["lora_kv"] = args.lora_kv
    return defaults


def _check_args(args: argparse.Namespace) -> None:
    for attr, flag in CLI_ONLY_FLAGS.items():
        if getattr(args, attr, None) is not None:
            raise JobsError(f"{flag} does not go with --jobs: put it on each line of the jobs file (key {attr!r})")


def run_jobs(args: argparse.Namespace, videocrafter: bool = False) -> int:
    """Run a jobs file (the format and the rules: :mod:`videobooth_core.app.jobs`). Returns 0 when every job of this rank finished, 1 when
    some failed (each failure is reported on its own line and retried by the next run). ``videocrafter``: the
    models folder's VideoCrafter checkpoint (``--model`` picks one) runs every line."""
    start = time.perf_counter()
    _check_args(args)
    from ...evaluation.cli import find_metric_models

    family, model = VIDEOBOOTH, None
    if videocrafter:  # the checkpoint and its kind from its keys (cheap), before any line is read
        from ...videocrafter_pipeline import pick_videocrafter_model

        path, family = pick_videocrafter_model(args.models, getattr(args, "model", None))
        model = path.name

    rank, world, local_rank = rank_info()
    jobs_file = Path(args.jobs)
    out_dir = Path(args.out_dir)
    dtype = getattr(args, "dtype", None) or DEFAULT_PRECISION
    # validates every line (with the models folder's tokenizer, cheap) and the device before anything is written
    tokenizer = load_prompt_tokenizer(args.models) if family == VIDEOBOOTH else None  # VideoBooth's 77-token splice
    jobs = load_jobs(jobs_file, _defaults_from(args), tokenizer=tokenizer, device=getattr(args, "device", None),
                     family=family, model=model)
    # before any model loads: no output replaces what this batch did not write (unless --overwrite)
    replace = check_outputs(out_dir, jobs, dtype, overwrite=getattr(args, "overwrite", False))
    device = rank_device(getattr(args, "device", None) or DEFAULT_DEVICE, local_rank, world)
    run = RankRun(out_dir=out_dir, jobs=jobs, jobs_file=jobs_file, models=args.models, dtype=dtype, device=device,
                  rank=rank, world=world, replace=frozenset(replace))
    tag = run.tag

    with process_group(world) as dist:
        mine = [job for job in jobs if job.index % world == rank]
        todo, skipped = [], []
        for job in mine:  # read-only: a finished item has its output and a matching done-record
            if finished_record(out_dir, job, dtype) is not None:
                skipped.append(job)
                continue
            todo.append(job)
            if read_done_record(out_dir, job) is not None:
                print(f"{tag}redoing {job.id}: its line changed or its output is missing", file=sys.stderr)
        find_metric_models(args, _metric_needs(todo))  # best of N ranks with them: fail before any model loads
        print(f"{tag}{len(jobs)} jobs, {len(mine)} on this rank ({device}): {len(skipped)} already done, "
              f"{len(todo)} to generate", file=sys.stderr, flush=True)
        # load the models before writing anything: missing or broken weights leave no trace
        if not todo:
            pipe = None
        elif videocrafter:
            pipe = _load_videocrafter(args, dtype, device, tag)
        else:
            pipe = _load_pipeline(args.models, dtype, device, tag, getattr(args, "stream_weights", False))
        if pipe is not None and not videocrafter and getattr(args, "attention", DEFAULT_ATTENTION) != DEFAULT_ATTENTION:
            pipe.unet.set_attention_backend(args.attention)
        scorer = _load_scorer(args, todo, device, tag)

        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / DONE_DIR).mkdir(parents=True, exist_ok=True)
            for path in cleanup_stale(out_dir, jobs):
                print(f"{tag}removed {path} (left by an interrupted run)", file=sys.stderr)
        if dist is not None:
            dist.barrier()  # nobody writes before rank 0 has cleaned up

        done = failed = 0
        if todo:
            done, failed = _generate_all(pipe, scorer, todo, len(mine), run)
        run.rebuild_manifest()
        if dist is not None:
            dist.barrier()  # every rank's done-records are written
        manifest = run.rebuild_manifest() if rank == 0 else None

    summary = {"rank": rank, "world_size": world, "device": device, "jobs": len(mine), "done": done,
               "skipped": len(skipped), "failed": failed, "seconds": round(time.perf_counter() - start, 2),
               **peak_memory(device), "dtype": dtype}
    if manifest is not None:
        summary.update(manifest=str(out_dir / MANIFEST), finished=manifest["finished"], total=manifest["total"])
    print(f"{tag}finished: " + json.dumps(summary), flush=True)
    return 1 if failed else 0


def _load_pipeline(models: str, dtype: str, device: str, tag: str, stream_weights: bool = False):
    import torch

    from ...pipeline import VideoBoothPipeline

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    load_start = time.perf_counter()
    pipe = VideoBoothPipeline.from_models_dir(models, dtype=dtype, device=device, stream_weights=stream_weights)
    print(f"{tag}models loaded from {models} in {time.perf_counter() - load_start:.1f} s", file=sys.stderr, flush=True)
    return pipe


def _load_videocrafter(args: argparse.Namespace, dtype: str, device: str, tag: str):
    """The models folder's VideoCrafter model (``--model``, ``--text-encoder``, ``--image-encoder`` as for one
    video)."""
    import torch

    from ...loading.checkpoint import parse_dtype
    from ...videocrafter_pipeline import VideoCrafterPipeline

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    load_start = time.perf_counter()
    pipe = VideoCrafterPipeline.from_models_dir(args.models, getattr(args, "model", None), dtype=parse_dtype(dtype),
                                                device=torch.device(device),
                                                text_encoder=getattr(args, "text_encoder", None),
                                                image_encoder=getattr(args, "image_encoder", None))
    print(f"{tag}{pipe.kind} loaded from {args.models} in {time.perf_counter() - load_start:.1f} s", file=sys.stderr,
          flush=True)
    return pipe


def _metric_needs(todo: list[Job]) -> tuple[str, ...]:
    """The metric models the best-of jobs of ``todo`` rank by ("clip", "dino")."""
    from ...evaluation.metrics import RANK_CHOICES

    return tuple(sorted({"clip" if RANK_CHOICES[job.rank_by] != "dino" else "dino" for job in todo
                         if job.best_of > 1}))


def _load_scorer(args: argparse.Namespace, todo: list[Job], device: str, tag: str):
    """The metric models the best-of jobs of this rank rank by, loaded once (None when no job needs one)."""
    need = _metric_needs(todo)
    if not need:
        return None
    from ...evaluation.cli import load_scorer

    scorer = load_scorer(args, need, device=device, strict=True)
    print(f"{tag}metric models loaded for best of N: " + ", ".join(
        m.source for m in (scorer.clip, scorer.dino) if m is not None), file=sys.stderr, flush=True)
    return scorer


def _generate_all(pipe, scorer: Any, todo: list[Job], n_mine: int, run: RankRun) -> tuple[int, int]:
    """Generate and write ``todo`` (this rank's unfinished jobs, of ``n_mine``) in order; a job that fails at run
    time is recorded and the rest go on. Returns (done, failed)."""
    out_dir, dtype, device, tag = run.out_dir, run.dtype, run.device, run.tag
    done = failed = 0
    for number, job in enumerate(todo, start=1):
        item_start = time.perf_counter()
        memory = False
        try:
            result, seed, best_of = _generate_one(pipe, job, out_dir, f"{tag}{job.id} ({number}/{len(todo)})",
                                                  overwrite=job.id in run.replace, scorer=scorer)
        except Exception as error:  # noqa: BLE001 - classified below; anything unknown is re-raised
            reason = _failure_reason(error)
            if reason is None:
                raise
            memory = out_of_memory(error) is not None
        else:
            reason = None
        if reason is not None:
            if memory:
                _free_memory(device)
            failed += 1
            print(f"{tag}error: line {job.line} (job {job.id}): {reason}", file=sys.stderr, flush=True)
            write_json_atomic(out_dir / FAILED_DIR / f"{job.id}.json", {
                "id": job.id, "line": job.line, "output": job.out, "error": reason, "rank": run.rank,
                "failed_at": now(), "fingerprint": job.fingerprint(dtype)})
            run.rebuild_manifest()
            continue
        seconds = time.perf_counter() - item_start
        record = {
            "id": job.id, "line": job.line, "output": job.out, **({"latents": job.latents} if job.latents else {}),
            "seed": seed, **best_of,
            "settings": job.describe(), "dtype": dtype,
            "prompt_used": getattr(result, "prompt_used", job.prompt),  # VideoCrafter: the prompt as given
            "seconds": round(seconds, 2), "rank": run.rank, "world_size": run.world, "device": device,
            "finished_at": now(), "fingerprint": job.fingerprint(dtype),
        }
        write_json_atomic(done_record_path(out_dir, job.id), record)  # after the output: done means done
        for stale in (out_dir / CLAIMS_DIR / f"{job.id}.json", out_dir / FAILED_DIR / f"{job.id}.json"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        run.rebuild_manifest()
        done += 1
        print(f"{tag}done {job.id} ({number}/{len(todo)}, {n_mine} on this rank): " + json.dumps({
            "output": str(out_dir / job.out), **({"latents": str(out_dir / job.latents)} if job.latents else {}),
            "seconds": round(seconds, 2), **peak_memory(device),
            **_what_ran(job, result), "seed": seed, **best_of, "prompt_used": record["prompt_used"],
        }), flush=True)
    return done, failed


def _what_ran(job: Job, result: Any) -> dict[str, Any]:
    """A finished job's frames, size, steps, sampler and guidance, as the run's log line shows them (VideoCrafter:
    the request as resolved for its checkpoint kind)."""
    if job.family != VIDEOBOOTH:
        r = result.request
        return {"frames": r.frames, "size": [r.width, r.height], "steps": r.steps, "sampler": r.sampler,
                "cfg": r.guidance, "model": job.model}
    return {"frames": job.settings["frames"], "size": [job.settings["width"], job.settings["height"]],
            "steps": job.settings["steps"], "sampler": job.settings["sampler"], "cfg": job.settings["cfg"]}


def _write_fps(job: Job) -> float:
    """The output file's frame rate: the line's fps (VideoCrafter: its fps conditioning when given, else
    VideoBooth's default, as ``generate`` writes a VideoCrafter video)."""
    if job.family != VIDEOBOOTH:
        return job.settings["fps"] or SETTINGS["fps"].default
    return job.settings["fps"]


def _generate_one(pipe, job: Job, out_dir: Path, label: str, overwrite: bool,
                  scorer: Any = None) -> tuple[Any, int, dict[str, Any]]:
    """Generate ``job`` and write its output (claimed first, so that a rerun after a kill between the output
    and its done-record knows the output is this job's). Returns the result, the seed that alone reproduces it,
    and for best of N ``{"best_of": {"n", "rank_by", "candidates": [{"seed", scores...}, best first]}}``."""
    request = job_request(job)  # validated by the pipeline, which prepares the photos once
    try:  # the styles are undone in the finally, even after a failure, so the next line starts from plain weights
        if job.styled:
            for line in pipe.use_sd_models(job.base_checkpoint, job.loras, job.lora_kv):
                print(f"{label}: {line}", file=sys.stderr, flush=True)
        return _sample_and_write(pipe, job, request, out_dir, label, overwrite, scorer)
    finally:
        if job.styled:  # a plain line never touches the weights
            pipe.restore_weights()


def _sample_and_write(pipe, job: Job, request: Any, out_dir: Path, label: str, overwrite: bool,
                      scorer: Any) -> tuple[Any, int, dict[str, Any]]:
    from ...latents_file import write_result
    from ..common import progress_callback

    if job.best_of > 1:
        from ...evaluation.best_of import generate_best_of

        ranked = generate_best_of(pipe, request, job.best_of, job.rank_by, scorer,
                                  callback=_candidates_progress(label, job.best_of))
        result, seed = ranked[0].result, ranked[0].seed
        best_of = {"best_of": {"n": job.best_of, "rank_by": job.rank_by,
                               "candidates": [{"seed": c.seed, **c.scores} for c in ranked]}}
    else:
        result = pipe.generate(request, callback=progress_callback(label))
        seed, best_of = job.settings["seed"], {}
    output = out_dir / job.out
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / CLAIMS_DIR / f"{job.id}.json", {"id": job.id, "output": job.out, "claimed_at": now()})
    write_result(result, output, _write_fps(job), overwrite=overwrite, save=job.latents is not None)
    return result, seed, best_of


def _candidates_progress(label: str, n: int):
    """A progress bar per candidate of best of N (each sampling run counts its steps from 0)."""
    from ..common import progress_callback

    state: dict[str, Any] = {"count": 0, "bar": None}

    def callback(step: int, total: int, output: Any) -> None:
        if step == 0 or state["bar"] is None:
            state["count"] += 1
            state["bar"] = progress_callback(f"{label} candidate {state['count']}/{n}")
        state["bar"](step, total, output)

    return callback


def _failure_reason(error: Exception) -> str | None:
    """One line saying why a job failed, for failures of one job (bad input only visible with the models loaded,
    out of memory, a failed write); None for anything else (a bug: the run stops and the CLI logs it)."""
    memory = out_of_memory(error)
    if memory is not None:
        return str(memory)
    if isinstance(error, VideoBoothError):
        return " ".join(str(error).split())
    if isinstance(error, OSError):
        return explain("a file could not be written", " ".join(str(error).split()),
                       "check free space and permissions of --out-dir")
    return None


def _free_memory(device: str) -> None:
    """Give back what a job that ran out of memory held, so that the next (perhaps smaller) job can run."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()