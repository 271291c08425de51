"""ComfyUI glue for PISA: the attention override, per-model token layouts, step/block gating and
run statistics.  ``comfy`` is imported only when a model is patched, so this package imports
without ComfyUI (tests, tools).  See docs/architecture.md and the ComfyUI integration notes.
"""

from .patching import HOOK_KEY, patch_model
from .settings import PisaSettings, parse_dense_blocks

__all__ = ["patch_model", "PisaSettings", "parse_dense_blocks", "HOOK_KEY"]
