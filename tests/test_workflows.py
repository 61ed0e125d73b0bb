"""The shipped UI workflows (workflows/*.json, LiteGraph format): every node type is known (this pack, the ComfyUI
core table or the third-party table of workflow_helpers.py), every link joins an output and an input of the same
type, the link table agrees with the nodes' inputs/outputs, and widget values fit the schemas; each has an API twin
with the same pack nodes, the fast sampler with the official one named in its notes, the shipped subject photo, a
thumbnail, and its model files' sources. Their layout: test_workflows_layout.py; the API twins' runs:
test_workflows_api.py.
"""

from __future__ import annotations

import json

import pytest
from workflow_helpers import (
    ANY,
    API_DIR,
    API_WORKFLOWS,
    EXTRA_WIDGETS,
    FILES,
    MAPPINGS,
    NATIVE,
    NATIVE_LCM,
    REPO,
    SUBJECT_PHOTO,
    THIRD_PARTY_NODES,
    UI_DIR,
    UI_WORKFLOWS,
    VIDEOCRAFTER,
    WORKFLOWS,
    check_value,
    check_vhs_widgets,
    has_control,
    is_widget,
    schema,
    widget_names,
)

from videobooth_core.settings import VIDEOCRAFTER_SETTINGS


def test_the_expected_workflows_ship() -> None:
    expected = {f"{title}.json" for title in WORKFLOWS.values()}
    assert expected == set(UI_WORKFLOWS)
    assert expected == set(API_WORKFLOWS)


def test_template_titles_are_file_names_a_person_reads() -> None:
    """The template browser titles a pack's workflow by its file name (frontend 1.27.10 and 1.58.1 alike: a
    custom node template's title and description are its name), and the server lists them by that name: names
    that read as titles, start with the pack's name, and hold only characters every file system and URL keeps."""
    for title in WORKFLOWS.values():
        assert title.startswith("VideoBooth ") and not set(title) & set('\\/:*?"<>|#%&_'), title
        assert len(title) <= 33, title  # 1.58.1's template card shows about that much on one line, then cuts it
        assert (UI_DIR / f"{title}.jpg").is_file(), title


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_is_valid(name) -> None:
    graph = json.loads((UI_DIR / name).read_text())
    assert graph["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in graph, key
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert len(nodes) == len(graph["nodes"]) and max(nodes) <= graph["last_node_id"]
    links = {link[0]: link for link in graph["links"]}
    assert len(links) == len(graph["links"]) and (not links or max(links) <= graph["last_link_id"])
    assert sorted(n["order"] for n in nodes.values()) == list(range(len(nodes)))

    for node in nodes.values():
        where = (name, node["id"], node["type"])
        inputs, outputs = schema(node["type"])  # KeyError: an unknown node type
        by_name = {i[0]: i for i in inputs}
        assert node["properties"]["Node name for S&R"] == node["type"]
        for key in ("pos", "size", "flags", "mode"):
            assert key in node, (where, key)
        # slots: names known, types as declared; every input slot that is not a widget is listed
        for slot in node["inputs"]:
            _, kind, _ = by_name[slot["name"]]
            assert slot["type"] == ("COMBO" if isinstance(kind, list) or kind == FILES else kind), (where, slot)
            if slot["link"] is not None:
                link = links[slot["link"]]
                assert link[3] == node["id"] and node["inputs"][link[4]] is slot, (where, slot)
        assert {s["name"] for s in node["inputs"] if "widget" not in s} == {
            n for n, kind, _ in inputs if not is_widget(kind)}, where
        assert [o["type"] for o in node["outputs"]] == list(outputs), where
        for index, out in enumerate(node["outputs"]):
            for link_id in out["links"] or []:
                assert links[link_id][1] == node["id"] and links[link_id][2] == index, (where, link_id)
        if node["type"] == "VHS_VideoCombine":
            check_vhs_widgets(where, inputs, node["widgets_values"])
            continue
        # widget values, in the order of the widget inputs (a control value after a seed)
        values = list(node.get("widgets_values", []))
        for input_name, kind, options in inputs:
            if not is_widget(kind):
                continue
            assert values, (where, input_name, "missing widget value")
            check_value(where, input_name, kind, options, values.pop(0))
            if has_control(input_name, kind, options):
                assert values.pop(0) in ("fixed", "randomize", "increment", "decrement"), where
        assert len(values) == EXTRA_WIDGETS.get(node["type"], 0), (where, "extra widget values", values)

    for link_id, source, source_slot, target, target_slot, kind in graph["links"]:
        source_node, target_node = nodes[source], nodes[target]
        out = source_node["outputs"][source_slot]
        slot = target_node["inputs"][target_slot]
        assert link_id in out["links"] and slot["link"] == link_id, (name, link_id)
        assert schema(source_node["type"])[1][source_slot] == kind == out["type"], (name, link_id)
        declared = {i[0]: i[1] for i in schema(target_node["type"])[0]}[slot["name"]]
        assert declared in (kind, ANY), (name, link_id, slot["name"], declared, kind)
    # every node output goes somewhere or is an optional extra (a MASK or preview nobody uses is fine)
    for node in nodes.values():
        if node["type"].startswith("VideoBooth") and node["type"] != "VideoBoothImagePrompt":
            assert all(o["links"] for o in node["outputs"]), (name, node["id"], "dangling output")


def _ui_to_api_types(graph: dict) -> list[str]:
    return sorted(n["type"] for n in graph["nodes"] if n["type"] in MAPPINGS)


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_has_an_api_twin_with_the_same_pack_nodes(name) -> None:
    ui = json.loads((UI_DIR / name).read_text())
    api = json.loads((API_DIR / name).read_text())
    assert _ui_to_api_types(ui) == sorted(n["class_type"] for n in api.values() if n["class_type"] in MAPPINGS)
    # and the other packs' nodes too (the post-processing chain), so that the twin's run checks their wiring
    assert sorted(n["type"] for n in ui["nodes"] if n["type"] in THIRD_PARTY_NODES) == sorted(
        n["class_type"] for n in api.values() if n["class_type"] in THIRD_PARTY_NODES), name


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_uses_the_fast_sampler_and_names_the_official_one(name) -> None:
    graph = json.loads((UI_DIR / name).read_text())
    names = [i[0] for i in schema("VideoBoothSampler")[0] if is_widget(i[1])]
    names.insert(names.index("seed") + 1, "control_after_generate")
    samplers = [dict(zip(names, n["widgets_values"])) for n in graph["nodes"] if n["type"] == "VideoBoothSampler"]
    notes = " ".join(n["widgets_values"][0] for n in graph["nodes"] if n["type"] == "Note")
    if name in VIDEOCRAFTER:  # another model: the VideoCrafter Sampler with the official DDIM, named in the note
        assert samplers == []
        names = widget_names("VideoBoothVideoCrafterSampler")
        crafters = [dict(zip(names, n["widgets_values"])) for n in graph["nodes"]
                    if n["type"] == "VideoBoothVideoCrafterSampler"]
        official = {k: VIDEOCRAFTER_SETTINGS[k].default for k in ("frames", "sampler", "steps", "eta", "cfg", "seed")}
        assert [{k: c[k] for k in official} for c in crafters] == [official], (name, crafters)
        assert [(c["width"], c["height"], c["fps"], c["negative_prompt"]) for c in crafters] == [(0, 0, 0, "")], name
        for said in ("official DDIM", "steps 50", "eta 1.0", "cfg 12.0", "seed 123", "models/videocrafter/"):
            assert said in notes, (name, said)
        return
    if name == NATIVE_LCM:  # SamplerCustom lcm, 4 steps, cfg 1 (checked in tests/test_native_lcm.py)
        assert samplers == []
    elif name in NATIVE:  # KSampler with the settings that match the pack's ddim / trailing, and the note says so
        assert samplers == []
        ksamplers = [dict(zip(widget_names("KSampler"), n["widgets_values"])) for n in graph["nodes"]
                     if n["type"] == "KSampler"]
        assert [(k["sampler_name"], k["scheduler"], k["steps"], k["cfg"], k["denoise"]) for k in ksamplers] == [
            ("ddim", "simple", 25, 4.0, 1.0)], name
        for said in ("ddim", "scheduler simple", "trailing", "official_guidance", "clip_l", "stable_diffusion"):
            assert said in notes, (name, said)
    else:
        assert samplers
    for sampler in samplers:
        settings = (sampler["sampler"], sampler["spacing"], sampler["steps"], sampler["cfg"])
        assert settings == ("dpmpp_2m", "trailing", 25, 4.0), (name, settings)
    for official in ("ddpm", "steps 250", "cfg 4.0"):
        assert official in notes, (name, official)


def test_every_workflow_uses_the_shipped_subject_photo() -> None:
    from PIL import Image

    photo = Image.open(REPO / "assets" / SUBJECT_PHOTO)
    assert photo.mode == "RGBA" and photo.getchannel("A").getextrema() == (0, 255)  # the mask is its alpha
    subject_share = sum(photo.getchannel("A").histogram()[128:]) / (photo.width * photo.height)
    assert 0.15 < subject_share < 0.7, subject_share
    images = [n["widgets_values"][0] for p in UI_DIR.glob("*.json") for n in json.loads(p.read_text())["nodes"]
              if n["type"] == "LoadImage"]
    images += [n["inputs"]["image"] for p in API_DIR.glob("*.json") for n in json.loads(p.read_text()).values()
               if n["class_type"] == "LoadImage"]
    # two_subjects loads it twice; VideoCrafter I2V starts from it; VideoCrafter T2V has no LoadImage
    assert len(images) == 26 and set(images) == {SUBJECT_PHOTO}, images


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_has_a_thumbnail(name) -> None:
    from PIL import Image

    thumbnail = Image.open(UI_DIR / name.replace(".json", ".jpg"))  # the template browser asks for <name>.jpg
    assert thumbnail.format == "JPEG" and 400 <= thumbnail.width <= 1024 and thumbnail.height >= 200


@pytest.mark.parametrize("name", sorted(NATIVE | {NATIVE_LCM}))
def test_native_workflow_names_where_to_get_each_model(name) -> None:
    """Every loader of the native workflows lists its files in properties.models (the frontend's missing-models
    dialog offers the download), with the same sources as the other workflows."""
    graph = json.loads((UI_DIR / name).read_text())
    sources = {"clip_l.safetensors": "comfyanonymous/flux_text_encoders",
               "vae-ft-ema-560000-ema-pruned.safetensors": "stabilityai/sd-vae-ft-ema-original",
               "watermark_remove_module.pt": "yumingj/VideoBooth_models", "mapper.pt": "yumingj/VideoBooth_models",
               "clip_vision_l.safetensors": "openai/clip-vit-large-patch14"}
    loaders = {"VideoBoothNativeLoader", "VideoBoothVAELoader", "VideoBoothCLIPVisionLoader", "CLIPLoader", "VAELoader"}
    seen = set()
    for node in graph["nodes"]:
        if node["type"] not in loaders:
            assert "models" not in node["properties"], (name, node["type"])
            continue
        files = [v for v in node["widgets_values"] if isinstance(v, str) and v in sources]
        models = node["properties"]["models"]
        assert [m["name"] for m in models] == files and files, (name, node["type"], models)
        for model in models:
            assert model["url"].startswith(f"https://huggingface.co/{sources[model['name']]}/resolve/main/"), model
            seen.add(model["name"])
    assert seen == set(sources), (name, seen)


@pytest.mark.parametrize("name", sorted(VIDEOCRAFTER))
def test_videocrafter_workflow_names_where_to_get_its_model(name) -> None:
    """The VideoCrafter Loader lists its file in properties.models: the released model.ckpt of its Hugging Face
    repository, saved under the kind's name in models/videocrafter (the four releases share the name model.ckpt)."""
    graph = json.loads((UI_DIR / name).read_text())
    sources = {"videocrafter2.ckpt": "VideoCrafter/VideoCrafter2",
               "videocrafter1-i2v-512.ckpt": "VideoCrafter/Image2Video-512"}
    loaders = [n for n in graph["nodes"] if n["type"] == "VideoBoothVideoCrafterLoader"]
    assert len(loaders) == 1 and all("models" not in n["properties"] for n in graph["nodes"] if n not in loaders)
    (file,) = [v for v in loaders[0]["widgets_values"] if v in sources]
    assert loaders[0]["properties"]["models"] == [
        {"name": file, "url": f"https://huggingface.co/{sources[file]}/resolve/main/model.ckpt",
         "directory": "videocrafter"}], name
    kind = "videocrafter2" if name == f"{WORKFLOWS['videocrafter_t2v']}.json" else "videocrafter1-i2v-512"
    assert file == f"{kind}.ckpt"  # the name make-tiny --family gives it, which the API twin runs
    starts = [n for n in graph["nodes"] if n["type"] == "VideoBoothVideoCrafterSampler" and n["inputs"][1]["link"]]
    assert bool(starts) == (kind == "videocrafter1-i2v-512"), name  # the I2V model needs a start image


def test_no_second_template_folder_shadows_workflows() -> None:
    # ComfyUI serves /api/workflow_templates/<pack>/ from the first of these folders that exists
    # (app/custom_node_manager.py), so another one would hide workflows/ from the template browser.
    assert [d for d in ("example_workflows", "example", "examples", "workflow") if (REPO / d).exists()] == []
