"""How the shipped UI workflows look in the ComfyUI frontend (1.27.10 and 1.58.1, classic and Nodes 2.0): nodes
stored at least as large as the frontend draws them, no node covering another before or after a run, and a saved
view that opens with the whole graph readable and clear of the frontends' bars.
"""

from __future__ import annotations

import json
import math

import pytest
from workflow_helpers import MAPPINGS, UI_DIR, UI_WORKFLOWS, WORKFLOWS, has_control, is_widget, schema

# -- how the UI workflows look in the frontend ----------------------------------------------------------------
# Geometry of the ComfyUI frontend (1.27.10 with ComfyUI 0.3.64, and 1.58.1): a node's body starts at pos and is
# size big, its title bar (LiteGraph.NODE_TITLE_HEIGHT) sits above pos. "Fit view" (createBounds + fitToBounds)
# pads the nodes' bounds by 10 and zooms to 0.75 of the canvas; on a 1920 x 1080 window 1.27's canvas is 1856 x 1002
# (right of the side bar, below the top bar). Below 8 px / 14 px text (LiteGraph.Canvas.MinFontSizeForLOD over
# NODE_TEXT_SIZE) the frontend draws nodes without any text.
TITLE_HEIGHT = 30
CANVAS = (1856, 1000)
TEXT_DROPPED_BELOW = 8 / 14
# After a run the Sampler draws its preview strip under its widgets: the node grew 212 px (422 -> 634, 4 frames side
# by side at 300 px) in 1.27.10 and in 1.58.1 (classic renderer), drawn over whatever lies below it.
PREVIEW_ROOM = 250
# KSampler's latent preview grows it below as well, and so does the VideoCrafter Sampler's (bridge.step_reporter;
# with --preview-method latent2rgb, 4 frames at 64x64: 422 -> 626 px classic in 1.27.10 and 1.58.1, 516 -> 764 drawn
# in Nodes 2.0)
PREVIEW_NODES = {"VideoBoothSampler", "KSampler", "VideoBoothVideoCrafterSampler", "SamplerCustom"}
# Other nodes grow after a run to show what they got (measured with the shipped workflows, square videos):
# PreviewImage 190 -> 246 (classic) or 266 (Nodes 2.0), PreviewAny 88 -> 122 (1.58.1), SaveAnimatedWEBP to its
# width + 146 in 1.27.10 (340 -> 486, 380 -> 526; 1.58.1's classic renderer keeps the stored size).
AFTER_RUN_HEIGHT = {"PreviewImage": lambda width: 270, "PreviewAny": lambda width: 122,
                    "SaveAnimatedWEBP": lambda width: width + 146}
# "Nodes 2.0" (Comfy.VueNodes.Enabled, frontend 1.58.1) draws a node as tall as its content needs, title included,
# or its stored size and the pack's badge below the widgets (VUE_BADGE) when that is more; read off the live page
# (DOM boxes in canvas units) with the shipped workflows. Other nodes not listed are drawn at their stored size.
VUE_HEIGHT = {
    "VideoBoothModelLoader": 201, "VideoBoothVAELoader": 173, "VideoBoothCLIPLoader": 201,
    "VideoBoothCLIPVisionLoader": 173, "VideoBoothLoRA": 220, "VideoBoothImagePrompt": 165,
    "VideoBoothImagePromptEncode": 129, "VideoBoothTextEncode": 301, "VideoBoothLatentInjection": 213,
    "VideoBoothSampler": 497, "VideoBoothDecode": 137, "VideoBoothMetricModels": 145, "VideoBoothBestOfN": 356,
    "VideoBoothStartFrames": 193, "VideoBoothContextOptions": 200, "VideoBoothSubjects": 277,
    "LoadImage": 353, "PreviewAny": 180, "RIFE VFI": 377, "UpscaleModelLoader": 116,
    "ImageUpscaleWithModel": 85, "VHS_VideoCombine": 594,
    # the native road's nodes, stored smaller than drawn (1.58.1, Nodes 2.0, live page)
    "VideoBoothNativeLoader": 228, "VideoBoothNativeConditioning": 340, "VideoBoothNativeContextWindows": 172,
    "KSampler": 292, "EmptyLatentImage": 148, "CLIPLoader": 144, "VAELoader": 92, "VAEDecode": 84,
    # the VideoCrafter nodes, stored smaller than drawn (1.58.1, Nodes 2.0, live page; the Sampler with its sampler
    # widget and context socket, 516 at its stored width 300 and at 225, its narrowest)
    "VideoBoothVideoCrafterLoader": 172, "VideoBoothVideoCrafterSampler": 516,
    # the native four-step road's (1.58.1, Nodes 2.0, live page)
    "LoraLoaderModelOnly": 120, "VideoBoothLCMSchedule": 136, "KSamplerSelect": 92, "SamplerCustom": 260,
}
VUE_BADGE = 26  # Best of N stored 300 high is drawn 356 high (300 + title + badge)
VUE_MIN_WIDTH = {"VideoBoothStartFrames": 394, "VideoBoothMetricModels": 303}
# Where a saved view (extra.ds) must put the graph so that nothing opens under the frontends' bars, in window pixels
# (left, top, right, bottom): 1.27.10's canvas starts right of the side bar and below the top bar (64, 78); 1.58.1's
# canvas is the whole window, with the side bar (56 px) and the tab and graph bars (about 90 px) drawn over it.
SAFE_AREAS = {"1.27.10": ((64, 78), (64, 78, 1920, 1080)), "1.58.1": ((0, 0), (70, 95, 1920, 1080))}


def node_rects(graph: dict, after_run: bool = True) -> dict[int, tuple[float, float, float, float]]:
    """{node id: (left, top, right, bottom)} including the title bar, as large as either renderer draws the node
    and, with ``after_run``, with the room a Sampler's preview (and other after-run growth) takes below it."""
    rects = {}
    for n in graph["nodes"]:
        width = max(n["size"][0], VUE_MIN_WIDTH.get(n["type"], 0))
        badge = VUE_BADGE if n["type"] in MAPPINGS else 0
        height = max(n["size"][1] + TITLE_HEIGHT + badge, VUE_HEIGHT.get(n["type"], 0))
        if after_run and n["type"] in PREVIEW_NODES:
            height += PREVIEW_ROOM
        elif after_run and n["type"] in AFTER_RUN_HEIGHT:
            height = max(height, AFTER_RUN_HEIGHT[n["type"]](width) + TITLE_HEIGHT)
        top = n["pos"][1] - TITLE_HEIGHT
        rects[n["id"]] = (n["pos"][0], top, n["pos"][0] + width, top + height)
    return rects


def overlapping(rects: dict) -> list[tuple[int, int]]:
    ids = sorted(rects)
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
            if rects[a][0] < rects[b][2] and rects[b][0] < rects[a][2]
            and rects[a][1] < rects[b][3] and rects[b][1] < rects[a][3]]


def bounds(graph: dict) -> tuple[float, float, float, float]:
    rects = node_rects(graph).values()
    return (min(r[0] for r in rects), min(r[1] for r in rects), max(r[2] for r in rects), max(r[3] for r in rects))


def fit_view_zoom(graph: dict) -> float:
    left, top, right, bottom = bounds(graph)
    return 0.75 * min(CANVAS[0] / (right - left + 20), CANVAS[1] / (bottom - top + 20))


def saved_view(graph: dict) -> dict:
    """The view a workflow should open with (extra.ds): the whole graph, previews included, as large as fits the part
    of the window that both frontends leave free, centred there (scale rounded down to 3 decimals)."""
    left, top, right, bottom = bounds(graph)
    # the window's free part in canvas pixels (the view's coordinates), common to both frontends, 10 px inside
    x0, y0 = (max(safe[i] - origin[i] for origin, safe in SAFE_AREAS.values()) + 10 for i in (0, 1))
    x1, y1 = (min(safe[i + 2] - origin[i] for origin, safe in SAFE_AREAS.values()) - 10 for i in (0, 1))
    scale = math.floor(1000 * min((x1 - x0) / (right - left), (y1 - y0) / (bottom - top), 1.0)) / 1000
    offset_x = (x0 + (x1 - x0 - (right - left) * scale) / 2) / scale - left
    offset_y = (y0 + (y1 - y0 - (bottom - top) * scale) / 2) / scale - top
    return {"scale": scale, "offset": [round(offset_x, 1), round(offset_y, 1)]}


def on_screen(graph: dict, frontend: str) -> tuple[float, float, float, float]:
    """Where the graph's bounds land in the window when the saved view opens in ``frontend``."""
    (origin_x, origin_y), _ = SAFE_AREAS[frontend]
    scale, (offset_x, offset_y) = graph["extra"]["ds"]["scale"], graph["extra"]["ds"]["offset"]
    left, top, right, bottom = bounds(graph)
    return (origin_x + (left + offset_x) * scale, origin_y + (top + offset_y) * scale,
            origin_x + (right + offset_x) * scale, origin_y + (bottom + offset_y) * scale)


def test_the_overlap_check_sees_a_title_bar_the_preview_room_and_vue_heights() -> None:
    below = {"nodes": [{"id": 1, "type": "Note", "pos": [0, 0], "size": [100, 100]},
                       {"id": 2, "type": "Note", "pos": [0, 120], "size": [100, 50]}]}
    assert overlapping(node_rects(below)) == [(1, 2)]  # node 2's title bar (90..120) covers node 1's bottom
    below["nodes"][1]["pos"] = [0, 130]
    assert overlapping(node_rects(below)) == []
    below["nodes"][0].update(type="VideoBoothSampler", size=[300, 422])  # its preview needs 250 more below it
    below["nodes"][1]["pos"] = [0, 422 + PREVIEW_ROOM + TITLE_HEIGHT - 1]
    assert overlapping(node_rects(below)) == [(1, 2)] and overlapping(node_rects(below, after_run=False)) == []
    below["nodes"][1]["pos"][1] += 1 + VUE_HEIGHT["VideoBoothSampler"] - 422 - TITLE_HEIGHT
    assert overlapping(node_rects(below)) == []
    below["nodes"][1]["pos"][1] -= 1  # Nodes 2.0 draws the Sampler taller than the file stores
    assert overlapping(node_rects(below)) == [(1, 2)]


# Minimum node widths the frontend (1.27.10) enforced on load, read off the live page (they follow the widest
# label + value); a stored width below it is drawn wider and may cover a neighbour.
FRONTEND_MIN_WIDTH = {
    "VideoBoothModelLoader": 210, "VideoBoothVAELoader": 210, "VideoBoothCLIPLoader": 280,
    "VideoBoothCLIPVisionLoader": 236, "VideoBoothConvertWeights": 219, "VideoBoothApplySDCheckpoint": 267,
    "VideoBoothLoRA": 210, "VideoBoothImagePrompt": 210, "VideoBoothImagePromptEncode": 310,
    "VideoBoothTextEncode": 321, "VideoBoothLatentInjection": 247, "VideoBoothSampler": 255, "VideoBoothDecode": 210,
    "VideoBoothMetricModels": 288, "VideoBoothScore": 210, "VideoBoothBestOfN": 264, "VideoBoothDrift": 269,
    "VideoBoothSubjects": 210, "VideoBoothContextOptions": 300, "VideoBoothStartFrames": 370,
    "VideoBoothNativeLoader": 266, "VideoBoothNativeConditioning": 237, "VideoBoothNativeContextWindows": 268,
    # 1.27.10; 1.58.1's classic renderer draws the Loader wider (292). The Sampler: 210 in both (the frontend's
    # least) since its title is "VideoCrafter Sampler" (267 in 1.27.10 with "VideoCrafter Sampler (official DDIM)")
    "VideoBoothVideoCrafterLoader": 277, "VideoBoothVideoCrafterSampler": 210,
    "VideoBoothLCMSchedule": 270,  # 1.27.10 (277 in 1.58.1), a new node's width
}


def frontend_min_height(node_type: str) -> int:
    """The height the frontend (1.27.10) gives a pack node at least, whatever the file stores: 20 px per slot row
    (the more of socket inputs and outputs), 24 per widget (54 for a multiline text, +24 for a seed's control)
    plus 8 below the widgets, and 6 of margin. Checked against the live page for Sampler 422, Text Encode 206,
    Subjects 194, Context Options 130, Start Frames 126, Drift 142 and Best of N 268 (with invert_mask), Decode 78,
    Image Prompt Encode 66, VideoCrafter Loader 106 and VideoCrafter Sampler 422 (three socket rows and its sampler
    combo; 378 with two rows and no combo; the same in 1.58.1's classic)."""
    inputs, outputs = schema(node_type)
    sockets = sum(1 for _, kind, _ in inputs if not is_widget(kind))
    widgets = 0
    for name, kind, options in inputs:
        if is_widget(kind):
            widgets += 54 if kind == "STRING" and options.get("multiline") else 24
            widgets += 24 if has_control(name, kind, options) else 0
    return 20 * max(sockets, len(outputs), 1) + (widgets + 8 if widgets else 0) + 6


def test_the_minimum_height_rule_matches_the_frontend() -> None:
    measured = {"VideoBoothSampler": 422, "VideoBoothTextEncode": 206, "VideoBoothSubjects": 194,
                "VideoBoothContextOptions": 130, "VideoBoothStartFrames": 126, "VideoBoothDrift": 142,
                "VideoBoothDecode": 78, "VideoBoothImagePromptEncode": 66, "VideoBoothBestOfN": 268,
                "VideoBoothVideoCrafterLoader": 106, "VideoBoothVideoCrafterSampler": 422}
    assert {name: frontend_min_height(name) for name in measured} == measured


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_layout_is_readable(name) -> None:
    graph = json.loads((UI_DIR / name).read_text())
    for node in graph["nodes"]:  # stored at least as large as drawn, so the overlap check below sees the real boxes
        if node["type"] in MAPPINGS:
            assert node["size"][1] >= frontend_min_height(node["type"]), (name, node["type"], node["size"])
            assert node["size"][0] >= FRONTEND_MIN_WIDTH[node["type"]], (name, node["type"], node["size"])
    # no node covers another in either renderer, before or after a run (the Sampler's preview has its room)
    assert overlapping(node_rects(graph)) == [], name
    assert fit_view_zoom(graph) >= TEXT_DROPPED_BELOW + 0.05, (name, fit_view_zoom(graph))
    if name == f"{WORKFLOWS['basic']}.json":
        assert fit_view_zoom(graph) >= 0.7, fit_view_zoom(graph)
    # the saved view opens with the whole graph readable and clear of both frontends' bars
    assert graph["extra"]["ds"] == saved_view(graph), (name, saved_view(graph))
    assert graph["extra"]["ds"]["scale"] >= TEXT_DROPPED_BELOW + 0.05, name
    for frontend, (_, (left, top, right, bottom)) in SAFE_AREAS.items():
        x0, y0, x1, y1 = on_screen(graph, frontend)
        assert left <= x0 and top <= y0 and x1 <= right and y1 <= bottom, (name, frontend, (x0, y0, x1, y1))
