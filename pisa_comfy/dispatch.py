"""Per attention call: decide whether it runs PISA, and run it (PISA, or the dense path).

A call runs PISA only when it is a self-attention the kernels support (same q/k/v shapes, a kernel
dtype, a measured head dim, no mask other than key padding, no unknown arguments), it is long
enough (``min_tokens``), it is the model's main token sequence, and neither its step
(``dense_steps``) nor its block (``dense_blocks``) is kept dense.  Everything else goes to the
dense path: the override that was installed before PISA, else ComfyUI's own backend (``func``),
called exactly as the model called attention.

This module decides and runs; the node state (:mod:`pisa_comfy.patch_state`) keeps what lasts
between calls and turns each outcome into statistics and log lines.  The checks run cheapest
first and read only what the parsed call already holds, because every dense call of a patched
model pays for them (issue: the dense path of a patched model costs <= 0.5 % of a step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_call import KNOWN_KWARGS, AttentionCall
from .forward_context import ForwardContext
from .library import KERNEL_DTYPES, MEASURED_HEAD_DIMS, KernelDoesNotFit, run_pisa
from .run_stats import CROSS, DENSE_BLOCK, DENSE_STEP, DOES_NOT_FIT, OUT_OF_MEMORY, SHORT, start_timer, stop_timer
from .settings import TAIL

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class KernelCall:
    """Keyword arguments of one ``pisa_attention`` call (besides q, k, v)."""

    kwargs: dict


def dispatch(state, func, previous, args: tuple, kwargs: dict):
    """The body of the override closure (see :mod:`pisa_comfy.override`)."""
    call = AttentionCall.parse(args, kwargs)
    return run_call(state, call, lambda: call.dense(func, previous), call.shape_output)


def run_call(state, call: AttentionCall, dense, shape_output):
    """Decide one parsed call and run it: PISA's output (in :attr:`AttentionCall.layout`) through
    ``shape_output``, else ``dense()``, the caller's own dense path; the outcome is recorded either
    way.  The override above and raylight's inner-attention processor (:mod:`pisa_comfy.raylight`)
    both come through here, so a call decides and counts alike on either path."""
    timer = start_timer(call.q.device)
    decision = decide(state, call)
    if isinstance(decision, KernelCall):
        outcome = _run_pisa(state, call, decision)
        if not isinstance(outcome, str):
            out, stats = outcome
            density = stats.density + (stats.dense_rows / call.n) * (1.0 - stats.density)
            state.record(call, density=density, reason=None, timing=stop_timer(timer), tile_counts=stats.tile_counts,
                         blocks=stats.blocks)
            return shape_output(out)
        decision, timer = outcome, start_timer(call.q.device)
    out = dense()
    state.record(call, density=1.0, reason=decision, timing=stop_timer(timer))
    return out


def _run_pisa(state, call: AttentionCall, kernel_call: KernelCall):
    """``(out, PisaStats)``, or the dense reason when the kernels could not run this call."""
    try:
        return run_pisa(*call.kernel_inputs(), **kernel_call.kwargs)
    except _OOM:
        state.log_once("out of memory", "PISA ran out of memory on a call of %d tokens; that call ran dense "
                       "(further out-of-memory calls are only counted)", call.n, warn=True)
        return OUT_OF_MEMORY
    except KernelDoesNotFit as exc:
        state.log_once(f"does not fit:{call.q.dtype}:{call.d}", "PISA's kernels do not fit this GPU for %s "
                       "inputs of head dim %d (%s); such calls run dense", call.q.dtype, call.d, exc, warn=True)
        return DOES_NOT_FIT


def forward_context(state, transformer_options: dict) -> ForwardContext:
    """The context ``state``'s forward wrapper stored for this forward (or one without a layout)."""
    ctx = transformer_options.get(state.forward_key)
    return ctx if isinstance(ctx, ForwardContext) else state.context_without_wrapper(transformer_options)


def decide(state, call: AttentionCall) -> KernelCall | str:
    """A :class:`KernelCall`, or the reason (str) the call runs dense."""
    settings = state.settings
    if not call.extra.keys() <= KNOWN_KWARGS:
        return f"unsupported argument {sorted(call.extra.keys() - KNOWN_KWARGS)[0]}"
    q, k, v = call.q, call.k, call.v
    if not (q.shape == k.shape == v.shape):
        return CROSS if call.n != call.n_k else "grouped-query attention"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype}"
    if call.d not in MEASURED_HEAD_DIMS:
        return f"head dim {call.d}"
    if call.n < settings.min_tokens:
        return SHORT

    to = call.transformer_options
    ctx = forward_context(state, to)
    geometry = ctx.geometry(call, state.text_side)
    if isinstance(geometry, str):
        return geometry
    layout, placement = geometry.layout, geometry.placement

    block = ctx.block_index(to)
    if ctx.step is not None and ctx.step < settings.dense_steps:
        return DENSE_STEP
    if block is not None and block in settings.dense_blocks:
        return DENSE_BLOCK
    if block is None and settings.dense_blocks:
        state.log_once("no block index", "PISA cannot tell transformer blocks apart here (no block_index and "
                       "no model forward wrapper); dense_blocks is ignored")
    backend = state.backend_for(q.device)
    if backend is None:
        return "no PISA backend"

    exact = list(placement.exact) if placement is not None and placement.exact else None
    token_perm = None
    if settings.tile_tokens and placement is not None and placement.grids:
        token_perm = state.token_order(call.n, placement.grids, q.device)
    if backend == "triton" and settings.backend == "auto":
        backend = "auto"  # the Triton backend, and the library picks its forward kernel (Hopper's on sm90)
    routing = settings.routing
    if routing == "auto":
        routing = "cov" if layout is not None and layout.images_only else "topk"
    return KernelCall(dict(sparsity=settings.sparsity, block_size=settings.block_size, order=settings.order,
                           scale=call.extra.get("scale"), layout=call.layout, sink_kv=exact, dense_q=exact,
                           kv_valid=geometry.kv_valid, token_perm=token_perm, routing=routing, tail=TAIL,
                           backend=backend))
