"""VideoBooth LCM Schedule (issue 27, the native four-step road) and its workflow.

The node is run on stand-ins of ComfyUI 0.3.64's sampling classes (``comfy_stand_in``; CI has no ComfyUI): the grid
table, the timestep and sigma maps, the SIGMAS of each step count, the refusals. That ComfyUI's lcm loop with its
MODEL and SIGMAS is the core's ``sample_lcm`` is ``test_frames_as_batch.py``'s; the real classes ran in ComfyUI 0.3.64
(README). The workflow's settings and wiring are checked here (the shared checks of every workflow are
``test_workflows.py``'s).
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import comfy_stand_in
from conftest import PACK_NAME, import_pack

REPO = Path(__file__).resolve().parents[1]
TITLE = "VideoBooth native 4 steps (lcm)"
pack = import_pack()
native_lcm = sys.modules[f"{PACK_NAME}.nodes.native_lcm"]
errors = importlib.import_module(f"{PACK_NAME}.videobooth_core.errors")
lcm = importlib.import_module(f"{PACK_NAME}.videobooth_core.sampling.lcm")


@pytest.fixture
def schedule(monkeypatch):
    """The node's function with the stand-in ComfyUI installed."""
    comfy_stand_in.install(monkeypatch)
    return native_lcm.VideoBoothLCMSchedule().schedule


def test_the_table_is_the_loras_grid_and_timestep_maps_back_to_it(schedule) -> None:
    patcher = comfy_stand_in.native_patcher()
    patched, _ = schedule(patcher, 4)
    sampling = patched.object_patches["model_sampling"]
    assert patcher.object_patches == {} and patched is not patcher  # a clone is patched, the input is left alone
    grid = lcm.solver_timesteps()
    full = comfy_stand_in.ModelSamplingDiscrete(patcher.model.model_config)
    assert len(sampling.sigmas) == 50 and torch.equal(sampling.sigmas, full.sigmas[grid])
    assert sampling.timestep(sampling.sigmas).tolist() == grid  # every point exactly, all at once (per frame)
    # between two points: the nearer in log sigma (ComfyUI's rule), as the grid's original timestep
    low, high = sampling.sigmas[24], sampling.sigmas[25]  # timesteps 497 and 518
    assert int(sampling.timestep(low * (high / low) ** 0.4)) == 497
    assert int(sampling.timestep(low * (high / low) ** 0.6)) == 518
    # sigma(t) and percent_to_sigma read the whole schedule: the image prompt's window is as without the node
    timesteps = torch.tensor([0.0, 16.0, 250.5, 758.0, 999.0])
    assert torch.equal(sampling.sigma(timesteps), full.sigma(timesteps))
    assert [sampling.percent_to_sigma(p) for p in (0.0, 0.3, 0.75, 1.0)] == \
        [full.percent_to_sigma(p) for p in (0.0, 0.3, 0.75, 1.0)]
    boundary = sampling.calculate_denoised(sampling.sigmas[-1:], torch.ones(1, 1), torch.ones(1, 1))
    assert isinstance(sampling, comfy_stand_in.LCM) and boundary.shape == (1, 1)  # ComfyUI's LCM boundary on it


@pytest.mark.parametrize("steps, expected", [(1, [999]), (2, [999, 497]), (4, [999, 758, 518, 277]),
                                             (8, [999, 879, 758, 638, 518, 397, 277, 156])])
def test_the_sigmas_visit_the_cores_lcm_timesteps(schedule, steps: int, expected: list[int]) -> None:
    patched, sigmas = schedule(comfy_stand_in.native_patcher(), steps)
    sampling = patched.object_patches["model_sampling"]
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,) and float(sigmas[-1]) == 0.0
    assert [int(sampling.timestep(s)) for s in sigmas[:-1]] == expected == lcm.lcm_timesteps(steps)
    assert bool((sigmas[:-1] > sigmas[1:]).all()) and float(sigmas[0]) == float(sampling.sigma_max)
    assert lcm.grid_positions(steps) == [lcm.solver_timesteps().index(t) for t in expected]


def test_a_release_with_the_lcm_boundary_in_model_sampling_is_taken(monkeypatch) -> None:
    comfy_stand_in.install(monkeypatch)

    class MovedLCM(comfy_stand_in.LCM):
        pass

    monkeypatch.setattr(sys.modules["comfy.model_sampling"], "LCM", MovedLCM, raising=False)
    monkeypatch.delitem(sys.modules, "comfy_extras.nodes_model_advanced")
    patched, _ = native_lcm.VideoBoothLCMSchedule().schedule(comfy_stand_in.native_patcher(), 4)
    assert isinstance(patched.object_patches["model_sampling"], MovedLCM)


def test_bad_steps_and_other_models_are_refused_in_the_widgets_words(schedule) -> None:
    for steps in (0, 51):
        with pytest.raises(errors.SamplingError,
                           match=rf"^steps must be (at least 1 and at most|between 1 and) 50, got {steps}; the"):
            schedule(comfy_stand_in.native_patcher(), steps)
    sd15 = comfy_stand_in.Patcher(types.SimpleNamespace(model_config=None))
    with pytest.raises(errors.VideoBoothError, match=r"needs the MODEL of VideoBooth Native Loader .*: "
                                                     r"'SimpleNamespace'; connect"):
        schedule(sd15, 4)
    assert sd15.object_patches == {}


def test_outside_comfyui_the_node_says_where_it_runs(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "comfy", None)  # import comfy... raises ImportError
    monkeypatch.setitem(sys.modules, "comfy.model_sampling", None)
    with pytest.raises(errors.VideoBoothError, match="runs inside ComfyUI only .* generate --sampler lcm --steps 4"):
        native_lcm.VideoBoothLCMSchedule().schedule(comfy_stand_in.native_patcher(), 4)


# -- the workflow ----------------------------------------------------------------------------------------------
def _ui() -> tuple[dict, dict]:
    """(the UI graph, {node id: (type, {widget: value})}) of the shipped workflow."""
    from test_workflows import widget_names

    graph = json.loads((REPO / "workflows" / f"{TITLE}.json").read_text())
    values = {}
    for node in graph["nodes"]:
        raw = node.get("widgets_values", [])
        widgets = raw if isinstance(raw, dict) else dict(zip(widget_names(node["type"]), raw))
        values[node["id"]] = (node["type"], widgets)
    return graph, values


def _edges_ui(graph: dict, nodes: dict) -> set[tuple[str, int, str, str]]:
    by_id = {n["id"]: n for n in graph["nodes"]}
    return {(nodes[s][0], slot, nodes[t][0], by_id[t]["inputs"][t_slot]["name"])
            for _, s, slot, t, t_slot, _ in graph["links"]}


def _edges_api(api: dict) -> set[tuple[str, int, str, str]]:
    return {(api[v[0]]["class_type"], v[1], node["class_type"], name)
            for node in api.values() for name, v in node["inputs"].items() if isinstance(v, list)}


def test_the_workflow_runs_the_lora_through_the_schedule_into_samplercustom_lcm_at_cfg_1() -> None:
    graph, nodes = _ui()
    by_type = {kind: widgets for kind, widgets in nodes.values()}
    assert by_type["LoraLoaderModelOnly"] == {"lora_name": "videobooth_lcm_lora.safetensors", "strength_model": 1.0}
    assert by_type["VideoBoothLCMSchedule"] == {"steps": 4}
    assert by_type["KSamplerSelect"] == {"sampler_name": "lcm"}
    assert (by_type["SamplerCustom"]["cfg"], by_type["SamplerCustom"]["add_noise"]) == (1.0, True)
    assert by_type["EmptyLatentImage"]["batch_size"] == 16  # frames as batch, the trained length
    assert not {"KSampler", "ModelSamplingDiscrete", "BasicScheduler"} & set(by_type)
    edges = _edges_ui(graph, nodes)
    for edge in [("VideoBoothNativeLoader", 0, "LoraLoaderModelOnly", "model"),
                 ("LoraLoaderModelOnly", 0, "VideoBoothLCMSchedule", "model"),
                 ("VideoBoothLCMSchedule", 0, "SamplerCustom", "model"),
                 ("VideoBoothLCMSchedule", 1, "SamplerCustom", "sigmas"),
                 ("KSamplerSelect", 0, "SamplerCustom", "sampler"),
                 ("VideoBoothNativeConditioning", 0, "SamplerCustom", "positive"),
                 ("VideoBoothNativeConditioning", 1, "SamplerCustom", "negative"),
                 ("SamplerCustom", 0, "VAEDecode", "samples")]:
        assert edge in edges, edge
    note = by_type["Note"]["text"]
    for said in ("train --stage distill", "models/loras", "999, 758, 518, 277", "cfg 1.0", "999, 759, 499, 259",
                 "ddpm", "steps 250", "cfg 4.0"):
        assert said in note, said


def test_the_api_twin_has_the_workflows_wiring_and_settings_at_the_tiny_size() -> None:
    graph, nodes = _ui()
    api = json.loads((REPO / "tests" / "workflows_api" / f"{TITLE}.json").read_text())
    assert _edges_api(api) == _edges_ui(graph, nodes)
    by_type = {node["class_type"]: node["inputs"] for node in api.values()}
    assert by_type["VideoBoothLCMSchedule"]["steps"] == 4 and by_type["KSamplerSelect"]["sampler_name"] == "lcm"
    assert (by_type["SamplerCustom"]["cfg"], by_type["LoraLoaderModelOnly"]["lora_name"]) == (
        1.0, "videobooth_lcm_lora.safetensors")
    latent = by_type["EmptyLatentImage"]
    assert (latent["batch_size"], latent["width"], latent["height"]) == (4, 64, 64)
