"""ComfyUI-VideoBooth: ComfyUI's entry point. The nodes live in ``nodes/``, the model code in ``videobooth_core/``."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
