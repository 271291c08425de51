"""ComfyUI node classes of this pack (V1 mappings, so they load on v0.3.64 and v0.19.3 alike).

The widget names and their order are a contract (docs/architecture.md): saved workflows store
``widgets_values`` by position.
"""

import os

from .pisa_comfy import PisaSettings, patch_model
from .pisa_comfy.capture import CaptureSettings, capture_model
from .pisa_comfy.settings import BLOCK_SIZES, ROUTINGS, TAYLOR_ORDERS, TOKEN_ORDERS


class PISAPatch:
    """Patch a model so its self-attention runs PISA piecewise sparse attention."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The Wan, HunyuanVideo or FLUX model to patch. The input model "
                                               "itself stays unpatched; the output is a patched copy."}),
                "sparsity": ("FLOAT", {
                    "default": 0.875, "min": 0.0, "max": 0.99, "step": 0.005,
                    "tooltip": "Fraction of key blocks each query tile does NOT compute exactly (they enter "
                               "through PISA's Taylor approximation instead). Higher is faster but less "
                               "faithful; 0.875 keeps 1 block in 8 exact (the paper's setting), 0 computes "
                               "every block exactly."}),
                "block_size": (list(BLOCK_SIZES), {
                    "default": "64",
                    "tooltip": "Tokens per key block. 64 routes more finely (better quality at a given "
                               "sparsity); 128 has less routing overhead on very long sequences."}),
                "taylor_order": (list(TAYLOR_ORDERS), {
                    "default": "1",
                    "tooltip": "How the blocks that are not computed exactly are approximated. 1: PISA "
                               "(zeroth + first order, best quality). 0: zeroth order only (slightly "
                               "faster, blurrier). drop: ignore them (plain block-sparse attention, for "
                               "comparison; lowest quality)."}),
                "dense_steps": ("INT", {
                    "default": 10, "min": 0, "max": 10000,
                    "tooltip": "The first N sampling steps run full attention; the layout forms there, so "
                               "dense early steps keep composition intact (the paper: 10 of 50). More is "
                               "safer but slower. A sampler that continues where the previous one stopped "
                               "(KSamplerAdvanced split) continues the count."}),
                "dense_blocks": ("STRING", {
                    "default": "0", "multiline": False,
                    "tooltip": "Transformer blocks that always run full attention, e.g. '0' or '0, 1, "
                               "38-39' (FLUX/HunyuanVideo count single blocks after the double blocks). "
                               "Keeping the first block dense protects quality for little time; each extra "
                               "block costs speed. Empty: none."}),
                "min_tokens": ("INT", {
                    "default": 8192, "min": 0, "max": 1000000, "step": 256,
                    "tooltip": "Attention over fewer tokens than this runs dense: short sequences are "
                               "faster dense (measured on an H100: dense wins below about 6,000 tokens, e.g. "
                               "FLUX at 1024x1024 with 4,352 tokens; PISA is 1.5x faster at 8,192 and 2-3x "
                               "at 16,896 = FLUX 2048x2048). Lower it only on slower GPUs."}),
                "token_order": (list(TOKEN_ORDERS), {
                    "default": "auto",
                    "tooltip": "auto: group the image/video tokens into compact 2-D/3-D tiles before "
                               "forming blocks (Wan, HunyuanVideo, FLUX), so a block is a small "
                               "neighbourhood instead of a stripe of a row; better quality at the same "
                               "speed. raster: the model's own order (for comparison)."}),
                "routing": (list(ROUTINGS), {
                    "default": "auto",
                    "tooltip": "How each query tile picks its exact blocks. topk: highest pooled attention "
                               "score. covariance: also favour blocks the Taylor approximation fits worst "
                               "(a little more pre-processing). adaptive: the same number of exact blocks "
                               "on average, shared between query tiles and heads by need (flat heads get "
                               "more, concentrated ones fewer). auto: covariance for images (FLUX), topk "
                               "for video."}),
                "verbose": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Also log the node's settings and, once each, why attention calls ran dense "
                               "(dense step, dense block, short sequence, cross-attention). The per-run "
                               "summary is always logged and shown on the node."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The patched model: connect it to the sampler.",)
    FUNCTION = "patch"
    CATEGORY = "model/patch"
    DESCRIPTION = ("Runs the model's self-attention with PISA piecewise sparse attention: important key "
                   "blocks exactly, the rest through a first-order Taylor approximation. Faster sampling "
                   "for Wan 2.1/2.2, HunyuanVideo and FLUX; cross-attention, short sequences, the first "
                   "steps and the chosen blocks stay dense. Needs no training.")

    def patch(self, model, sparsity, block_size, taylor_order, dense_steps, dense_blocks, min_tokens,
              token_order, routing, verbose, unique_id=None):
        settings = PisaSettings.from_widgets(
            sparsity=sparsity, block_size=block_size, taylor_order=taylor_order, dense_steps=dense_steps,
            dense_blocks=dense_blocks, min_tokens=min_tokens, token_order=token_order, routing=routing,
            verbose=verbose)
        return (patch_model(model, settings, unique_id),)


class PISACapture:
    """Record the q/k/v of chosen attention calls of a real run, for ``python -m pisa_lab.eval``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model whose attention to record. Put this node after PISA "
                                               "Patch (nearest the sampler): it only sees the calls handed to it."}),
                "filename_prefix": ("STRING", {
                    "default": "pisa_capture",
                    "tooltip": "Files go to ComfyUI's output folder under pisa_captures/, named "
                               "<prefix>_<serial>_block<b>_step<s>.safetensors (one attention call per file)."}),
                "blocks": ("STRING", {
                    "default": "0, 10, 20",
                    "tooltip": "Transformer blocks to record, e.g. '0, 10, 20' or '5-7' (FLUX/HunyuanVideo count "
                               "single blocks after the double blocks). Empty: every block."}),
                "steps": ("STRING", {
                    "default": "10, 30",
                    "tooltip": "Sampling steps to record (0 = first step), e.g. '10, 30'. Empty: every step."}),
                "max_calls": ("INT", {
                    "default": 6, "min": 1, "max": 10000,
                    "tooltip": "At most this many calls are written per run. Each file holds q, k and v: "
                               "about 0.3 GB for Wan 1.3B at 480p, 1 GB for Wan 14B at 480p."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, recording: connect it to the sampler. Outputs are unchanged.",)
    FUNCTION = "capture"
    CATEGORY = "model/patch"
    DESCRIPTION = ("Records the q/k/v of the chosen blocks and steps of a real sampling run to safetensors files, "
                   "so `python -m pisa_lab.eval --capture <folder>` can measure PISA's attention error on "
                   "your own model. Does not change the result.")

    def capture(self, model, filename_prefix, blocks, steps, max_calls, unique_id=None):
        import folder_paths

        settings = CaptureSettings.from_widgets(output_dir=folder_paths.get_output_directory(),
                                                filename_prefix=filename_prefix, blocks=blocks, steps=steps,
                                                max_calls=max_calls)
        return (capture_model(model, settings, unique_id),)


class PISARaylightPatch:
    """PISA Patch for raylight's Ray workers: patches every worker's model (docs/raylight.md)."""

    @classmethod
    def INPUT_TYPES(cls):
        pisa = dict(PISAPatch.INPUT_TYPES()["required"])
        del pisa["model"]
        return {
            "required": {
                "ray_actors": ("RAY_ACTORS", {"tooltip": "raylight's Ray workers with their model loaded (from "
                                                         "Load Diffusion Model (Ray)); connect the output to "
                                                         "raylight's sampler."}),
                "enabled": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Off removes PISA from the workers' model again: raylight keeps each worker's "
                               "model between prompts, so deleting the node would leave the patch in place."}),
                **pisa,
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("RAY_ACTORS",)
    RETURN_NAMES = ("ray_actors",)
    OUTPUT_TOOLTIPS = ("The same workers, their model patched: connect to raylight's sampler.",)
    FUNCTION = "patch"
    CATEGORY = "model/patch"
    DESCRIPTION = ("PISA Patch inside raylight's sequence-parallel (Ulysses) attention: after the all-to-all "
                   "each GPU runs PISA on its share of the heads, with the same settings as PISA Patch. Needs "
                   "raylight with its inner-attention hook and a ring degree of 1; anything else stays dense.")

    def patch(self, ray_actors, enabled, sparsity, block_size, taylor_order, dense_steps, dense_blocks,
              min_tokens, token_order, routing, verbose, unique_id=None):
        from .pisa_comfy.raylight import patch_ray_actors, worker_patch_function

        settings = PisaSettings.from_widgets(
            sparsity=sparsity, block_size=block_size, taylor_order=taylor_order, dense_steps=dense_steps,
            dense_blocks=dense_blocks, min_tokens=min_tokens, token_order=token_order, routing=routing,
            verbose=verbose)
        fn = worker_patch_function(os.path.dirname(os.path.abspath(__file__)), __name__.rpartition(".")[0],
                                   settings, unique_id, bool(enabled))
        return (patch_ray_actors(ray_actors, fn),)


NODE_CLASS_MAPPINGS = {"PISAPatch": PISAPatch, "PISACapture": PISACapture, "PISARaylightPatch": PISARaylightPatch}
NODE_DISPLAY_NAME_MAPPINGS = {"PISAPatch": "PISA Patch", "PISACapture": "PISA Capture (Q/K/V)",
                              "PISARaylightPatch": "PISA Patch (Raylight)"}
