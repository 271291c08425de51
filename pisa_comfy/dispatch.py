"""Per attention call: run PISA, or run the dense path and say why.

A call runs PISA only when it is a self-attention the kernels support (same q/k/v shapes, fp16 /
bf16 / fp32, head dim 64 or 128, no mask other than key padding, no unknown arguments), it is long
enough (``min_tokens``), it is the model's main token sequence, and neither its step
(``dense_steps``) nor its block (``dense_blocks``) is kept dense.  Everything else goes to the
dense path: the override that was installed before PISA, else ComfyUI's own backend (``func``),
called exactly as the model called attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_call import KNOWN_KWARGS, AttentionCall
from .forward_context import ForwardContext
from .kernels import KernelDoesNotFit, run_pisa
from .run_stats import start_timer, stop_timer
from .token_layout import Placement, TokenLayout, place, side_from_img_slice

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 128)
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# Dense reasons that are part of normal operation (logged once only when verbose).
DENSE_STEP = "dense step"
DENSE_BLOCK = "dense block"
SHORT = "short sequence"
CROSS = "cross-attention"
NOT_MAIN = "not the main sequence"
EXPECTED_REASONS = frozenset({DENSE_STEP, DENSE_BLOCK, SHORT, CROSS, NOT_MAIN})

#: The log-normal tail: every approximated block also weighs the spread of its keys' logits, which
#: RoPE makes large.  Measured 32-47 % less error at real sizes on every generated set, in tiled and
#: in raster order, for 5-10 % more kernel time at the same sparsity (H100, docs/fidelity.md).
TAIL = "lognormal"


@dataclass
class Plan:
    """Keyword arguments of one ``pisa_attention`` call (besides q, k, v)."""

    kwargs: dict


def dispatch(state, func, previous, args: tuple, kwargs: dict):
    """The body of the override closure (see :mod:`pisa_comfy.override`)."""
    call = AttentionCall.parse(args, kwargs)
    b, h, n, d = call.dims(call.q)
    timer = start_timer(call.q.device)
    decision = _decide(state, call)
    if isinstance(decision, Plan):
        try:
            q, k, v = call.kernel_inputs()
            out, stats = run_pisa(q, k, v, **decision.kwargs)
        except _OOM:
            state.log_once("out of memory", "PISA ran out of memory on a call of %d tokens; that call ran dense "
                           "(further out-of-memory calls are only counted)", n, warn=True)
            decision = "out of memory"
        except KernelDoesNotFit as exc:
            state.log_once(f"does not fit:{call.q.dtype}:{d}", "PISA's kernels do not fit this GPU for %s inputs "
                           "of head dim %d (%s); such calls run dense", call.q.dtype, d, exc, warn=True)
            decision = "kernel does not fit"
        else:
            density = stats.density + (stats.dense_rows / n) * (1.0 - stats.density)
            state.record(call.transformer_options, work=float(b * h * n * n), density=density, reason=None,
                         timing=stop_timer(timer))
            return call.shape_output(out)
        timer = start_timer(call.q.device)
    out = previous(func, *call.args, **call.kwargs) if previous is not None else func(*call.args, **call.kwargs)
    n_k = call.dims(call.k)[2]
    state.record(call.transformer_options, work=float(b * h * n * n_k), density=1.0, reason=decision,
                 timing=stop_timer(timer))
    return out


@dataclass
class Geometry:
    """Where a main-sequence call's tokens sit, and which keys are padding."""

    layout: TokenLayout | None  # None: a model whose token order is not known (raster order)
    placement: Placement | None
    kv_valid: torch.Tensor | None


def forward_context(state, transformer_options: dict) -> ForwardContext:
    """The context ``state``'s forward wrapper stored for this forward (or one without a layout)."""
    ctx = transformer_options.get(state.forward_key)
    return ctx if isinstance(ctx, ForwardContext) else state.context_without_wrapper(transformer_options)


def call_geometry(state, call: AttentionCall, ctx: ForwardContext):
    """The call's :class:`Geometry`, or the dense reason (str) when it is not the model's main
    attention or carries a mask other than key padding."""
    b, _, n, _ = call.dims(call.q)
    to = call.transformer_options
    layout = ctx.layout
    if layout is not None and layout.family == "wan" and to.get("grid_sizes") is not None:
        layout = layout.with_main_grid(to["grid_sizes"])
    n_extra = n - layout.image_tokens if layout is not None else 0
    if n_extra < 0:
        return state.dense_reason(NOT_MAIN)  # shorter than the latent: e.g. HunyuanVideo's token refiner
    kv_valid = side = None
    if call.mask is not None:
        kv_valid, side = ctx.read_mask(call.mask, b, n, n_extra)
        if kv_valid is None:
            return state.dense_reason("mask")
    placement = None
    if layout is not None:
        side = layout.extra_side or side_from_img_slice(to.get("img_slice"), n, n_extra) or side
        placement = place(layout, n, state.text_side(side))
    return Geometry(layout, placement, kv_valid)


def _decide(state, call: AttentionCall):
    """A :class:`Plan`, or the reason (str) the call runs dense."""
    settings = state.settings
    unknown = sorted(set(call.extra) - KNOWN_KWARGS)
    if unknown:
        return state.dense_reason(f"unsupported argument {unknown[0]}")
    q, k, v = call.q, call.k, call.v
    if not (q.shape == k.shape == v.shape):
        return state.dense_reason(CROSS if call.dims(q)[2] != call.dims(k)[2] else "grouped-query attention")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return state.dense_reason(f"dtype {q.dtype}")
    _, _, n, d = call.dims(q)
    if d not in SUPPORTED_HEAD_DIMS:
        return state.dense_reason(f"head dim {d}")
    if n < settings.min_tokens:
        return state.dense_reason(SHORT)

    to = call.transformer_options
    ctx = forward_context(state, to)
    geometry = call_geometry(state, call, ctx)
    if isinstance(geometry, str):
        return geometry
    layout, placement, kv_valid = geometry.layout, geometry.placement, geometry.kv_valid

    block = ctx.block_index(to)
    if ctx.step is not None and ctx.step < settings.dense_steps:
        return state.dense_reason(DENSE_STEP)
    if block is not None and block in settings.dense_blocks:
        return state.dense_reason(DENSE_BLOCK)
    if block is None and settings.dense_blocks:
        state.log_once("no block index", "PISA cannot tell transformer blocks apart here (no block_index and "
                       "no model forward wrapper); dense_blocks is ignored")
    backend = state.backend_for(q.device)
    if backend is None:
        return state.dense_reason("no PISA backend")

    exact = list(placement.exact) if placement is not None and placement.exact else None
    token_perm = None
    if settings.tile_tokens and placement is not None and placement.grids:
        token_perm = state.token_order(n, placement.grids, q.device)
    routing = settings.routing
    if routing == "auto":
        routing = "cov" if layout is not None and layout.images_only else "topk"
    return Plan(dict(sparsity=settings.sparsity, block_size=settings.block_size, order=settings.order,
                     scale=call.extra.get("scale"), layout=call.layout, sink_kv=exact, dense_q=exact,
                     kv_valid=kv_valid, token_perm=token_perm, routing=routing, tail=TAIL, backend=backend))
