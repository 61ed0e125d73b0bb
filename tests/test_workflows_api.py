"""The API twins of the shipped workflows (tests/workflows_api): classes and inputs match the schemas, and each runs
end to end on the tiny model set of ``make-tiny`` (4 frames, 64 x 64, 3 steps), the post-processing nodes of other
packs as stand-ins; the native road's twins (KSampler, CLIPLoader, VAELoader: ComfyUI itself) are checked against
the schemas only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from workflow_helpers import (
    ANY,
    API_DIR,
    API_WORKFLOWS,
    COMFY_ONLY,
    FILES,
    MAPPINGS,
    NATIVE,
    NATIVE_LCM,
    THIRD_PARTY_NODES,
    UI_DIR,
    VHS_FORMAT_WIDGETS,
    VIDEOCRAFTER,
    WORKFLOWS,
    bridge,
    check_value,
    is_widget,
    schema,
    widget_names,
)


# -- API twins --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_dir(tiny_models):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bridge.MODELS_DIR_ENV, str(tiny_models))
        yield tiny_models


@pytest.fixture(scope="module")
def videocrafter_dir(tmp_path_factory) -> Path:
    """The tiny VideoCrafter2 and VideoCrafter1 I2V sets (``make-tiny --family``), a models folder of their own."""
    from videobooth_core.app.tiny_videocrafter import make_tiny_videocrafter

    root = tmp_path_factory.mktemp("videocrafter_models")
    for kind in ("videocrafter2", "videocrafter1-i2v-512"):
        make_tiny_videocrafter(root, kind)
    return root


def subject_image() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 80, 96, 3), generator=generator, dtype=torch.uint8).float() / 255
    subject = torch.zeros(1, 80, 96)
    subject[:, 10:60, 20:90] = 1.0
    return image, subject


def rife_stand_in(frames: torch.Tensor, multiplier: int, **_) -> torch.Tensor:
    """RIFE VFI's output layout: (n - 1) * multiplier + 1 frames, the given ones at every multiplier-th place (here
    with blends between them)."""
    steps = [frames[i] + (frames[i + 1] - frames[i]) * k / multiplier
             for i in range(frames.shape[0] - 1) for k in range(multiplier)]
    return torch.stack(steps + [frames[-1]])


def run_api_graph(graph: dict) -> dict[str, torch.Tensor | str | int]:
    """Execute an API graph with the pack's classes; LoadImage gives a cut-out picture (MASK = 1 where
    transparent, as ComfyUI's), the save/preview nodes record what they get; the
    post-processing nodes are stand-ins with their outputs' layouts (RIFE VFI's frame count, a x2 upscaler)."""
    image, subject = subject_image()
    outputs: dict[str, tuple] = {}
    saved: dict[str, torch.Tensor] = {}

    def evaluate(node_id: str) -> tuple:
        if node_id not in outputs:
            spec = graph[node_id]
            inputs = {k: evaluate(v[0])[v[1]] if isinstance(v, list) else v for k, v in spec["inputs"].items()}
            kind = spec["class_type"]
            if kind == "LoadImage":
                result = (image, 1.0 - subject)
            elif kind in ("SaveAnimatedWEBP", "SaveImage", "PreviewImage", "VHS_VideoCombine"):
                saved[node_id] = inputs["images"]
                result = ()
            elif kind == "RIFE VFI":
                result = (rife_stand_in(**inputs),)
            elif kind == "UpscaleModelLoader":
                result = (2,)  # the scale of RealESRGAN_x2
            elif kind == "ImageUpscaleWithModel":
                scale = inputs["upscale_model"]
                result = (inputs["image"].repeat_interleave(scale, 1).repeat_interleave(scale, 2),)
            elif kind == "PreviewAny":
                saved[node_id] = inputs["source"]
                result = ()
            else:
                cls = MAPPINGS[kind]
                result = getattr(cls(), cls.FUNCTION)(**inputs)
            outputs[node_id] = result
        return outputs[node_id]

    for node_id in graph:
        evaluate(node_id)
    return saved


@pytest.mark.parametrize("name", API_WORKFLOWS)
def test_api_twin_matches_the_schemas_and_runs(models_dir, name, request, monkeypatch) -> None:
    graph = json.loads((API_DIR / name).read_text())
    if name in VIDEOCRAFTER:  # their loader lists models/videocrafter of the tiny VideoCrafter sets
        monkeypatch.setenv(bridge.MODELS_DIR_ENV, str(request.getfixturevalue("videocrafter_dir")))
    for node_id, spec in graph.items():
        kind = spec["class_type"]
        inputs, _ = schema(kind)  # KeyError: a node type the tables above do not know
        if kind == "VHS_VideoCombine":  # the chosen format's own widgets come after "format"
            inputs = inputs + VHS_FORMAT_WIDGETS[spec["inputs"]["format"]]
        declared = {i[0]: i for i in inputs}
        assert set(spec["inputs"]) <= set(declared), (name, node_id)
        if kind in MAPPINGS:
            assert set(MAPPINGS[kind].INPUT_TYPES()["required"]) <= set(spec["inputs"]), (name, node_id)
        elif kind in THIRD_PARTY_NODES:  # every widget given; optional sockets may stay open
            assert {n for n, k, _ in inputs if is_widget(k)} <= set(spec["inputs"]), (name, node_id)
        else:
            assert set(spec["inputs"]) == set(declared), (name, node_id)
        for input_name, value in spec["inputs"].items():
            _, input_kind, options = declared[input_name]
            if isinstance(value, list):
                source = graph[value[0]]["class_type"]
                assert input_kind in (schema(source)[1][value[1]], ANY), (name, node_id, input_name)
            elif input_kind == FILES and kind in MAPPINGS:  # the make-tiny file names
                assert value in MAPPINGS[kind].INPUT_TYPES()["required"][input_name][0], (name, input_name, value)
            else:
                check_value((name, node_id), input_name, input_kind, options, value)
        if kind == "VideoBoothSampler":  # kept tiny so that the test stays fast
            assert spec["inputs"]["frames"] <= 4 and spec["inputs"]["steps"] <= 3
            assert spec["inputs"]["width"] <= 64 and spec["inputs"]["height"] <= 64
        if kind == "VideoBoothVideoCrafterSampler":  # 4 steps, as the node tests (3 is refused)
            assert spec["inputs"]["frames"] <= 4 and spec["inputs"]["steps"] <= 4
            assert spec["inputs"]["width"] <= 64 and spec["inputs"]["height"] <= 64
        if kind == "KSampler":
            assert spec["inputs"]["steps"] <= 3
        if kind == "EmptyLatentImage":  # batch = frames on the native road
            assert spec["inputs"]["batch_size"] <= 4
            assert spec["inputs"]["width"] <= 64 and spec["inputs"]["height"] <= 64
    comfy_only = {n["class_type"] for n in graph.values()} & COMFY_ONLY
    assert bool(comfy_only) == (name in NATIVE | {NATIVE_LCM}), (name, comfy_only)
    if comfy_only:
        # The native road's graphs need ComfyUI itself (KSampler's sampling, CLIPLoader's CLIP, VAELoader), which CI
        # does not have and which this test has no stand-ins for: they are schema-checked above and run in a real
        # ComfyUI 0.3.64 instead (README, "The native road").
        pytest.skip(f"{name}: {sorted(comfy_only)} run only inside ComfyUI (schemas checked)")
    saved = run_api_graph(graph)
    finished = {i: saved.pop(i) for i, n in graph.items() if n["class_type"] == "VHS_VideoCombine"}
    videos = [v for v in saved.values() if isinstance(v, torch.Tensor) and v.shape[0] > 1]
    assert videos
    if name == f"{WORKFLOWS['postprocess']}.json":  # decode -> RIFE x2 -> upscale x2 -> Video Combine
        ((frames),) = finished.values()
        sampler = next(n["inputs"] for n in graph.values() if n["class_type"] == "VideoBoothSampler")
        assert frames.shape == ((sampler["frames"] - 1) * 2 + 1, 128, 128, 3)
    assert bool(finished) == (name == f"{WORKFLOWS['postprocess']}.json")
    for frames in videos:
        assert frames.shape[1:] == (64, 64, 3) and frames.shape[0] % 4 == 0
        assert torch.isfinite(frames).all() and 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    if name == f"{WORKFLOWS['best_of_n']}.json":  # the best video of the sampler's batch, its seed, every seed ranked
        sampler = next(n["inputs"] for n in graph.values() if n["class_type"] == "VideoBoothSampler")
        ranking, best_seed = (saved[i] for i, n in graph.items() if n["class_type"] == "PreviewAny")
        assert best_seed in range(sampler["seed"], sampler["seed"] + sampler["batch"]) and sampler["batch"] > 1
        assert ranking.startswith(f"1. seed {best_seed}: ") and len(ranking.splitlines()) == sampler["batch"]
        assert [v.shape[0] for v in videos] == [sampler["frames"]]


def test_best_of_n_reads_its_sampler_and_prompt() -> None:
    """Best of N is told the sampler's seed and frames and the prompt by hand: they must agree, or it splits the
    batch wrongly and reports wrong seeds."""
    ui = json.loads((UI_DIR / f"{WORKFLOWS['best_of_n']}.json").read_text())
    names = {t: widget_names(t) for t in ("VideoBoothSampler", "VideoBoothBestOfN", "VideoBoothTextEncode")}
    by_type = {n["type"]: dict(zip(names[n["type"]], n["widgets_values"])) for n in ui["nodes"] if n["type"] in names}
    api = json.loads((API_DIR / f"{WORKFLOWS['best_of_n']}.json").read_text())
    api_by_type = {n["class_type"]: n["inputs"] for n in api.values() if n["class_type"] in names}
    for graph in (by_type, api_by_type):
        sampler, best_of, text = graph["VideoBoothSampler"], graph["VideoBoothBestOfN"], graph["VideoBoothTextEncode"]
        assert (best_of["seed"], best_of["frames_per_video"]) == (sampler["seed"], sampler["frames"])
        assert best_of["prompt"] == text["prompt"] and sampler["batch"] > 1


def test_compare_twin_uses_one_seed_with_and_without_the_image_prompt(models_dir) -> None:
    graph = json.loads((API_DIR / f"{WORKFLOWS['compare']}.json").read_text())
    samplers = [n for n in graph.values() if n["class_type"] == "VideoBoothSampler"]
    assert len(samplers) == 2
    assert samplers[0]["inputs"]["seed"] == samplers[1]["inputs"]["seed"]
    assert sorted("exemplar" in s["inputs"] for s in samplers) == [False, True]
