"""What the workflow test modules share (import it by name): where the shipped UI workflows (workflows/*.json,
LiteGraph format) and their API twins (tests/workflows_api) live, the pack under test, the schemas of every node
type they may use (this pack's, the ComfyUI core table and the third-party table below) with the checks of a
widget value, and the shipped workflows by role. The tests: test_workflows.py (the UI workflows' structure, notes,
thumbnails, model sources), test_workflows_layout.py (how they look in the frontend), test_workflows_api.py (the
API twins against the schemas, and their runs on the tiny model set).
"""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import PACK_NAME
from conftest import import_pack as _import_pack

REPO = Path(__file__).resolve().parents[1]
UI_DIR = REPO / "workflows"
API_DIR = REPO / "tests" / "workflows_api"
SUBJECT_PHOTO = "videobooth_subject.png"  # assets/, copied into ComfyUI/input by the user


pack = _import_pack()
bridge = sys.modules[f"{PACK_NAME}.nodes._bridge"]
MAPPINGS = pack.NODE_CLASS_MAPPINGS

# -- schemas of the nodes from elsewhere: {type: (inputs [(name, type or combo list, options)], outputs)} ---------
# ComfyUI core, copied from ComfyUI's source (/work/comfyui): nodes.py (LoadImage, SaveImage, PreviewImage),
# comfy_extras/nodes_images.py (SaveAnimatedWEBP), comfy_extras/nodes_upscale_model.py
# (UpscaleModelLoader, ImageUpscaleWithModel), comfy_extras/nodes_preview_any.py (PreviewAny: its input takes any
# type, IO.ANY = "*"; the frontend's text widget is not serialised). FILES marks a combo of file names (not checked).
FILES = "FILES"
ANY = "*"
KSAMPLER_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
    "ddim", "uni_pc", "uni_pc_bh2"]
KSAMPLER_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                       "linear_quadratic", "kl_optimal"]
CORE_NODES: dict[str, tuple[list, tuple]] = {
    "LoadImage": ([("image", FILES, {})], ("IMAGE", "MASK")),
    "SaveImage": ([("images", "IMAGE", {}), ("filename_prefix", "STRING", {})], ()),
    "PreviewImage": ([("images", "IMAGE", {})], ()),
    "SaveAnimatedWEBP": ([("images", "IMAGE", {}), ("filename_prefix", "STRING", {}),
                          ("fps", "FLOAT", {"min": 0.01, "max": 1000.0}), ("lossless", "BOOLEAN", {}),
                          ("quality", "INT", {"min": 0, "max": 100}),
                          ("method", ["default", "fastest", "slowest"], {})], ()),
    "UpscaleModelLoader": ([("model_name", FILES, {})], ("UPSCALE_MODEL",)),
    "ImageUpscaleWithModel": ([("upscale_model", "UPSCALE_MODEL", {}), ("image", "IMAGE", {})], ("IMAGE",)),
    "PreviewAny": ([("source", ANY, {})], ()),
    # the native road's core nodes, copied from ComfyUI 0.3.64's nodes.py (KSampler, EmptyLatentImage, CLIPLoader,
    # VAELoader, VAEDecode) with the sampler and scheduler names of its comfy/samplers.py (KSampler.SAMPLERS,
    # KSampler.SCHEDULERS); CLIPLoader's optional "device" is a widget the frontend saves.
    "KSampler": ([("model", "MODEL", {}), ("seed", "INT", {"min": 0, "max": 0xffffffffffffffff,
                                                           "control_after_generate": True}),
                  ("steps", "INT", {"min": 1, "max": 10000}), ("cfg", "FLOAT", {"min": 0.0, "max": 100.0}),
                  ("sampler_name", KSAMPLER_SAMPLERS, {}), ("scheduler", KSAMPLER_SCHEDULERS, {}),
                  ("positive", "CONDITIONING", {}), ("negative", "CONDITIONING", {}), ("latent_image", "LATENT", {}),
                  ("denoise", "FLOAT", {"min": 0.0, "max": 1.0})], ("LATENT",)),
    "EmptyLatentImage": ([("width", "INT", {"min": 16, "max": 16384}), ("height", "INT", {"min": 16, "max": 16384}),
                          ("batch_size", "INT", {"min": 1, "max": 4096})], ("LATENT",)),
    "CLIPLoader": ([("clip_name", FILES, {}),
                    ("type", ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart",
                              "cosmos", "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image",
                              "hunyuan_image"], {}),
                    ("device", ["default", "cpu"], {})], ("CLIP",)),
    "VAELoader": ([("vae_name", FILES, {})], ("VAE",)),
    "VAEDecode": ([("samples", "LATENT", {}), ("vae", "VAE", {})], ("IMAGE",)),
    # the native four-step road's (issue 27), from ComfyUI 0.3.64's nodes.py (LoraLoaderModelOnly) and
    # comfy_extras/nodes_custom_sampler.py (SamplerCustom, KSamplerSelect: comfy/samplers.py's SAMPLER_NAMES)
    "LoraLoaderModelOnly": ([("model", "MODEL", {}), ("lora_name", FILES, {}),
                             ("strength_model", "FLOAT", {"min": -100.0, "max": 100.0})], ("MODEL",)),
    "KSamplerSelect": ([("sampler_name", KSAMPLER_SAMPLERS, {})], ("SAMPLER",)),
    "SamplerCustom": ([("model", "MODEL", {}), ("add_noise", "BOOLEAN", {}),
                       ("noise_seed", "INT", {"min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
                       ("cfg", "FLOAT", {"min": 0.0, "max": 100.0}), ("positive", "CONDITIONING", {}),
                       ("negative", "CONDITIONING", {}), ("sampler", "SAMPLER", {}), ("sigmas", "SIGMAS", {}),
                       ("latent_image", "LATENT", {})], ("LATENT", "LATENT")),
}
# Core nodes that only ComfyUI can run (no stand-in here): the API twins that use them are schema-checked only.
COMFY_ONLY = {"KSampler", "EmptyLatentImage", "CLIPLoader", "VAELoader", "VAEDecode", "LoraLoaderModelOnly",
              "KSamplerSelect", "SamplerCustom"}
# Widgets the frontend adds beyond the schema's inputs (LoadImage's "upload" button value).
EXTRA_WIDGETS = {"LoadImage": 1}
# Nodes that exist only in the frontend (never in /object_info, never in an API graph).
FRONTEND_NODES: dict[str, tuple[list, tuple]] = {"Note": ([("text", "STRING", {})], ())}

# Third-party nodes of the post-processing workflow, checked against the packs' sources:
#   VHS_VideoCombine: Kosinkadink/ComfyUI-VideoHelperSuite 1.7.9 (4ee72c065db22c9d96c2427954dc69e7b908444b),
#     videohelpersuite/nodes.py class VideoCombine. Its web/js/VHS.core.js saves widgets_values as a dict by
#     widget name (onSerialize), with the chosen format's own widgets (video_formats/<format>.json) after
#     "format" and the preview state last; a list is read only through a legacy conversion table.
#   RIFE VFI: Fannovel16/ComfyUI-Frame-Interpolation (26545cc5, 2026-03-29), vfi_models/rife/__init__.py class
#     RIFE_VFI. Older versions without dtype/torch_compile/batch_size ignore the extra widget values.
THIRD_PARTY_NODES: dict[str, tuple[list, tuple]] = {
    "VHS_VideoCombine": ([("images", "IMAGE", {}), ("frame_rate", "FLOAT", {"min": 1}),
                          ("loop_count", "INT", {"min": 0, "max": 100}), ("filename_prefix", "STRING", {}),
                          ("format", FILES, {}),  # image/gif, image/webp + the installed ffmpeg formats
                          ("pingpong", "BOOLEAN", {}), ("save_output", "BOOLEAN", {}),
                          ("audio", "AUDIO", {}), ("meta_batch", "VHS_BatchManager", {}), ("vae", "VAE", {})],
                         ("VHS_FILENAMES",)),
    "RIFE VFI": ([("ckpt_name", ["rife47.pth", "rife49.pth", "rife417.pth", "rife426.pth",
                                 "sudo_rife4_269.662_testV1_scale1.pth"], {}),
                  ("frames", "IMAGE", {}), ("clear_cache_after_n_frames", "INT", {"min": 1, "max": 1000}),
                  ("multiplier", "INT", {"min": 1}), ("fast_mode", "BOOLEAN", {}), ("ensemble", "BOOLEAN", {}),
                  ("scale_factor", [0.25, 0.5, 1.0, 2.0, 4.0], {}),
                  ("dtype", ["float32", "float16", "bfloat16"], {}), ("torch_compile", "BOOLEAN", {}),
                  ("batch_size", "INT", {"min": 1, "max": 64}),
                  ("optional_interpolation_states", "INTERPOLATION_STATES", {})], ("IMAGE",)),
}
# VHS format widgets (video_formats/h264-mp4.json; "image/webp" adds "lossless" in VideoCombine.INPUT_TYPES).
VHS_FORMAT_WIDGETS = {"video/h264-mp4": [("pix_fmt", ["yuv420p", "yuv420p10le"], {}),
                                         ("crf", "INT", {"min": 0, "max": 100}),
                                         ("save_metadata", "BOOLEAN", {}), ("trim_to_audio", "BOOLEAN", {})],
                      "image/webp": [("lossless", "BOOLEAN", {})], "image/gif": []}
# This pack's combos of file names (filled from the models folder at run time).
PACK_FILE_INPUTS = {"unet_name", "mapper_name", "vae_name", "clip_name", "dino_name", "lora_name", "ckpt_name"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def schema(node_type: str) -> tuple[list, tuple]:
    """(inputs [(name, type or combo list or FILES, options)], output types) of any known node type."""
    if node_type in MAPPINGS:
        cls = MAPPINGS[node_type]
        declared = cls.INPUT_TYPES()
        inputs = []
        for section in ("required", "optional"):
            for name, spec in declared.get(section, {}).items():
                kind = FILES if name in PACK_FILE_INPUTS else spec[0]
                inputs.append((name, kind, spec[1] if len(spec) > 1 else {}))
        return inputs, tuple(cls.RETURN_TYPES)
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    if node_type in FRONTEND_NODES:
        return FRONTEND_NODES[node_type]
    return THIRD_PARTY_NODES[node_type]


def is_widget(kind) -> bool:
    return kind == FILES or isinstance(kind, list) or kind in WIDGET_TYPES


def has_control(name: str, kind, options: dict) -> bool:
    """The frontend adds a control_after_generate widget value after an INT that asks for one, and by default
    after an INT named seed or noise_seed (frontend 1.27, useIntWidget: the legacy convention)."""
    return kind == "INT" and bool(options.get("control_after_generate", name in ("seed", "noise_seed")))


def widget_names(node_type: str) -> list[str]:
    """The names of a node's widgets_values, in order (with the control value after a seed)."""
    names = []
    for name, kind, options in schema(node_type)[0]:
        if is_widget(kind):
            names += [name, "control_after_generate"] if has_control(name, kind, options) else [name]
    return names


def check_value(where, name, kind, options, value) -> None:
    if kind == FILES:
        assert isinstance(value, str) and value, (where, name, value)
    elif isinstance(kind, list):
        assert value in kind, (where, name, value, kind)
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), (where, name, value)
    elif kind == "STRING":
        assert isinstance(value, str), (where, name, value)
    else:
        assert isinstance(value, int if kind == "INT" else (int, float)) and not isinstance(value, bool), (
            where, name, value)
        assert options.get("min", value) <= value <= options.get("max", value), (where, name, value, options)


def check_vhs_widgets(where, inputs, values: dict) -> None:
    """VHS's own serialisation: {widget name: value} in widget order, the format's widgets after "format"."""
    assert isinstance(values, dict), (where, "VHS saves widgets_values as a dict by name", values)
    widgets = [i for i in inputs if is_widget(i[1])]
    at = [n for n, _, _ in widgets].index("format") + 1
    widgets[at:at] = VHS_FORMAT_WIDGETS[values["format"]]
    assert list(values) == [n for n, _, _ in widgets] + ["videopreview"], (where, list(values))
    for name, kind, options in widgets:
        check_value(where, name, kind, options, values[name])


# The shipped workflows by what they show: {role: file name without .json, which is the template browser's title}.
WORKFLOWS = {
    "basic": "VideoBooth photo to video", "text_to_video": "VideoBooth text to video",
    "compare": "VideoBooth photo vs text only", "best_of_n": "VideoBooth best of 4 seeds",
    "lora": "VideoBooth with an SD 1.5 LoRA", "two_subjects": "VideoBooth two subjects",
    "long_video": "VideoBooth long video (64 frames)", "image_to_video": "VideoBooth start image to video",
    "postprocess": "VideoBooth smoother, larger MP4",
    "native": "VideoBooth native KSampler", "native_long": "VideoBooth native long video",
    "native_lcm": "VideoBooth native 4 steps (lcm)",
    "videocrafter_t2v": "VideoBooth VideoCrafter T2V", "videocrafter_i2v": "VideoBooth VideoCrafter I2V",
}
NATIVE = {f"{WORKFLOWS['native']}.json", f"{WORKFLOWS['native_long']}.json"}  # KSampler, not the pack's Sampler
# SamplerCustom with the distilled LoRA and VideoBooth LCM Schedule (its own checks: tests/test_native_lcm.py)
NATIVE_LCM = f"{WORKFLOWS['native_lcm']}.json"
# Another model family (VideoCrafter1/2): its own loader and sampler, no subject photo, its own official settings.
VIDEOCRAFTER = {f"{WORKFLOWS['videocrafter_t2v']}.json", f"{WORKFLOWS['videocrafter_i2v']}.json"}
UI_WORKFLOWS = sorted(p.name for p in UI_DIR.glob("*.json"))
API_WORKFLOWS = sorted(p.name for p in API_DIR.glob("*.json"))
