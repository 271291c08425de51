"""Replay short PISA calls as one CUDA graph.

A Triton-backend call is about a dozen kernel launches (pre-scan, routing, forward, permutation
copies).  At FLUX 1024² (4,608 tokens) their GPU work takes ~0.1 ms while launching them from Python
takes longer, so the call is CPU-bound and slower than cuDNN's single fused kernel.  Capturing the
call once per plan and input shape and replaying it turns it into three small copies, one graph
launch and one output copy.

The graph reads static copies of q, k and v (a graph bakes in addresses), so each cached graph holds
four input-sized buffers: graphs are used only up to :data:`MAX_GRAPH_BYTES` of q, and a few graphs
per process (:data:`MAX_GRAPHS`).  Replays of one graph are serialised with a lock, since its
buffers are shared (ComfyUI's multi-GPU path runs threads).

A graph is keyed by the call's plan (one object per set of settings, ranges and token order:
``api._plan``) and the shapes, strides, dtypes and devices of q, k and v; the call's work depends on
nothing else (``api._execute``), and calls with ``kv_valid`` never use a graph.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .lru import lookup, make_room

#: Largest q (bytes) replayed as a graph; beyond it launches are a negligible share of the call.
MAX_GRAPH_BYTES = 48 << 20
#: Graphs kept per process (each holds 4 input-sized buffers plus its private memory pool).
MAX_GRAPHS = 8


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    output: torch.Tensor
    lock: threading.Lock
    plan: object  # kept alive: the cache key holds its id


_GRAPHS: dict[tuple, _Graph] = {}
_GRAPHS_LOCK = threading.Lock()


def wanted(mode, plan, q: torch.Tensor) -> bool:
    """Whether this call should run as a graph replay."""
    if mode is False or plan.backend != "triton" or q.device.type != "cuda":
        return False
    if torch.cuda.is_current_stream_capturing():
        return False  # the caller is capturing a graph itself: stay eager inside it
    small = q.numel() * q.element_size() <= MAX_GRAPH_BYTES
    return bool(mode is True or (mode == "auto" and small))


def _key(plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    return (id(plan),) + tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in (q, k, v))


def _static_copy(t: torch.Tensor) -> torch.Tensor:
    """The graph's own buffer for an input: its strides where they are dense and non-overlapping,
    else contiguous.  An expanded input (a stride of 0, e.g. keys shared by several heads) cannot be
    copied into a buffer of its own strides: copy_ refuses overlapping destinations."""
    return torch.empty_like(t).copy_(t)


def _record(fn, plan, inputs) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm up (compiles the kernels outside the capture), then capture ``fn`` on ``inputs``."""
    dev = inputs[0].device
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        fn(plan, *inputs, None)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(plan, *inputs, None)
    return graph, output


def _capture(fn, plan, q, k, v) -> _Graph:
    inputs = tuple(_static_copy(t) for t in (q, k, v))
    graph, output = _record(fn, plan, inputs)
    return _Graph(graph, inputs, output, threading.Lock(), plan)


def replay(fn, plan, q, k, v) -> torch.Tensor:
    """``fn(plan, q, k, v, None)`` through a cached CUDA graph (captured on first use).

    The buffers are made and written in inference mode, whatever the caller's mode: a graph
    captured under ``torch.inference_mode()`` (ComfyUI's sampling) holds inference tensors, which
    cannot be written in place outside it, and the copies must not record autograd history.  The
    returned clone is made in the caller's mode, like the eager call's output."""
    key = _key(plan, q, k, v)
    with _GRAPHS_LOCK:
        entry = lookup(_GRAPHS, key)
        if entry is None:
            make_room(_GRAPHS, MAX_GRAPHS)  # (the dropped graph's buffers go before the new one's come)
            with torch.inference_mode():
                entry = _GRAPHS[key] = _capture(fn, plan, q, k, v)
    with entry.lock:
        with torch.inference_mode():
            for dst, src in zip(entry.inputs, (q, k, v)):
                dst.copy_(src)
            entry.graph.replay()
        return entry.output.clone()
