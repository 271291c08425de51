"""Patch a ComfyUI MODEL with PISA: a clone carrying the override and the hooks that keep it there.

The incoming model is never touched (the clone shares the weights, not the options), the override
chains over whatever override the model already had, and all hooks are registered under one key,
so a later PISA Patch on the same model replaces this one instead of stacking on it.
"""

from __future__ import annotations

import logging

from .override import OVERRIDE_KEY, describe_override
from .settings import PisaSettings
from .patch_state import PisaState

log = logging.getLogger("pisa")

#: Key of every wrapper and callback this pack registers (``add_*_with_key`` / ``remove_*_with_key``).
HOOK_KEY = "pisa"

#: Module of core's "Model Sparse Attention" (late 2026): chaining over it means PISA's dense path is sparse.
_CORE_SPARSE_MODULE = "comfy_extras.nodes_sparse_attention"


def patch_model(model, settings: PisaSettings, node_id: str | None = None):
    """A clone of ``model`` whose self-attention runs PISA (returns the clone)."""
    patched = install(model, PisaState(settings, node_id), HOOK_KEY)
    if settings.verbose:
        log.info("PISA Patch (node %s): %s", node_id, settings.describe())
    return patched


def install(model, state, hook_key: str):
    """A clone of ``model`` with ``state``'s override on top of the chain and ``state``'s hooks
    registered under ``hook_key``.  An override of the same node kind already on the model is
    replaced (the later node wins); any other override stays below, as the dense path."""
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE_KEY)
    if type(getattr(previous, "pisa_state", None)) is type(state):
        log.info("PISA: this model already had a %s node; the later node's settings replace it", state.node_name)
        previous = previous.pisa_previous
    elif getattr(previous, "__module__", None) == _CORE_SPARSE_MODULE:
        log.warning("PISA: the attention override before PISA is core's sparse attention (%s); PISA's "
                    "dense path (dense steps, dense blocks, cross-attention) will run through it",
                    describe_override(previous))

    options[OVERRIDE_KEY] = state.make_override(previous)
    patched.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, hook_key)
    patched.remove_callbacks_with_key(CallbacksMP.ON_PREPARE_STATE, hook_key)
    patched.remove_callbacks_with_key(CallbacksMP.ON_CLEANUP, hook_key)
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, hook_key, state.diffusion_model_wrapper)
    patched.add_callback_with_key(CallbacksMP.ON_PREPARE_STATE, hook_key, state.on_prepare_state)
    patched.add_callback_with_key(CallbacksMP.ON_CLEANUP, hook_key, state.on_cleanup)
    return patched
