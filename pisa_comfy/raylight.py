"""PISA inside raylight's sequence-parallel (Ulysses) attention (issue 15).

raylight (github.com/komikndr/raylight) runs a model on several GPUs through Ray workers and
xDiT's Unified Sequence Parallelism: each rank holds ``N / P`` tokens of every head, an all-to-all
gives it every token of ``H / P`` heads, attention runs there, and a second all-to-all returns the
output.  PISA's routing is per head and per query tile, so after the first all-to-all PISA applies
to the local heads unchanged (tests/comfy/test_raylight.py checks it against single-process PISA
with 2 and 4 gloo ranks).  Ring attention (keys split across ranks) would need global routing, so
this processor says ``supports_ring = False``; raylight itself refuses such a processor under a
ring degree above 1, and :func:`patch_worker_model` leaves the processor out there (logged once).

raylight's hook, ``raylight.distributed_modules.inner_attention`` (read from its source, never
copied): a processor object in ``transformer_options["raylight_inner_attention"]`` is called in
place of xDiT's ring attention function as ``processor(dense, q, k, v, transformer_options=...,
**kwargs)``, with q/k/v ``(B, N, H/P, D)`` after the all-to-all, ``kwargs`` the flash-attention
style arguments (``softmax_scale``, ``causal``, ``joint_tensor_key``, ...) and ``dense(q, k, v,
**kwargs)`` raylight's own dense ring function.  The output is expected in q's layout.

:class:`PisaInnerAttention` decides with the PISA Patch node's own code
(:func:`pisa_comfy.dispatch.run_call`): the same state (settings, step and block gating, token
layout and tiled order, text tokens kept exact, stats and log lines) as the node, only the call
arrives in another shape.  Arguments the kernels do not implement (causal, dropout, joint tensors,
fp8 descales, a KV cache) make the call dense through ``dense``, each reason logged once.

raylight is never required: nothing here imports it at module level.  The node ``PISA Patch
(Raylight)`` (:mod:`nodes`) runs :func:`patch_worker_model` on every Ray worker's model.  Those
workers cannot import this pack by name (ComfyUI imported it from a folder, under the folder's
name), so :func:`worker_patch_function` builds a closure that Ray's cloudpickle sends by value and
that imports the pack from its folder on the worker.
"""

from __future__ import annotations

import contextvars
import dataclasses

from .attention_call import AttentionCall
from .dispatch import run_call
from .override import OVERRIDE_KEY
from .patching import HOOK_KEY, patch_model
from .settings import PisaSettings

#: raylight's key for the processor in ``transformer_options`` (its ``INNER_ATTENTION_KEY``).
INNER_ATTENTION_KEY = "raylight_inner_attention"
#: Our name in raylight's registry (raylight wants namespaced names).
PROCESSOR_NAME = "comfyui_pisa:pisa"
#: Key of the forward wrapper that remembers the per-forward options (see :func:`_remember_options`).
RAYLIGHT_HOOK_KEY = "pisa.raylight"

#: xDiT ring-function arguments at the value that means "plain softmax attention": any other value
#: is something PISA does not implement, and the call goes to raylight's dense function.
_NEUTRAL = {"dropout_p": 0.0, "causal": False, "window_size": (-1, -1), "alibi_slopes": None,
            "return_attn_probs": False, "attn_layer": None, "joint_tensor_key": None,
            "joint_tensor_value": None, "q_descale": None, "k_descale": None, "v_descale": None}
#: Arguments that only steer raylight's dense function (its kernel, its process group, its
#: determinism) or mean nothing without joint tensors: PISA replaces that function.
_IGNORED = frozenset({"deterministic", "group", "attn_type", "attn_processor", "joint_strategy"})

#: The ``transformer_options`` of the forward running in this thread, for models whose sequence-
#: parallel attention does not pass them on to attention (raylight's Wan forwards call it without).
_FORWARD_OPTIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pisa_raylight_options",
                                                                               default=None)


def _neutral(name: str, value) -> bool:
    if name == "window_size" and value is not None:
        return tuple(value) == (-1, -1)
    return value is None if _NEUTRAL[name] is None else value == _NEUTRAL[name]


def call_extra(transformer_options: dict, kwargs: dict) -> dict:
    """The call's ``extra`` as the node's decision reads it: the options, the softmax scale, and
    every argument the kernels do not implement (so ``decide`` names it as the dense reason)."""
    extra = {"transformer_options": transformer_options}
    for name, value in kwargs.items():
        if name == "softmax_scale":
            if value is not None:
                extra["scale"] = value
        elif name in _IGNORED or (name in _NEUTRAL and _neutral(name, value)):
            continue
        else:
            extra[name] = value
    return extra


class PisaInnerAttention:
    """raylight inner-attention processor running PISA on this rank's heads (see the module doc).

    It holds the PISA Patch state of the worker's patched model, and is deep-copy atomic: ComfyUI
    v0.3.64 deep-copies ``model_options`` on every clone, and a copy must keep counting into the
    same state (which holds a lock and cannot be copied anyway).
    """

    supports_ring = False

    def __init__(self, state):
        self.state = state

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __call__(self, dense, q, k, v, *, transformer_options=None, **kwargs):
        to = transformer_options or _FORWARD_OPTIONS.get() or {}
        call = AttentionCall.from_bnhd(q, k, v, call_extra(to, kwargs))
        return run_call(self.state, call, lambda: dense(q, k, v, **kwargs), _as_is)


def _as_is(out):
    return out  # PISA's output is already (B, N, H/P, D), q's layout


def _remember_options(executor, *args, **kwargs):
    """``DIFFUSION_MODEL`` wrapper: make this forward's ``transformer_options`` reachable from
    attention calls that do not receive them (the dict is the one raylight's forward writes
    ``block_index`` and ``grid_sizes`` into, and PISA's own wrapper its forward context)."""
    to = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("transformer_options")
    token = _FORWARD_OPTIONS.set(to if isinstance(to, dict) else None)
    try:
        return executor(*args, **kwargs)
    finally:
        _FORWARD_OPTIONS.reset(token)


def raylight_api():
    """raylight's inner-attention module, registered with our processor; None without raylight."""
    try:
        from raylight.distributed_modules import inner_attention as api
    except ImportError:
        return None
    if PROCESSOR_NAME not in api.InnerAttentionRegistry.available():
        api.register_inner_attention(PROCESSOR_NAME)(PisaInnerAttention)
    return api


def ring_degree() -> int:
    """xDiT's ring-parallel world size on this worker (1 without xDiT or outside a worker)."""
    try:
        from xfuser.core.distributed import get_ring_parallel_world_size

        return int(get_ring_parallel_world_size())
    except (ImportError, AttributeError, AssertionError, RuntimeError):  # no xDiT, or no groups here
        return 1


def _without_processor(model):
    to = model.model_options.get("transformer_options", {})
    if not isinstance(to.get(INNER_ATTENTION_KEY), PisaInnerAttention):
        return model
    model = model.clone()
    model.model_options = dict(model.model_options)
    model.model_options["transformer_options"] = {k: v for k, v in to.items() if k != INNER_ATTENTION_KEY}
    return model


def unpatch_model(model):
    """A clone of ``model`` without PISA: its processor, override and hooks removed (the override
    PISA chained over, if any, is put back)."""
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    model = _without_processor(model).clone()
    to = model.model_options.setdefault("transformer_options", {})
    top = to.get(OVERRIDE_KEY)
    if getattr(top, "pisa_state", None) is not None:
        if top.pisa_previous is None:
            to.pop(OVERRIDE_KEY)
        else:
            to[OVERRIDE_KEY] = top.pisa_previous
    model.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, HOOK_KEY)
    model.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, RAYLIGHT_HOOK_KEY)
    model.remove_callbacks_with_key(CallbacksMP.ON_PREPARE_STATE, HOOK_KEY)
    model.remove_callbacks_with_key(CallbacksMP.ON_CLEANUP, HOOK_KEY)
    return model


def patch_worker_model(model, settings: PisaSettings, node_id: str | None = None, enabled: bool = True):
    """On a raylight worker: ``model`` patched as PISA Patch patches it (the override, for any
    attention that still goes through ComfyUI) plus PISA as raylight's inner attention, both
    sharing one state.  ``enabled=False`` removes PISA (raylight keeps a worker's model between
    prompts, so switching the node off has to undo the patch)."""
    from comfy.patcher_extension import WrappersMP

    if not enabled:
        return unpatch_model(model)
    patched = _without_processor(patch_model(model, settings, node_id))
    patched.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, RAYLIGHT_HOOK_KEY)
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, RAYLIGHT_HOOK_KEY, _remember_options)
    state = patched.model_options["transformer_options"][OVERRIDE_KEY].pisa_state
    degree = ring_degree()
    if degree > 1:
        state.log_once("raylight ring", "PISA: raylight runs ring attention here (ring degree %d); PISA needs "
                       "every key of a head on one rank (Ulysses only), so attention stays dense", degree, warn=True)
        return patched
    api = raylight_api()
    if api is None:
        patched.model_options["transformer_options"][INNER_ATTENTION_KEY] = PisaInnerAttention(state)
        return patched
    return api.set_inner_attention(patched, api.create_inner_attention(PROCESSOR_NAME, state=state))


def worker_patch_function(pack_dir: str, pack_name: str, settings: PisaSettings, node_id: str | None,
                          enabled: bool = True):
    """``fn(model) -> patched model`` for raylight's ``RayWorker.model_function_runner``.

    Ray pickles it with cloudpickle, by value (it is a closure over plain values: strings, a
    dict, a bool), and on the worker it imports this pack from ``pack_dir`` under ComfyUI's
    package name ``pack_name`` unless the worker already has it; only then does it touch PISA."""
    fields = dataclasses.asdict(settings)

    def pisa_raylight_patch(model):
        import importlib
        import importlib.util
        import os
        import sys

        if pack_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(pack_name, os.path.join(pack_dir, "__init__.py"),
                                                          submodule_search_locations=[pack_dir])
            module = importlib.util.module_from_spec(spec)
            sys.modules[pack_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(pack_name, None)
                raise
        ours = importlib.import_module(pack_name + ".pisa_comfy.raylight")
        return ours.patch_worker_model(model, ours.PisaSettings(**fields), node_id, enabled)

    return pisa_raylight_patch


def patch_ray_actors(ray_actors, fn):
    """Run ``fn`` on every raylight worker's model (what raylight's own patch nodes do), and
    return ``ray_actors`` for the next node."""
    import ray

    from raylight.distributed_worker.ray_worker import ensure_fresh_actors

    ray_actors, workers, _ = ensure_fresh_actors(ray_actors)
    ray.get([worker.model_function_runner.remote(fn) for worker in workers])
    return ray_actors
