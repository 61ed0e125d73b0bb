"""Where training starts and what it is fed, as the official scripts (issue 28): stage 1 from ELITE's global mapper
layout, the class-word splice of the official training (a subject word twice in a caption), the optional text
regulariser and the grey exemplar of dropped clips. Tiny models, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from videobooth_core.errors import CheckpointError
from videobooth_core.training.config import TrainConfig, TrainingError

from training_helpers import SMALL, one_thread, synth  # noqa: F401  (module fixtures)


@pytest.fixture(scope="module")
def elite_files(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """ELITE's train_global.py layout for the tiny models: a plain state dict (no wrapper) of the mapper MLPs and,
    per attn2 site, ``<site>_transformer_blocks_0_attn2_to_k/_to_v`` (``elite.pt``), and the MLPs only
    (``mlps.safetensors``). Values are the tiny mapper's plus an offset, so they differ from every other source."""
    released = torch.load(tiny_models / "videobooth" / "mapper.pt", weights_only=True)["ema"]
    elite = {k: v + 0.125 for k, v in released.items()
             if k.startswith("mapping_") or k.endswith(("_attn2_to_k.weight", "_attn2_to_v.weight"))}
    assert any("attn2_to_k" in k for k in elite) and not any("attn1" in k for k in elite)
    folder = tmp_path_factory.mktemp("elite")
    torch.save(elite, folder / "elite.pt")
    mlps = {k: v.contiguous() for k, v in elite.items() if k.startswith("mapping_")}
    save_file(mlps, str(folder / "mlps.safetensors"))
    broken = dict(elite)
    dropped = next(k for k in broken if k.endswith("_attn2_to_v.weight"))
    del broken[dropped]
    torch.save(broken, folder / "broken.pt")
    return {"elite": folder / "elite.pt", "mlps": folder / "mlps.safetensors", "broken": folder / "broken.pt",
            "elite_weights": elite, "dropped": dropped}


def config(tiny_models: Path, synth: Path, out: Path, stage: int, **kwargs) -> TrainConfig:
    settings = {**SMALL, **kwargs}
    return TrainConfig(stage=stage, data=str(synth), models=str(tiny_models), out=str(out), **settings)


def _site_weights(models: dict, attn: str) -> dict[str, torch.Tensor]:
    """The UNet's own to_k/to_v of ``attn`` per site, under the mapper's key stems."""
    out = {}
    for site in models["unet"].attention_sites:
        block = getattr(site.transformer_blocks[0], attn)
        stem = site.site.replace(".", "_") + f"_transformer_blocks_0_{attn}_to_"
        out[stem + "k"], out[stem + "v"] = block.to_k.weight, block.to_v.weight
    return out


def test_elite_layouts_are_told_by_their_keys(elite_files, tiny_models, tmp_path):
    from videobooth_core.loading.checkpoint import load_mapper, read_starting_mapper
    from videobooth_core.loading.kinds import describe_checkpoint, detect_kind

    elite = elite_files["elite_weights"]
    mlps = {k: v for k, v in elite.items() if k.startswith("mapping_")}
    assert detect_kind(elite) == detect_kind(mlps) == "elite_mapper"
    assert "attn2 to_k/to_v per site" in describe_checkpoint(elite) and "MLPs only" in describe_checkpoint(mlps)
    assert detect_kind(torch.load(tiny_models / "videobooth" / "mapper.pt", weights_only=True)["ema"]) == \
        "videobooth_mapper"
    assert read_starting_mapper(elite_files["elite"])[0] == "elite_mapper"
    # the official stage-1 checkpoint ({'model', 'ema'} of the ELITE layout) unwraps to it as well, from 'ema'
    torch.save({"model": {k: v * 0 for k, v in elite.items()}, "ema": elite}, tmp_path / "0001000.pt")
    kind, weights = read_starting_mapper(tmp_path / "0001000.pt")
    assert kind == "elite_mapper" and all(torch.equal(weights[k], v) for k, v in elite.items())
    assert read_starting_mapper(elite_files["mlps"])[0] == "elite_mapper"
    # inference needs a whole VideoBooth mapper: refused by name
    with pytest.raises(CheckpointError, match="ELITE global mapper"):
        load_mapper(elite_files["elite"])


@pytest.mark.parametrize("layout", ["elite", "mlps"])
def test_stage1_starts_from_an_elite_global_mapper(tiny_models, synth, elite_files, tmp_path, layout):
    from videobooth_core.training.loop import load_training_models

    elite = elite_files["elite_weights"]
    cfg = config(tiny_models, synth, tmp_path / "run", 1, mapper=str(elite_files[layout]))
    models = load_training_models(cfg, torch.device("cpu"))
    mapper = models["mapper"].state_dict()
    mlp_keys = [k for k in elite if k.startswith("mapping_")]
    assert mlp_keys and all(torch.equal(mapper[k], elite[k]) for k in mlp_keys)
    # official: every to_k/to_v entry of the global mapper is overwritten by the UNet's attn2 (fresh copies), and the
    # attn1 _new/_exemplar (no ELITE file has them) are the UNet's attn1
    for stem, weight in _site_weights(models, "attn2").items():
        assert torch.equal(mapper[stem + ".weight"], weight), stem
    for stem, weight in _site_weights(models, "attn1").items():
        for suffix in ("_new", "_exemplar"):
            assert torch.equal(mapper[stem + suffix + ".weight"], weight), stem
    if layout == "elite":  # --keep-mapper-projections keeps the file's attn2 K/V
        keep = config(tiny_models, synth, tmp_path / "keep", 1, mapper=str(elite_files[layout]),
                      reinit_projections=False)
        kept = load_training_models(keep, torch.device("cpu"))["mapper"].state_dict()
        kv = [k for k in elite if "attn2_to_" in k]
        assert kv and all(torch.equal(kept[k], elite[k]) for k in kv)


def test_elite_start_through_the_command_and_refusals(tiny_models, synth, elite_files, tmp_path, capsys):
    from videobooth_core.app.cli import main
    from videobooth_core.training.loop import load_training_models

    base = ["train", "--data", str(synth), "--models", str(tiny_models), "--size", "64", "--frames", "2",
            "--batch-size", "1", "--steps", "1", "--cpu", "--no-progress", "--no-tensorboard", "--no-memory-check"]
    assert main([*base, "--stage", "1", "--mapper", str(elite_files["elite"]), "--out", str(tmp_path / "a"),
                 "--reg-text-weight", "0.01"]) == 0
    assert (tmp_path / "a" / "videobooth_mapper.safetensors").is_file()
    record = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["reg_text"] > 0 and record["loss"] > record["mse"] + 0.01 * record["reg"]
    assert main([*base, "--stage", "1", "--mapper", str(elite_files["mlps"]), "--out", str(tmp_path / "m")]) == 0
    trained = load_file(str(tmp_path / "m" / "videobooth_mapper.safetensors"))
    start = elite_files["elite_weights"]["mapping_0.0.weight"]
    assert 0 < float((trained["mapping_0.0.weight"] - start).abs().max()) < 0.01  # trained from the file's MLPs
    capsys.readouterr()
    # a foreign file (a VAE) is refused by name, in one line, before any model is loaded
    vae = next((tiny_models / "vae").iterdir())
    assert main([*base, "--stage", "1", "--mapper", str(vae), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a VAE" in err and vae.name in err and "ELITE" in err
    assert not (tmp_path / "b" / "checkpoints").exists()
    # strict: a site's attn2 to_v missing is named
    with pytest.raises(CheckpointError, match=elite_files["dropped"].removesuffix(".weight")):
        load_training_models(config(tiny_models, synth, tmp_path / "c", 1, mapper=str(elite_files["broken"])),
                             torch.device("cpu"))
    # MLPs only: nothing to continue in stage 2, no K/V to keep
    with pytest.raises(TrainingError, match="MLPs only.*train stage 1 from it first"):
        load_training_models(config(tiny_models, synth, tmp_path / "d", 2, mapper=str(elite_files["mlps"])),
                             torch.device("cpu"))
    with pytest.raises(TrainingError, match="leave out --keep-mapper-projections"):
        load_training_models(config(tiny_models, synth, tmp_path / "e", 1, mapper=str(elite_files["mlps"]),
                                    reinit_projections=False), torch.device("cpu"))


@pytest.fixture(scope="module")
def clip_text_and_tokenizer(tiny_models, clip_tokenizer_dir):
    """The tiny text encoder (CLIP's 49 408-token vocabulary, width 32) with CLIP's real BPE tokenizer, whose
    placeholder ``sdksd`` is 3 tokens and "dog" one, as in the official code."""
    from transformers import CLIPTokenizer

    from videobooth_core.loading.clip import load_clip_text_encoder

    text = load_clip_text_encoder(next((tiny_models / "text_encoders").glob("*clip_text*.safetensors"))).eval()
    return text, CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir))


def _maker(tiny_models, synth, tmp_path, text, tokenizer, stage=1, **kwargs):
    from videobooth_core.training.model import BatchMaker

    cfg = config(tiny_models, synth, tmp_path / "run", stage, **kwargs)
    return BatchMaker(cfg, None, None, text, tokenizer, torch.device("cpu"))


def test_a_word_twice_is_spliced_as_the_official_training(tiny_models, synth, tmp_path, clip_text_and_tokenizer):
    """Chosen: the official training's splice over the class word itself, at the caption's original positions.
    "a dog chasing another dog" (tokens: start, a, dog, chasing, another, dog, end): the first splice writes the 5
    vectors at 2..6, the second, at the second dog's original position 5, writes them at 5..9 and the caption from
    its end token on after them: start, a, v0, v1, v2, v0, v1, v2, v3, v4, end ... ("chasing another" and the
    first splice's v3, v4 are overwritten, as in the official code). The inference splice over "sdksd" differs at
    72 of the 77 states from position 5 on (benchmarks/repeated_word_effect.py); a word named once gives the
    inference splice's states exactly."""
    from videobooth_core.conditioning.embeddings import encode_prompt
    from videobooth_core.training.model import spliced_text

    text, tokenizer = clip_text_and_tokenizer
    maker = _maker(tiny_models, synth, tmp_path, text, tokenizer)
    caption = "a dog chasing another dog"
    ids, word_ids = maker.subject_ids(caption, "dog", "entry")
    assert word_ids == tuple(tokenizer("dog", add_special_tokens=False).input_ids) and len(word_ids) == 1
    assert torch.equal(ids, tokenizer(caption, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    injected = torch.randn((1, 5, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoded = spliced_text(text, ids, word_ids, injected)
        table = text.get_input_embeddings().weight
        start, a, end = int(ids[0, 0]), int(ids[0, 1]), int(ids[0, 6])
        expected = torch.cat([table[[start, a]], injected[0, :3], injected[0], table[[end] * 67]])
        assert torch.equal(encoded.inputs_embeds[0], expected)
        placeholder, _ = encode_prompt(text, tokenizer, caption, "dog", injected)
    differing = torch.nonzero((encoded.last_hidden_state - placeholder).abs().amax(-1)[0] > 1e-6).flatten()
    assert len(differing) == 72 and int(differing[0]) == 5
    # named once: exactly the inference splice; a batch of two words splices each row over its own word
    once = "a dog running on the beach"
    other = "a red cat on a sofa"
    rows = [maker.subject_ids(once, "dog", "e1"), maker.subject_ids(other, "cat", "e2")]
    two = torch.randn((2, 5, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = spliced_text(text, torch.cat([r[0] for r in rows]), tuple(r[1] for r in rows), two).last_hidden_state
        for row, (prompt, word) in enumerate(((once, "dog"), (other, "cat"))):
            inference, _ = encode_prompt(text, tokenizer, prompt, word, two[row:row + 1])
            assert torch.equal(batch[row], inference[0]), prompt
    # the entry checks stay: a word missing from its caption is named
    with pytest.raises(TrainingError, match="'entry3'.*'horse' is not in the prompt"):
        maker.subject_ids("a dog on a beach", "horse", "entry3")


def test_text_regulariser_and_the_flags(tiny_models, synth, tmp_path):
    """--reg-text-weight w adds w * mean|states - the caption's plain states| (after the dropout), official scripts'
    term; 0 (the README's commands) by default."""
    from videobooth_core.app.cli import build_parser
    from videobooth_core.conditioning.clip import clip_vision_features
    from videobooth_core.conditioning.text import encode_text
    from videobooth_core.dataset.reader import OurDataset
    from videobooth_core.training.cli import config_from_args
    from videobooth_core.training.loop import load_training_models
    from videobooth_core.training.model import BatchMaker, TrainingModule, spliced_text

    defaults = TrainConfig(stage=1, data="", models="", out="")
    assert (defaults.reg_text_weight, defaults.grey_exemplar) == (0.0, "shared")
    args = ["train", "--stage", "1", "--data", str(synth), "--models", str(tiny_models), "--out", str(tmp_path / "o")]
    parsed = config_from_args(build_parser().parse_args([*args, "--reg-text-weight", "0.01", "--grey-exemplar",
                                                         "per-clip"]))
    assert (parsed.reg_text_weight, parsed.grey_exemplar) == (0.01, "per-clip")
    with pytest.raises(TrainingError, match="--reg-text-weight must be at least 0, got -1.0"):
        config_from_args(build_parser().parse_args([*args, "--reg-text-weight", "-1"]))

    cfg = config(tiny_models, synth, tmp_path / "run", 1, reg_text_weight=0.5)
    models = load_training_models(cfg, torch.device("cpu"))
    samples = [OurDataset(synth, stage=1, size=64, clip_frames=2, seed=4)[i] for i in range(2)]
    maker = BatchMaker(cfg, models["vae"], models["vision"], models["text"], models["tokenizer"], torch.device("cpu"))
    batch = maker(samples, [0, 1])
    module = TrainingModule(models["mapper"], models["unet"], models["text"], cfg.reg_weight, cfg.reg_text_weight)
    loss, mse, reg = module(batch)
    with torch.no_grad():
        clip = torch.stack([s["image_prompt_clip_augmented"] for s in samples])
        injected = models["mapper"](clip_vision_features(models["vision"], clip))
        states = spliced_text(models["text"], batch.input_ids, batch.placeholder_ids, injected).last_hidden_state
        plain = encode_text(models["text"], batch.input_ids).last_hidden_state
    reg_text = (states - plain).abs().mean()
    assert float(reg_text) > 1e-3
    torch.testing.assert_close(module.last_reg_text, reg_text, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.detach(), mse + 0.01 * reg + 0.5 * reg_text, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["shared", "per-clip"])
def test_dropped_clips_grey_exemplar(tiny_models, synth, tmp_path, monkeypatch, mode):
    """Stage 2, every clip dropped, the exemplar's noising made the identity: ``shared`` (official) gives every
    dropped clip of a step the same VAE sample of the grey frames, drawn from (seed, step), a new one the next
    step; ``per-clip`` one each, from the clip's own generator."""
    from videobooth_core.conditioning.vae import vae_scaling_factor
    from videobooth_core.dataset.reader import OurDataset
    from videobooth_core.training import model
    from videobooth_core.training.loop import load_training_models

    cfg = config(tiny_models, synth, tmp_path / "run", 2, mapper=str(tiny_models / "videobooth" / "mapper.pt"),
                 cond_dropout=1.0, grey_exemplar=mode)
    models = load_training_models(cfg, torch.device("cpu"))
    monkeypatch.setattr(model, "q_sample", lambda clean, noise, alpha: clean)  # the clean latents, to compare
    samples = [OurDataset(synth, stage=2, size=64, clip_frames=2, seed=4)[i] for i in range(2)]
    maker = model.BatchMaker(cfg, models["vae"], models["vision"], models["text"], models["tokenizer"],
                             torch.device("cpu"))
    step0 = maker(samples, [0, 1], step=0).exemplar
    again = maker(samples, [0, 1], step=0).exemplar
    step1 = maker(samples, [2, 3], step=1).exemplar
    assert torch.equal(step0, again)
    grey = torch.zeros((2, 3, 64, 64))
    with torch.no_grad():
        dist = models["vae"].encode(grey).latent_dist
    if mode == "shared":
        assert torch.equal(step0[0], step0[1]) and not torch.equal(step0[0], step1[0])
        generator = torch.Generator().manual_seed(model.sample_seed(cfg.seed, 0, model.GREY_PURPOSE))
        noise = torch.randn(dist.mean.shape, generator=generator)
        expected = ((dist.mean + dist.std * noise) * vae_scaling_factor(models["vae"], None)).permute(1, 0, 2, 3)
        assert torch.equal(step0[0], expected)
    else:
        assert not torch.equal(step0[0], step0[1])
    # both are VAE samples of the same grey frames: near its posterior mean
    mean = (dist.mean * vae_scaling_factor(models["vae"], None)).permute(1, 0, 2, 3)
    assert float((step0[0] - mean).abs().max()) < 6 * float(dist.std.max()) * vae_scaling_factor(models["vae"], None)

