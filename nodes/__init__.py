"""The VideoBooth ComfyUI nodes: every family's mappings merged into one registry.

Node ids (all starting with ``VideoBooth``) and socket type names are a public API: never rename one.
"""

from __future__ import annotations

from . import (_bridge, evaluation, image_prompt, injection, loaders, long_video, native, native_inputs, native_lcm,
               sampling, sd_models, subjects, text, videocrafter)

_bridge.register_videobooth_folder()
_bridge.register_videobooth_folder(folder=videocrafter.VIDEOCRAFTER_FOLDER)
evaluation.register_metric_folders()

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _family in (loaders, sd_models, image_prompt, text, injection, sampling, evaluation, subjects, long_video, native,
                native_inputs, native_lcm, videocrafter):
    NODE_CLASS_MAPPINGS.update(_family.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)
# every node's errors reach the frontend as "VideoBooth.<Class>: message" (not the pack's module path)
for _cls in NODE_CLASS_MAPPINGS.values():
    setattr(_cls, _cls.FUNCTION, _bridge.reports_errors(getattr(_cls, _cls.FUNCTION)))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
