"""The VideoBooth dataset: builder (user masks, tiny random Grounding DINO + SAM), resumability, readers of both
layouts, the official frame window, image prompts identical to inference, check and preview."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from videobooth_core.app.cli import main
from videobooth_core.conditioning.image_prompt import load_mask, mask_bbox, prepare_image_prompt
from videobooth_core.dataset import layout
from videobooth_core.dataset.build import BuildOptions, build_dataset
from videobooth_core.dataset.reader import OfficialSubset, OurDataset, random_affine, shrink_box, video_transform
from videobooth_core.dataset.synthetic import write_sources
from videobooth_core.dataset.video import sample_window
from videobooth_core.video_io import read_frames, write_mp4

pytest.importorskip("av")

GOOD = [f"synth_{i:04d}" for i in range(4)]  # 24, 40, 90, 24 frames


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Synthetic builder input plus one video for each skip reason."""
    root = write_sources(tmp_path_factory.mktemp("sources"), videos=4)
    videos = root / "videos"
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    frames = np.full((10, 64, 96, 3), 120, dtype=np.uint8)
    write_mp4(videos / "short.mp4", frames)
    for name in ("uncaptioned", "classless"):
        shutil.copyfile(videos / "synth_0000.mp4", videos / f"{name}.mp4")
        shutil.copyfile(root / "masks" / "synth_0000.png", root / "masks" / f"{name}.png")
    shutil.copyfile(root / "masks" / "synth_0000.png", root / "masks" / "corrupt.png")
    with open(root / "captions.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"video": "corrupt.mp4", "caption": "a dog on a broken tape"}) + "\n")
        handle.write(json.dumps({"video": "short.mp4", "caption": "a grey cat sleeping"}) + "\n")
        handle.write(json.dumps({"video": "classless.mp4", "caption": "a red balloon moving"}) + "\n")
    return root


EXPECTED_SKIPS = {"corrupt.mp4": "unreadable", "short.mp4": "too short", "uncaptioned.mp4": "missing caption",
                  "classless.mp4": "caption without a class word"}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "build_report.json"}


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "data"
    report = build_dataset(sources / "videos", sources / "captions.jsonl", out,
                           BuildOptions(masks_dir=sources / "masks", workers=2, progress=False))
    assert sorted(report.built) == GOOD
    assert {k: v.split(" (")[0] for k, v in report.skipped.items()} == EXPECTED_SKIPS
    return out


def test_user_masks_are_written_exactly(built, sources, capsys):
    for ident in GOOD:
        folder = built / "entries" / ident
        source_mask = load_mask(sources / "masks" / f"{ident}.png")
        assert torch.equal(load_mask(folder / "mask_1.png"), source_mask)
        records = json.loads((folder / "mask.json").read_text())
        assert records[0] == {"value": 0, "label": "background"}
        assert records[1]["box"] == list(mask_bbox(source_mask)) and records[1]["label"] == records[1]["label"].lower()
        assert (folder / "video.mp4").read_bytes() == (sources / "videos" / f"{ident}.mp4").read_bytes()
        entry = json.loads((folder / "entry.json").read_text())
        assert entry["frames"] == (90 if ident == "synth_0002" else 40 if ident == "synth_0001" else 24)
        assert entry["word"] in entry["caption"]
    assert main(["dataset", "check", str(built)]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_check_finds_broken_entries(built, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    (copy / "entries" / "synth_0000" / "video.mp4").write_bytes(b"not a video")
    (copy / "entries" / "synth_0001" / "mask_1.png").unlink()
    layout.write_mask_png(torch.ones(64, 96, dtype=torch.bool), copy / "entries" / "synth_0002" / "mask_1.png")
    assert main(["dataset", "check", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM synth_0000: broken video" in out and "PROBLEM synth_0001: mask_1.png" in out
    assert "covers the whole frame" in out and "3 entries with problems" in out


def test_sample_matches_inference_preprocessing(built):
    dataset = OurDataset(built, stage=2, seed=3)
    for index in range(len(dataset)):
        sample = dataset[index]
        folder = built / "entries" / sample["id"]
        box = json.loads((folder / "mask.json").read_text())[1]["box"]
        frame = read_frames(folder / "video.mp4", [0])[0]
        expected = prepare_image_prompt(frame, load_mask(folder / "mask_1.png"), box)
        assert torch.equal(sample["image_prompt_clip"], expected.clip_pixels[0])
        assert torch.equal(sample["image_prompt_vae"], expected.vae_pixels[0])
        assert sample["video"].shape == (3, 16, 256, 256) and sample["video"].dtype == torch.float32
        assert -1.0 <= float(sample["video"].min()) and float(sample["video"].max()) <= 1.0
        assert sample["image_prompt_clip_augmented"].shape == (3, 224, 224)
        vae_aug = sample["image_prompt_vae_augmented"]
        assert vae_aug.shape == (3, 256, 256) and -1.0 <= float(vae_aug.min()) and float(vae_aug.max()) <= 1.0
        assert sample["word"] in sample["caption"] and sample["frame_indices"].dtype == torch.int64
    assert torch.equal(dataset[2]["video"], dataset[2]["video"])  # a seeded dataset repeats its samples


def test_frame_window_rule(built):
    short = sample_window(24, random.Random(0))
    assert short == [int(i) for i in np.linspace(0, 23, 16).astype(int)]  # start 0, end = T
    starts = set()
    for seed in range(300):
        indices = sample_window(90, random.Random(seed))
        start = indices[0]
        assert indices == [int(i) for i in np.linspace(start, start + 63, 16).astype(int)]
        starts.add(start)
    assert min(starts) == 0 and max(starts) == 90 - 65  # both ends of [0, T - 65] are drawn
    assert sample_window(65, random.Random(1)) == [int(i) for i in np.linspace(0, 63, 16).astype(int)]
    # The reader uses exactly these indices, and its frames are the official transform of them.
    dataset = OurDataset(built, flip=False, seed=0)
    sample = dataset[2]  # synth_0002: 90 frames
    rng = random.Random(0 * 1_000_003 + 2)
    rng.randrange(1)  # the mask item draw comes first
    assert sample["frame_indices"].tolist() == sample_window(90, rng)
    frames = read_frames(built / "entries" / "synth_0002" / "video.mp4", sample["frame_indices"].tolist())
    side = 64  # 64x96 frames: crop columns 16..80, then resize to 256
    crop = frames[:, :, 16 : 16 + side].permute(0, 3, 1, 2).float() / 255.0
    expected = torch.nn.functional.interpolate(crop, size=(256, 256), mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(sample["video"], expected.permute(1, 0, 2, 3), rtol=0, atol=1e-6)
    assert torch.equal(video_transform(frames, True)[..., 0], video_transform(frames.flip(2), False)[..., 0])


def test_augmentations():
    levels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)

    class NoFlip(random.Random):
        def random(self):
            return 0.9

    identity = random_affine(levels, NoFlip(0), translate=(0.0, 0.0), degrees=0.0, scale=(1.0, 1.0))
    assert torch.equal(identity, levels)
    shifted = random_affine(levels, NoFlip(0), translate=(0.25, 0.0), degrees=0.0, scale=(1.0, 1.0))
    moved = [dx for dx in range(-8, 9) if torch.equal(shifted[:, :, max(dx, 0) : 32 + min(dx, 0)],
                                                      levels[:, :, max(-dx, 0) : 32 - max(dx, 0)])]
    assert len(moved) == 1 and (shifted == 255).any()  # a pure shift, white fill where nothing comes in
    for seed in range(50):
        x1, y1, x2, y2 = shrink_box((10.0, 20.0, 110.0, 70.0), random.Random(seed))
        assert 10 <= x1 <= 30 and 90 <= x2 <= 110 and 20 <= y1 <= 30 and 60 <= y2 <= 70


def test_shrink_moves_exactly_one_side_by_a_uniform_amount():
    """The official stage-2 rule over 20 000 draws (seed 0): one side every time, each side with probability 0.25,
    the amount uniform in [1 %, 20 %] of the box. Tolerances: side frequencies within 0.015 of 0.25 (about 5
    binomial standard deviations, 0.0031), Kolmogorov-Smirnov distance of the amounts to U(0.01, 0.2) under
    1.95 / sqrt(n) (the 0.1 % critical value) overall and per side. The former per-side rule (each side with
    p 0.25) left about 32 % of the boxes unshrunk and fails the first assertion."""
    box, draws = (10.0, 20.0, 110.0, 70.0), 20_000
    rng = random.Random(0)
    amounts: dict[int, list[float]] = {0: [], 1: [], 2: [], 3: []}
    for _ in range(draws):
        shrunk = shrink_box(box, rng)
        moved = [i for i in range(4) if shrunk[i] != box[i]]
        assert len(moved) == 1, (shrunk, moved)
        side = moved[0]  # x1, y1, x2, y2 = left, top, right, bottom
        size = box[2] - box[0] if side in (0, 2) else box[3] - box[1]
        inwards = shrunk[side] - box[side] if side < 2 else box[side] - shrunk[side]
        amounts[side].append(inwards / size)
    every = np.sort(np.concatenate([np.asarray(v) for v in amounts.values()]))
    assert 0.01 - 1e-12 <= every[0] and every[-1] <= 0.2 + 1e-12

    def ks(values: np.ndarray) -> float:
        values = np.sort(values)
        cdf = (values - 0.01) / 0.19
        n = len(values)
        return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))

    assert ks(every) < 1.95 / np.sqrt(draws)
    for side, values in amounts.items():
        assert abs(len(values) / draws - 0.25) < 0.015, (side, len(values))
        assert ks(np.asarray(values)) < 1.95 / np.sqrt(len(values)), side
    assert abs(float(every.mean()) - 0.105) < 0.002  # U(0.01, 0.2) has mean 0.105, sd 0.055 (sd of mean 0.0004)


def test_stage2_prompts_are_both_cut_from_the_shrunk_box(built, monkeypatch):
    """Official stage 2: the shrunk box cuts the masked first frame before both augmentations, so the CLIP prompt
    (224) and the VAE prompt (256) are the shrunk crop. With the affine augmentation made the identity, each
    augmented prompt equals the inference preparation of the shrunk box, exactly, and differs visibly from the
    unshrunk box's (the textured synthetic subjects: the removed strip changes the crop)."""
    from videobooth_core.conditioning.image_prompt import CLIP_MEAN, CLIP_STD
    from videobooth_core.dataset import reader

    monkeypatch.setattr(reader, "random_affine", lambda levels, rng, translate: levels)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)

    def clip_levels(pixels: torch.Tensor) -> torch.Tensor:  # the reader's round trip through 0..255
        return torch.round((pixels * std + mean) * 255.0).clamp(0, 255)

    dataset = OurDataset(built, stage=2, seed=11)
    sides = set()
    for index in range(len(dataset)):
        sample = dataset[index]
        folder = built / "entries" / sample["id"]
        frame = read_frames(folder / "video.mp4", [0])[0]
        mask = load_mask(folder / "mask_1.png")
        box, shrunk = sample["box"].tolist(), sample["box_shrunk"].tolist()
        moved = [i for i in range(4) if shrunk[i] != box[i]]
        assert len(moved) == 1
        sides.add(moved[0])
        cut = prepare_image_prompt(frame, mask, shrunk)
        whole = prepare_image_prompt(frame, mask, box)
        clip = sample["image_prompt_clip_augmented"]
        assert torch.equal(torch.round((clip * std + mean) * 255.0), clip_levels(cut.clip_pixels[0]))
        assert (clip_levels(whole.clip_pixels[0]) - clip_levels(cut.clip_pixels[0])).abs().mean() > 2.0
        vae = sample["image_prompt_vae_augmented"]
        assert torch.equal(vae, torch.round((cut.vae_pixels[0] + 1.0) * 127.5) / 127.5 - 1.0)
        assert (vae - whole.vae_pixels[0]).abs().mean() > 0.02
        # the unaugmented prompts stay the inference preparation of the whole box
        assert torch.equal(sample["image_prompt_clip"], whole.clip_pixels[0])
    assert len(sides) >= 2


def test_interrupted_build_resumes_to_the_same_dataset(sources, built, tmp_path, monkeypatch):
    out = tmp_path / "data"
    real_write = layout.write_entry
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("killed")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(layout, "write_entry", failing_write)
    options = BuildOptions(masks_dir=sources / "masks", progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        build_dataset(sources / "videos", sources / "captions.jsonl", out, options)
    monkeypatch.setattr(layout, "write_entry", real_write)
    done = sorted(p.name for p in (out / "entries").iterdir())
    assert done == GOOD[:2]  # only complete entries survive
    (out / "entries" / ".videobooth-synth_0003.x1y2.partial").mkdir()  # what a SIGKILL would leave
    report = build_dataset(sources / "videos", sources / "captions.jsonl", out, options)
    assert sorted(report.already_done) == GOOD[:2] and sorted(report.built) == GOOD[2:]
    assert _tree(out) == _tree(built)


def test_official_subset_reader(built, tmp_path):
    root = tmp_path / "official"
    rows = ["videoid,page_dir,name"]
    for ident in GOOD:
        entry = json.loads((built / "entries" / ident / "entry.json").read_text())
        (root / "videos" / "000").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built / "entries" / ident / "video.mp4", root / "videos" / "000" / f"{ident}.mp4")
        shutil.copytree(built / "entries" / ident, root / "masks" / "000" / ident,
                        ignore=shutil.ignore_patterns("video.mp4", "entry.json"))
        rows.append(f"{ident},000,\"{entry['caption']}\"")
    (root / "csv").mkdir()
    (root / "csv" / "all.csv").write_text("\n".join(rows) + "\n")
    official = OfficialSubset(root / "csv", root / "videos", root / "masks", seed=5)
    ours = OurDataset(built, seed=5)
    assert len(official) == len(ours) == 4
    for index in (0, 2):
        a, b = official[index], ours[index]
        assert a["word"] == b["word"] and a["caption"] == b["caption"]
        for key in ("video", "image_prompt_clip", "image_prompt_vae", "frame_indices"):
            assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def grounded_sam(tmp_path_factory) -> Path:
    """Tiny random Grounding DINO and SAM folders (seeded), as the user's downloads would be laid out."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SamConfig, SamImageProcessor,
                              SamModel, SamProcessor, SwinConfig)

    models = tmp_path_factory.mktemp("models")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *layout.DEFAULT_CLASSES]
    (models / "vocab.txt").write_text("\n".join(words) + "\n")
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(
        size={"shortest_edge": 64, "longest_edge": 64}), tokenizer=BertTokenizer(str(models / "vocab.txt")))
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=4, image_size=64,
                                   out_features=["stage1", "stage2"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, num_feature_levels=2, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(models / "grounding-dino" / "tiny")
    processor.save_pretrained(models / "grounding-dino" / "tiny")
    sam = SamConfig(
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, output_channels=16,
                           image_size=64, patch_size=8, global_attn_indexes=[0], window_size=0, num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16))
    SamModel(sam).save_pretrained(models / "sam" / "tiny")
    SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
                 ).save_pretrained(models / "sam" / "tiny")
    return models


def test_grounded_sam_builder_end_to_end(grounded_sam, sources, tmp_path, capsys):
    def build(out: Path, threshold: str) -> int:
        return main(["dataset", "build", "--videos", str(sources / "videos"), "--captions",
                     str(sources / "captions.jsonl"), "--out", str(out), "--models", str(grounded_sam),
                     "--workers", "2", "--box-threshold", threshold, "--text-threshold", threshold])

    out = tmp_path / "data"
    assert build(out, "0") == 0
    report = json.loads((out / "build_report.json").read_text())
    # Random weights: every detection is arbitrary, so the format is checked, not where the boxes are.
    assert sorted(report["built"] + [k[:-4] for k in report["skipped"] if k.startswith("synth")]) == GOOD
    assert report["built"] and all(report["skipped"][k].startswith("no subject found")
                                   for k in report["skipped"] if k.startswith("synth"))
    assert {k: v.split(" (")[0] for k, v in report["skipped"].items() if not k.startswith("synth")} == EXPECTED_SKIPS
    records = json.loads((out / "entries" / report["built"][0] / "mask.json").read_text())
    assert set(records[1]) == {"value", "label", "logit", "box"} and 0.0 <= records[1]["logit"] <= 1.0
    assert main(["dataset", "check", str(out)]) == 0
    sample = OurDataset(out, seed=0)[0]
    assert sample["video"].shape == (3, 16, 256, 256) and sample["image_prompt_clip"].shape == (3, 224, 224)
    capsys.readouterr()
    # No detection at all (no score exceeds 1): every captioned video is skipped and reported as such, and a build
    # that built nothing is a failure (exit 2, one line), not a success
    assert build(tmp_path / "none", "1") == 2
    skipped = json.loads((tmp_path / "none" / "build_report.json").read_text())["skipped"]
    assert all(skipped[f"{name}.mp4"].startswith("no subject found (no '") for name in GOOD)
    captured = capsys.readouterr()
    summary = captured.out
    assert summary.startswith("0 entries built, 0 already done, 8 skipped") and summary.count("  skipped ") == 8
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: no entry was built"), captured.err


def test_preview_and_cli_errors(built, sources, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert main(["dataset", "preview", str(built), "--out", str(sheet)]) == 0
    from PIL import Image

    image = Image.open(sheet)
    assert image.size[1] == 8 + 4 * (128 + 8) and len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 50
    capsys.readouterr()
    assert main(["dataset", "build", "--videos", str(sources / "videos"), "--captions", str(tmp_path / "no.csv"),
                 "--out", str(tmp_path / "d"), "--masks", str(sources / "masks")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: captions file not found") and "\n" not in err
    assert main(["dataset", "build", "--videos", str(sources / "videos"), "--captions", str(sources / "captions.jsonl"),
                 "--out", str(sources), "--masks", str(sources / "masks")]) == 2  # a user folder is never taken


def test_captions_and_subject_words(tmp_path):
    captions = tmp_path / "c.csv"
    captions.write_text('video,caption,word\na.mp4,"A Cat chasing a dog",\nb.mp4,a puppy,puppy\nc.mp4,hotdogs,\n')
    rows = layout.read_captions(captions)
    assert rows["a.mp4"].word is None and rows["b.mp4"].word == "puppy"
    assert layout.choose_word(rows["a.mp4"].caption, None, layout.DEFAULT_CLASSES) == "cat"  # first in the caption
    assert layout.choose_word(rows["b.mp4"].caption, "puppy", layout.DEFAULT_CLASSES) == "puppy"
    assert layout.choose_word(rows["c.mp4"].caption, None, layout.DEFAULT_CLASSES) is None  # whole words only
    assert layout.choose_word("a lion and a tiger", None, ("tiger", "lion")) == "lion"
