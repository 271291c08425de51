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
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

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


def _key(plan, t: torch.Tensor) -> tuple:
    return (id(plan), tuple(t.shape), t.stride(), t.dtype, t.device)


def _capture(fn, plan, q, k, v) -> _Graph:
    inputs = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                   for t in (q, k, v))
    side = torch.cuda.Stream(device=q.device)
    side.wait_stream(torch.cuda.current_stream(q.device))
    with torch.cuda.stream(side):
        fn(plan, *inputs, None)  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream(q.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(plan, *inputs, None)
    return _Graph(graph, inputs, output, threading.Lock(), plan)


def replay(fn, plan, q, k, v) -> torch.Tensor:
    """``fn(plan, q, k, v, None)`` through a cached CUDA graph (captured on first use)."""
    key = _key(plan, q) + _key(plan, k)[1:] + _key(plan, v)[1:]
    with _GRAPHS_LOCK:
        entry = _GRAPHS.get(key)
        if entry is None:
            if len(_GRAPHS) >= MAX_GRAPHS:
                _GRAPHS.clear()
            entry = _GRAPHS[key] = _capture(fn, plan, q, k, v)
    with entry.lock:
        for dst, src in zip(entry.inputs, (q, k, v)):
            dst.copy_(src)
        entry.graph.replay()
        return entry.output.clone()
