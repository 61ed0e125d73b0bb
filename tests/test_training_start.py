"""Where training starts and what it is fed, as the official scripts (issue 28): stage 1 from ELITE's global mapper
layout, the class-word splice of the official training (a subject word twice in a caption), the optional text
regulariser and the grey exemplar of dropped clips. Tiny models, CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from videobooth_core.errors import CheckpointError
from videobooth_core.training.config import TrainConfig, TrainingError

SMALL = {"size": 64, "frames": 2, "batch_size": 2, "progress": False, "tensorboard": False, "log_every": 1,
         "memory_check": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from videobooth_core.dataset.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("start_data") / "synth"
    make_synthetic(out, videos=2, seed=0)
    return out


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
    save_file({k: v.contiguous() for k, v in elite.items() if k.startswith("mapping_")}, str(folder / "mlps.safetensors"))
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


def test_elite_layouts_are_told_by_their_keys(elite_files, tiny_models):
    from videobooth_core.loading.checkpoint import load_mapper, read_starting_mapper
    from videobooth_core.loading.kinds import describe_checkpoint, detect_kind

    elite = elite_files["elite_weights"]
    mlps = {k: v for k, v in elite.items() if k.startswith("mapping_")}
    assert detect_kind(elite) == detect_kind(mlps) == "elite_mapper"
    assert "attn2 to_k/to_v per site" in describe_checkpoint(elite) and "MLPs only" in describe_checkpoint(mlps)
    assert detect_kind(torch.load(tiny_models / "videobooth" / "mapper.pt", weights_only=True)["ema"]) == \
        "videobooth_mapper"
    # the official stage-1 checkpoint ({'model', 'ema'} of the ELITE layout) unwraps to it as well
    assert read_starting_mapper(elite_files["elite"])[0] == "elite_mapper"
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
    assert main([*base, "--stage", "1", "--mapper", str(elite_files["elite"]), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "videobooth_mapper.safetensors").is_file()
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
