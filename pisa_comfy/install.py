"""Patch a ComfyUI MODEL with PISA: a clone carrying the override and the hooks that keep it there.

The incoming model is never touched (the clone shares the weights, not the options), the override
chains over whatever override the model already had, and all hooks are registered under one key,
so a later PISA Patch on the same model replaces this one instead of stacking on it.
"""

from __future__ import annotations

import logging

from .override import OVERRIDE_KEY, describe_override, make_override
from .settings import PisaSettings
from .state import PisaState

log = logging.getLogger("pisa")

#: Key of every wrapper and callback this pack registers (``add_*_with_key`` / ``remove_*_with_key``).
HOOK_KEY = "pisa"

#: Module of core's "Model Sparse Attention" (late 2026): chaining over it means PISA's dense path is sparse.
_CORE_SPARSE_MODULE = "comfy_extras.nodes_sparse_attention"


def patch_model(model, settings: PisaSettings, node_id: str | None = None):
    """A clone of ``model`` whose self-attention runs PISA (returns the clone)."""
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE_KEY)
    if getattr(previous, "pisa_state", None) is not None:
        log.info("PISA: this model already had a PISA Patch; the later node's settings replace it")
        previous = previous.pisa_previous
    elif getattr(previous, "__module__", None) == _CORE_SPARSE_MODULE:
        log.warning("PISA: the attention override before PISA is core's sparse attention (%s); PISA's "
                    "dense path (dense steps, dense blocks, cross-attention) will run through it",
                    describe_override(previous))

    state = PisaState(settings, node_id)
    options[OVERRIDE_KEY] = make_override(state, previous)
    patched.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, HOOK_KEY)
    patched.remove_callbacks_with_key(CallbacksMP.ON_PREPARE_STATE, HOOK_KEY)
    patched.remove_callbacks_with_key(CallbacksMP.ON_CLEANUP, HOOK_KEY)
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, HOOK_KEY, state.diffusion_model_wrapper)
    patched.add_callback_with_key(CallbacksMP.ON_PREPARE_STATE, HOOK_KEY, state.on_prepare_state)
    patched.add_callback_with_key(CallbacksMP.ON_CLEANUP, HOOK_KEY, state.on_cleanup)
    if settings.verbose:
        log.info("PISA Patch (node %s): %s", node_id, settings.describe())
    return patched
