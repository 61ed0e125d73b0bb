"""The coarse-to-fine trainer (issue 13) on the tiny models and a two-clip synthetic dataset, on the CPU.

Sizes are the smallest the reader allows to keep this fast: 64x64 frames (8x8 latents), 2 frames per clip.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from videobooth_core.training.config import TrainConfig, TrainingError

# the memory check (a ~3 s dry run per start) has its own test
from training_helpers import SMALL, dataset_without_the_word, one_thread, synth  # noqa: F401  (module fixtures)


def config(tiny_models: Path, synth: Path, out: Path, stage: int | str, **kwargs) -> TrainConfig:
    mapper = str(tiny_models / "videobooth" / "mapper.pt") if stage == 2 else None
    settings = {**SMALL, "mapper": mapper, **kwargs}
    return TrainConfig(stage=stage, data=str(synth), models=str(tiny_models), out=str(out), **settings)


def state(models: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.detach().clone() for name in ("unet", "vae", "text", "vision", "mapper")
            for key, value in models[name].state_dict().items()}


@pytest.mark.parametrize("stage", [1, 2])
def test_exactly_the_stage_parameters_train(tiny_models, synth, tmp_path, stage):
    from videobooth_core.training.loop import load_training_models, set_trainable, train
    from videobooth_core.training.model import BatchMaker, TrainingModule

    cfg = config(tiny_models, synth, tmp_path / "run", stage, steps=2, lr=1e-2)
    models = load_training_models(cfg, torch.device("cpu"))
    trainable = set_trainable(models["mapper"], stage)
    names = {name for name, p in models["mapper"].named_parameters() if any(p is q for q in trainable)}
    if stage == 1:
        assert names and all(n.startswith("mapping_") or n.endswith(("attn2_to_k.weight", "attn2_to_v.weight"))
                             for n in names)
        assert sum(n.endswith("attn2_to_k.weight") for n in names) == len(models["unet"].attention_sites)
        assert not any("attn1" in n for n in names)
    else:
        assert names == {name for name, _ in models["mapper"].named_parameters()}
        # the official stage-2 initialisation: attn1 _new/_exemplar are copies of the UNet's attn1 to_k/to_v
        site = models["unet"].attention_sites[0]
        stem = site.site.replace(".", "_") + "_transformer_blocks_0_attn1_to_k_exemplar"
        assert torch.equal(getattr(models["mapper"], stem).weight, site.transformer_blocks[0].attn1.to_k.weight)

    # one backward: gradients reach exactly the stage's parameters
    from videobooth_core.dataset.reader import OurDataset

    dataset = OurDataset(synth, stage=stage, size=cfg.size, clip_frames=cfg.frames, seed=0)
    maker = BatchMaker(cfg, models["vae"], models["vision"], models["text"], models["tokenizer"], torch.device("cpu"))
    loss, _, _ = TrainingModule(models["mapper"], models["unet"], models["text"], cfg.reg_weight)(
        maker([dataset[0], dataset[1]], [0, 1]))
    loss.backward()
    for name, param in models["mapper"].named_parameters():
        has_grad = param.grad is not None and bool(param.grad.abs().sum() > 0)
        assert has_grad == (name in names), name
        param.grad = None
    for key in ("unet", "vae", "text", "vision"):
        assert all(p.grad is None for p in models[key].parameters()), key

    before = state(models)
    train(cfg, models=models)
    after = state(models)
    for key, value in before.items():
        mapper_name = key.removeprefix("mapper.")
        if key.startswith("mapper.") and mapper_name in names:
            assert not torch.equal(value, after[key]), f"{key} did not change"
        else:
            assert torch.equal(value, after[key]), f"frozen {key} changed"


@pytest.mark.parametrize("stage", [1, 2])
def test_loss_is_the_inference_denoisers_error_plus_the_regulariser(tiny_models, synth, tmp_path, stage):
    from videobooth_core.conditioning.embeddings import encode_image_prompt, encode_prompt
    from videobooth_core.conditioning.text import NULL_PROMPT, encode_text, tokenize
    from videobooth_core.dataset.reader import OurDataset
    from videobooth_core.sampling.denoiser import VideoDenoiser
    from videobooth_core.sampling.schedule import respaced_timesteps
    from videobooth_core.training.loop import load_training_models
    from videobooth_core.training.model import BatchMaker, TrainingModule

    cfg = config(tiny_models, synth, tmp_path / "run", stage, cond_dropout=0.0)
    models = load_training_models(cfg, torch.device("cpu"))
    sample = OurDataset(synth, stage=stage, size=cfg.size, clip_frames=cfg.frames, seed=3)[1]
    batch = BatchMaker(cfg, models["vae"], models["vision"], models["text"], models["tokenizer"],
                       torch.device("cpu"))([sample], [7])
    loss, mse, reg = TrainingModule(models["mapper"], models["unet"], models["text"], cfg.reg_weight)(batch)
    timestep = int(batch.timesteps[0])
    assert timestep in respaced_timesteps(1000, 250)
    assert (batch.exemplar is not None) == (stage == 2)

    # independently, through the inference path: coarse embedding, the denoiser's conditional pass; the text states
    # are the official training splice over the class word itself (the tiny tokenizer's placeholder "s dksd" starts
    # with a token that other words of the caption also hold, so the inference splice of ``encode_prompt`` would
    # splice there too; with CLIP's tokenizer both splices agree on a word named once, see test_training_start)
    prompt = types.SimpleNamespace(clip_pixels=sample["image_prompt_clip_augmented"][None])
    injected = encode_image_prompt(models["vision"], models["mapper"], prompt)
    word_ids = tuple(models["tokenizer"](sample["word"], add_special_tokens=False).input_ids)
    cond = encode_text(models["text"], tokenize(models["tokenizer"], sample["caption"]), injected,
                       word_ids).last_hidden_state
    null, _ = encode_prompt(models["text"], models["tokenizer"], NULL_PROMPT)
    denoiser = VideoDenoiser(models["unet"], cond, null, cfg_scale=1.0, guidance="all", batch_passes=False)
    with torch.no_grad():
        _, eps_cond, eps_uncond = denoiser.predict(batch.noisy, timestep, batch.exemplar)
    assert eps_uncond is None
    expected = torch.mean((eps_cond - batch.noise) ** 2) + 0.01 * injected.abs().mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(reg, injected.abs().mean(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("stage", [1, 2])
def test_each_stage_overfits_two_clips(tiny_models, synth, tmp_path, stage):
    from videobooth_core.training.loop import train

    # one clip per step and one frame per clip: the same two clips memorised, ~30 % less time per step than 2 x 2
    cfg = config(tiny_models, synth, tmp_path / "run", stage, steps=80, lr=3e-3, overfit=True, batch_size=1,
                 frames=1, checkpoint_every=1000)
    train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 80
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last <= 0.5 * first, (first, last)


def _train_command(tiny_models: Path, synth: Path, out: Path, *extra: str, stage: int | str = 2) -> list[str]:
    """``python -m videobooth_core train`` on the tiny models: stage 2 from the tiny mapper by default; ``stage``
    ``"distill"``: the LoRA of :data:`DISTILL_LORA` (the stage starts from the models folder's mapper)."""
    import sys

    start = ["--mapper", str(tiny_models / "videobooth" / "mapper.pt")] if stage == 2 else []
    lora = [f"--{key.replace('_', '-')}={value}" for key, value in DISTILL_LORA.items()] if stage == "distill" else []
    return [sys.executable, "-m", "videobooth_core", "train", "--stage", str(stage), "--data", str(synth), "--models",
            str(tiny_models), *start, *lora, "--size", "64", "--frames", "2",
            "--cpu", "--no-progress", "--no-tensorboard", "--no-memory-check", "--log-every", "1", "--out", str(out),
            *extra]


DISTILL_LORA = {"lora_rank": 4, "lora_alpha": 4.0}
"""The distillation stage's LoRA in these tests: small, so a step takes a fraction of a second."""


def _subprocess_env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(progress, mapper weights, EMA state) of a checkpoint folder, read as a user would (no pickles)."""
    from safetensors.torch import load_file

    from videobooth_core.training.state import MODEL_FILE, PROGRESS_FILE

    progress = torch.load(folder / PROGRESS_FILE, weights_only=True)
    mapper = {k.removeprefix("mapper."): v for k, v in load_file(folder / MODEL_FILE).items()}
    return progress, mapper, torch.load(folder / "custom_checkpoint_1.pkl", weights_only=True)


def _start_and_wait(command: list[str], ready: Callable[[], bool]):
    """``command`` in a subprocess, returned once ``ready()`` holds (polled on the file system) while it runs."""
    import subprocess
    import time

    process = subprocess.Popen(command, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    return process


def test_sigterm_writes_a_checkpoint_as_ctrl_c_does(tiny_models, synth, tmp_path):
    """A scheduler's SIGTERM, sent from outside once the run has logged a step, ends the run as Ctrl-C does: a
    checkpoint of the step it stopped after, one error line, exit code 143 (128 + SIGTERM)."""
    import signal

    from videobooth_core.training.loop import RESULT_NAME, list_checkpoints

    out = tmp_path / "stopped"
    metrics = out / "metrics.jsonl"
    process = _start_and_wait(_train_command(tiny_models, synth, out, "--steps", "1000", "--batch-size", "1"),
                              lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM)", stderr[-2000:]
    checkpoints = list_checkpoints(config(tiny_models, synth, out, 2))
    assert len(checkpoints) == 1  # --checkpoint-every is 1000: only SIGTERM wrote it
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    step = _checkpoint(checkpoints[0])[0]["step"]
    assert checkpoints[0].name == f"step_{step:08d}" and 1 <= logged[-1] <= step <= logged[-1] + 1 < 1000
    assert not (out / RESULT_NAME).exists()


def test_sigkilled_run_resumes_bit_identically_and_ctrl_c_checkpoints(tiny_models, synth, tmp_path):
    """A run SIGKILLed from outside while it writes its second checkpoint (or just after) resumes from whatever
    last complete checkpoint it left and ends bit-identical to an uninterrupted run; a half-written checkpoint is
    never read and is cleaned up."""
    import signal

    from safetensors.torch import load_file

    from videobooth_core.files import is_temporary
    from videobooth_core.training.loop import list_checkpoints, load_training_models, read_checkpoint_info, train

    def run(out: str, **kwargs) -> TrainConfig:
        return config(tiny_models, synth, tmp_path / out, 2, steps=5, cpu=True, checkpoint_every=1000, **kwargs)

    uninterrupted = train(run("a"))

    folder = tmp_path / "b" / "checkpoints"

    def writing_the_second() -> bool:  # step 1 complete, step 2 started (its temporary folder) or complete
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        return "step_00000001" in names and any("step_00000002" in name for name in names)

    process = _start_and_wait(_train_command(tiny_models, synth, tmp_path / "b", "--steps", "5",
                                             "--checkpoint-every", "1", "--batch-size", "2"), writing_the_second)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]
    left = [int(p.name.removeprefix("step_")) for p in list_checkpoints(run("b"))]
    assert left and left[0] >= 1 and left[-1] < 4, left  # killed at step 2's checkpoint, not after the run

    def stop_at(step_to_stop: int):
        def hook(step: int, _loss: float) -> None:
            if step == step_to_stop:
                raise KeyboardInterrupt("stop")
        return hook

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C writes a checkpoint of the step it stopped after
        train(run("b", resume="latest"), on_step=stop_at(left[-1] + 1))
    assert list_checkpoints(run("b"))[-1].name == f"step_{left[-1] + 1:08d}"
    resumed = train(run("b", resume="latest"))

    a, b = load_file(uninterrupted), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final_a, final_b = _checkpoint(list_checkpoints(run("a"))[-1]), _checkpoint(list_checkpoints(run("b"))[-1])
    assert final_a[0]["step"] == final_b[0]["step"] == 5
    for part in (1, 2):  # the mapper and the EMA
        assert final_a[part].keys() == final_b[part].keys()
        assert all(torch.equal(final_a[part][k], final_b[part][k]) for k in final_a[part])
    metrics = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4, 5]
    assert not [p.name for p in folder.iterdir() if is_temporary(p)]  # a killed write's folder was replaced

    # a checkpoint of another stage is refused with a one-line reason
    from videobooth_core.training.model import TrainingModule

    models = load_training_models(run("b"), torch.device("cpu"))
    trained = TrainingModule(models["mapper"], models["unet"], models["text"], 0.01)
    other = config(tiny_models, synth, tmp_path / "b", 1)
    with pytest.raises(TrainingError, match="stage 2"):
        read_checkpoint_info(list_checkpoints(run("b"))[-1], other, trained)
    # a checkpoint whose registered-object file holds more than weights (a pickled callable) is refused unread
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(list_checkpoints(run("b"))[-1], foreign)
    torch.save({"lr_lambdas": [print]}, foreign / "custom_checkpoint_2.pkl")
    with pytest.raises(TrainingError, match="not weights only.*custom_checkpoint_2.pkl"):
        read_checkpoint_info(foreign, run("b"), trained)
    # and a finished run's folder is not silently restarted
    with pytest.raises(TrainingError, match="--resume latest"):
        train(run("b"))


def test_checkpoints_of_the_earlier_trainer_are_refused_by_name(tiny_models, synth, tmp_path):
    """A step_*.pt file (the trainer's checkpoints before they were accelerate folders) is not read: --resume latest
    over a folder holding only those, and --resume naming one, say what it is and what to do, before any model
    loads."""
    from videobooth_core.app.cli import main
    from videobooth_core.training.state import resume_folder

    old = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"PK\x03\x04 a torch.save file")
    with pytest.raises(TrainingError, match="only checkpoints of an earlier trainer.*cannot be resumed"):
        resume_folder(config(tiny_models, synth, tmp_path / "run", 2, resume="latest"))
    with pytest.raises(TrainingError, match="not a training checkpoint.*step_00000002.pt.*before version 2"):
        resume_folder(config(tiny_models, synth, tmp_path / "run", 2, resume=str(old)))
    assert main(_train_command(tiny_models, synth, tmp_path / "run", "--resume", str(old))[3:]) == 2
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["checkpoints", "step_00000002.pt"]


def test_cached_inputs_train_exactly_as_live_ones(tiny_models, synth, tmp_path):
    """--cache: the clips' VAE posteriors are encoded once; the run's losses and weights equal the uncached run's
    bit for bit (stage 2 with condition dropout 0.5 covers the cached grey exemplar too), and the VAE no longer
    sees the clips during the steps."""
    from safetensors.torch import load_file

    from videobooth_core.training.cache import EncoderCache
    from videobooth_core.training.loop import load_training_models, train

    runs = {}
    for name in ("live", "cached"):
        cfg = config(tiny_models, synth, tmp_path / name, 2, steps=3, cond_dropout=0.5, lr=1e-3,
                     cache=str(tmp_path / "cache") if name == "cached" else None)
        models = load_training_models(cfg, torch.device("cpu"))
        encode, seen, progress = models["vae"].encode, [], {"step": 0}

        def counted(pixels, *args, _encode=encode, _seen=seen, _progress=progress, **kwargs):
            _seen.append((_progress["step"], pixels.shape[0]))
            return _encode(pixels, *args, **kwargs)

        models["vae"].encode = counted
        result = train(cfg, models=models, on_step=lambda step, _loss, _p=progress: _p.update(step=step))
        losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (load_file(result), losses, [size for step, size in seen if step >= 1])
    (live_mapper, live_losses, live_calls), (cached_mapper, cached_losses, cached_calls) = runs["live"], runs["cached"]
    assert cached_losses == live_losses and len(live_losses) == 3
    assert all(torch.equal(live_mapper[k], cached_mapper[k]) for k in live_mapper)
    # steps 2-3: the live run encodes each clip's 2 frames; the cached run only image prompts (and the grey once)
    assert live_calls.count(2) >= 4 and cached_calls.count(2) <= 1 and len(cached_calls) < len(live_calls)

    cache = EncoderCache(tmp_path / "cache", 64, 2, tiny_models / "vae" / "videobooth_tiny_vae.safetensors")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "index.json", "synth_0000.safetensors", "synth_0001.safetensors"]
    with pytest.raises(TrainingError, match="another frame size"):
        EncoderCache(tmp_path / "cache", 128, 2, "vae.safetensors").check_index()
    assert cache.posterior("synth_0001", torch.tensor([1, 0]), True)[0].shape == (2, 4, 8, 8)


def test_memory_check_stops_before_training_and_names_the_fixes(tiny_models, synth, tmp_path, monkeypatch):
    from videobooth_core.training.loop import load_training_models, set_trainable, train
    from videobooth_core.training.memory import added_bytes, check_training_memory, estimate_training_memory

    cfg = config(tiny_models, synth, tmp_path / "run", 2)
    models = load_training_models(cfg, torch.device("cpu"))
    params = set_trainable(models["mapper"], 2)
    plain = estimate_training_memory(cfg, models, params, "cpu")
    assert plain.weights_bytes > sum(p.numel() * 4 for p in models["unet"].parameters()) and plain.activations_bytes > 0
    checkpointed = estimate_training_memory(
        config(tiny_models, synth, tmp_path / "run", 2, gradient_checkpointing=True), models, params, "cpu")
    bf16 = estimate_training_memory(config(tiny_models, synth, tmp_path / "run", 2, mixed_precision="bf16"),
                                    models, params, "cpu")
    larger = estimate_training_memory(config(tiny_models, synth, tmp_path / "run", 2, batch_size=4), models, params,
                                      "cpu")
    assert checkpointed.activations_bytes < plain.activations_bytes
    assert bf16.activations_bytes < plain.activations_bytes < larger.activations_bytes
    with pytest.raises(TrainingError) as error:  # a fake small device
        check_training_memory(cfg, models, params, "cpu", available=added_bytes(plain, params) - 1)
    message = str(error.value)
    assert "GB" in message and "--gradient-checkpointing" in message and "bf16" in message
    assert "--batch-size 1" in message
    passed = check_training_memory(cfg, models, params, "cpu", available=added_bytes(plain, params) + 1)
    assert passed.activations_bytes == plain.activations_bytes

    # train() runs the check before anything else is slow (a device reporting 1 MB free)
    import videobooth_core.training.memory as memory

    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 2**20)
    with pytest.raises(TrainingError, match="too little memory"):
        train(config(tiny_models, synth, tmp_path / "checked", 2, steps=1, memory_check=True), models=models)
    assert not (tmp_path / "checked" / "metrics.jsonl").exists()


def test_exported_mapper_loads_and_changes_generation(tiny_models, synth, tmp_path):
    from videobooth_core.conditioning.image_prompt import load_mask
    from videobooth_core.dataset.layout import list_entries
    from videobooth_core.video_io import read_frames
    from videobooth_core.loading.checkpoint import load_mapper
    from videobooth_core.loading.models_dir import kind_of
    from videobooth_core.pipeline import GenerationRequest, VideoBoothPipeline
    from videobooth_core.training.loop import train

    result = train(config(tiny_models, synth, tmp_path / "run", 2, steps=3, lr=1e-2, validate_every=3,
                          validation_clips=1, validation_steps=2, tensorboard=True))
    assert result.name == "videobooth_mapper.safetensors" and kind_of(result) == "videobooth_mapper"
    # Accelerator.log feeds metrics.jsonl (plain names) and TensorBoard (the train/ tag group) the same numbers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "videobooth"))
    events.Reload()
    assert [r["step"] for r in records] == [1, 2, 3] and {"loss", "mse", "reg", "lr"} <= records[0].keys()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert [p.name for p in (tmp_path / "run" / "validation").iterdir()] == ["step_00000003_synth_0000.gif"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    released = load_mapper(tiny_models / "videobooth" / "mapper.pt")
    trained = load_mapper(result)
    assert trained.state_dict().keys() == released.state_dict().keys()

    entry = list_entries(synth)[0]
    info = json.loads((entry / "entry.json").read_text())
    image = read_frames(entry / "video.mp4", [0])[0]
    request = GenerationRequest(prompt=info["caption"], subject_word=info["word"], image=image,
                                mask=load_mask(entry / "mask_1.png"), frames=2, width=64, height=64, steps=2, seed=1)
    outputs = []
    for mapper in (None, result):
        pipe = VideoBoothPipeline.from_models_dir(str(tiny_models), **({"mapper": mapper} if mapper else {}))
        outputs.append(pipe.generate(request, decode=False).latents)
    assert outputs[0].shape == outputs[1].shape and not torch.allclose(outputs[0], outputs[1])

    # the validation videos are the pipeline's video of the same request, made from the same stages
    from videobooth_core.training.watch import validation_frames

    models = {"unet": pipe.unet, "vae": pipe.vae, "text": pipe.text_encoder, "vision": pipe.vision_encoder,
              "tokenizer": pipe.tokenizer}
    video = validation_frames(models, pipe.mapper, request.prompt, request.subject_word, request.image, request.mask,
                              frames=2, size=64, steps=2, seed=1)
    assert video.dtype == torch.uint8 and torch.equal(video, pipe.generate(request).frames)
    # and the distillation stage's (the lcm sampler): the pipeline's video of the lcm request
    lcm = GenerationRequest(prompt=info["caption"], subject_word=info["word"], image=image,
                            mask=load_mask(entry / "mask_1.png"), frames=2, width=64, height=64, steps=2, seed=1,
                            sampler="lcm")
    video = validation_frames(models, pipe.mapper, lcm.prompt, lcm.subject_word, lcm.image, lcm.mask, frames=2,
                              size=64, steps=2, seed=1, sampler="lcm")
    assert torch.equal(video, pipe.generate(lcm).frames)


def test_config_file_flags_and_one_line_errors(tiny_models, synth, tmp_path):
    from videobooth_core.app.cli import build_parser, main
    from videobooth_core.training.cli import config_from_args

    yaml_file = tmp_path / "stage.yaml"
    yaml_file.write_text(f"stage: 1\ndata: {synth}\nmodels: {tiny_models}\nout: {tmp_path / 'o'}\nsteps: 7\n"
                         "ema-decay: 0.99\n")
    toml_file = tmp_path / "stage.toml"
    toml_file.write_text(f'stage = 1\ndata = "{synth}"\nmodels = "{tiny_models}"\nout = "{tmp_path / "o"}"\n'
                         "batch_size = 3\n")
    for path in (yaml_file, toml_file):
        cfg = config_from_args(build_parser().parse_args(["train", "--config", str(path), "--lr", "0.5"]))
        assert cfg.lr == 0.5 and cfg.stage == 1 and cfg.max_grad_norm == 0.1 and cfg.timestep_grid == 250
    assert config_from_args(build_parser().parse_args(["train", "--config", str(yaml_file)])).ema_decay == 0.99
    assert config_from_args(build_parser().parse_args(["train", "--config", str(yaml_file), "--steps", "9"])).steps == 9
    assert config_from_args(build_parser().parse_args(["train", "--config", str(yaml_file)])).dropout == 0.0

    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 1\nlearning_rate: 1\n")
    with pytest.raises(TrainingError, match="learning_rate"):
        config_from_args(build_parser().parse_args(["train", "--config", str(bad)]))
    # stage 2 without a mapper, and a dataset entry whose caption lacks its word: one line, exit code 2
    assert main(["train", "--stage", "2", "--data", str(synth), "--models", str(tiny_models),
                 "--out", str(tmp_path / "x")]) == 2
    broken, broken_id = dataset_without_the_word(synth, tmp_path / "broken")
    cfg = config(tiny_models, broken, tmp_path / "y", 1, steps=1)
    from videobooth_core.training.loop import train

    with pytest.raises(TrainingError, match=broken_id):
        train(cfg)


OLD_TRAIN_FLAGS = (
    "--config --stage --data --models --out --mapper --resume --steps --batch-size --grad-accum --lr --weight-decay "
    "--warmup-steps --max-grad-norm --reg-weight --cond-dropout --reg-text-weight --ema-decay --seed --frames --size "
    "--window --checkpoint-every --keep-checkpoints --log-every --num-workers --validate-every --validation-clips "
    "--validation-steps --timestep-grid --grey-exemplar --mixed-precision --dtype --cache --keep-mapper-projections "
    "--no-flip --no-tf32 --gradient-checkpointing --overfit --cpu --no-progress --no-memory-check --no-tensorboard"
).split()
"""The train command's flags before its settings moved onto the settings table (all still accepted)."""
DISTILL_FLAGS = "--lora-rank --lora-alpha --lora-targets --distill-cfg --distill-skip --huber-c --target-ema".split()
"""``--stage distill``'s flags (issue 27), from the same table."""


def test_train_settings_are_one_table_of_the_generation_kind(tmp_path, tiny_models, synth):
    """Flags, config-file keys, defaults, ranges and checks of ``train`` come from TRAIN_SETTINGS, a table of
    settings.Setting as generation's SETTINGS; a bad value is named as the flag or the file's key that gave it."""
    import argparse

    from videobooth_core.app.cli import build_parser
    from videobooth_core.settings import SETTINGS, Setting
    from videobooth_core.training.cli import config_from_args
    from videobooth_core.training.config import TRAIN_SETTINGS, make_config

    assert all(type(spec) is Setting and spec.section == "train" for spec in TRAIN_SETTINGS.values())
    assert type(SETTINGS["cfg"]) is Setting and set(TRAIN_SETTINGS) == {f.name for f in
                                                                      __import__("dataclasses").fields(TrainConfig)}
    train_parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    flags = [o for action in train_parser._actions for o in action.option_strings if o not in ("-h", "--help")]
    assert sorted(flags) == sorted(OLD_TRAIN_FLAGS + DISTILL_FLAGS)
    defaults = TrainConfig(stage=1, data="", models="", out="")
    for spec in TRAIN_SETTINGS.values():  # every default is valid, and is TrainConfig's
        assert spec.required or spec.check(spec.default) == getattr(defaults, spec.name), spec.key

    base = ["train", "--stage", "1", "--data", str(synth), "--models", str(tiny_models), "--out", str(tmp_path / "o")]
    parsed = config_from_args(build_parser().parse_args([*base, "--no-flip", "--keep-mapper-projections",
                                                         "--timestep-grid", "1000", "--seed", "5"]))
    assert (parsed.flip, parsed.reinit_projections, parsed.timestep_grid, parsed.seed) == (False, False, 1000, 5)
    assert (parsed.tf32, parsed.lr, parsed.ema_decay) == (True, 1e-4, 0.9999)

    # the value is named as what gave it: the flag, or the key in the file; flags override the file
    config_file = tmp_path / "run.yaml"
    config_file.write_text("ema-decay: 1.0\nbatch_size: 4\n")
    with pytest.raises(TrainingError, match=r"^ema_decay in run.yaml must be less than 1, got 1.0"):
        config_from_args(build_parser().parse_args([*base, "--config", str(config_file)]))
    ok = config_from_args(build_parser().parse_args([*base, "--config", str(config_file), "--ema-decay", "0.5"]))
    assert (ok.ema_decay, ok.batch_size) == (0.5, 4)
    with pytest.raises(TrainingError, match=r"^--ema-decay must be less than 1, got 1.5"):
        config_from_args(build_parser().parse_args([*base, "--config", str(config_file), "--ema-decay", "1.5"]))
    with pytest.raises(TrainingError, match=r"^--size must be a positive multiple of 8, got 60; try 64"):
        config_from_args(build_parser().parse_args([*base, "--size", "60"]))
    with pytest.raises(TrainingError, match=r"^lr in the config file must be a number, got '1e-4'"):
        make_config({"lr": "1e-4"}, {})
    with pytest.raises(TrainingError, match="missing required setting: 'models'; pass --models"):
        make_config({"stage": 1, "data": str(synth), "out": "o"}, {})
    with pytest.raises(TrainingError, match=r"^cond_dropout must be between 0 and 1, got 2; the default is 0 in stage 1"):
        TrainConfig(stage=1, data=str(synth), models=str(tiny_models), out="o", cond_dropout=2).check()
    assert "(default: 0 in stage 1, 0.1 in stage 2)" in " ".join(train_parser.format_help().split())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_models, synth, tmp_path):
    from videobooth_core.dataset.reader import OurDataset
    from videobooth_core.training.loop import load_training_models, set_trainable
    from videobooth_core.training.model import BatchMaker, TrainingModule

    cfg = config(tiny_models, synth, tmp_path / "run", 2)
    models = load_training_models(cfg, torch.device("cpu"))
    params = set_trainable(models["mapper"], 2)
    dataset = OurDataset(synth, stage=2, size=cfg.size, clip_frames=cfg.frames, seed=0)
    batch = BatchMaker(cfg, models["vae"], models["vision"], models["text"], models["tokenizer"],
                       torch.device("cpu"))([dataset[0], dataset[1]], [0, 1])
    module = TrainingModule(models["mapper"], models["unet"], models["text"], cfg.reg_weight)
    grads, calls = [], []
    mid_block, forward = models["unet"].mid_block, models["unet"].mid_block.forward

    def counted(*args):  # counts recomputations too (module hooks do not fire in them)
        calls.append(1)
        return forward(*args)

    mid_block.forward = counted
    for checkpointing in (False, True):
        models["unet"].gradient_checkpointing = checkpointing
        for param in params:
            param.grad = None
        module(batch)[0].backward()
        grads.append([param.grad.clone() for param in params])
    del mid_block.forward
    assert len(calls) == 2 + 4  # image-prompt pass + prediction, then both again recomputed in the backward pass
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("stage", [2, "distill"])
def test_two_ranks_train_as_one_with_twice_the_batch(tiny_models, synth, tmp_path, stage):
    """torchrun with 2 CPU ranks (gloo), batch 1 per rank, against 1 rank with batch 2: the trained parameters after
    5 steps (stage 2: the mapper; distill: the student's LoRA, whose draws are seeded per sample, not per rank) agree
    within 1e-6, in the float64 checking precision. Why not float32: the tiny test models' backward
    pass is ill-conditioned (8x8 latents reach 1x1 in the UNet's last block, where GroupNorm normalises 4 numbers),
    so the float32 kernels' batch-size-dependent rounding (~1e-7, batch 1 vs 2) grows to ~1e-3 relative in the
    gradients, and Adam's first steps (update ~ lr * sign(g)) turn that into ~1e-4 parameter differences. In float64
    the same comparison differs by ~1e-12: the engine computes the same step; only kernel rounding differed."""
    import subprocess

    from videobooth_core.training.loop import list_checkpoints, train

    import sys

    lora = DISTILL_LORA if stage == "distill" else {}
    command = _train_command(tiny_models, synth, tmp_path / "ranks", "--steps", "5", "--batch-size", "1",
                             "--dtype", "float64", stage=stage)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *command[1:]], env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    doubled = config(tiny_models, synth, tmp_path / "double", stage, batch_size=2, steps=5, cpu=True, dtype="float64",
                     **lora)
    train(doubled)
    ranks_progress, ranks_weights, _ = _checkpoint(list_checkpoints(config(tiny_models, synth, tmp_path / "ranks",
                                                                           stage))[-1])
    double_progress, double_weights, _ = _checkpoint(list_checkpoints(doubled)[-1])
    assert (ranks_progress["world_size"], ranks_progress["batch_size"]) == (2, 1)
    assert (double_progress["world_size"], double_progress["batch_size"]) == (1, 2)
    assert ranks_progress["step"] == double_progress["step"] == 5
    assert ranks_weights.keys() == double_weights.keys()  # unwrapped keys whatever the number of processes
    if stage == 2:  # not re-initialised: it trained, so the comparison is not vacuous
        from videobooth_core.loading.checkpoint import load_mapper

        start = load_mapper(tiny_models / "videobooth" / "mapper.pt").state_dict()
        moved = {key: start[key] for key in double_weights if key.startswith("mapping_")}
    else:  # the LoRA's up projections start at 0
        moved = {key: torch.zeros_like(value) for key, value in double_weights.items() if key.endswith(".up")}
    assert moved
    for key, value in double_weights.items():
        assert value.dtype == torch.float64
        assert float((ranks_weights[key] - value).abs().max()) <= 1e-6, key
        if key in moved:
            assert float((value - moved[key].double()).abs().max()) > 1e-4, key
    first = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
             for run in ("ranks", "double")]
    assert first[0] == pytest.approx(first[1], rel=1e-12)
