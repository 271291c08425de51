"""Timing and input helpers shared by the lab's benchmarks (``bench``, ``bench_node_calls``,
``e2e``) and the GPU scripts, in one place so that every table times a call the same way.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch


def time_ms(fn, warmup_ms: int = 30, rep_ms: int = 150) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def wall_ms(fn, reps: int = 5) -> float:
    """Median wall time of ``fn`` (ms) after one warm-up call: the CPU's counterpart of :func:`time_ms`."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def timer_for(device: torch.device):
    """The timer of a call on ``device``: :func:`time_ms` (CUDA events) on a GPU, :func:`wall_ms` elsewhere."""
    return time_ms if device.type == "cuda" else wall_ms


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_inputs(kind: str, b: int, h: int, n: int, d: int, seed: int, device) -> tuple[torch.Tensor, ...]:
    """``[B, N, H, D]`` bf16 inputs.  ``random``: i.i.d. normal; ``dit``: the structured DiT-like set
    of :mod:`pisa_lab.workloads` when present (spatially smooth, RoPE, concentrated heads)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "random":
        return tuple(torch.randn(b, n, h, d, generator=g).to(device=device, dtype=torch.bfloat16) for _ in range(3))
    from . import workloads  # (only for --data dit)

    return workloads.bench_inputs(b, h, n, d, seed=seed, device=device)


def sdpa(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel

    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel([backend]):
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)


def peak_extra_mb(fn) -> float:
    """Peak memory (MiB) a call allocates beyond its inputs and its output."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
    del out
    return peak / 2**20


def device_name(device: torch.device | None = None) -> str:
    """The GPU's name (``device`` None: the first GPU), or the CPU's core count off a GPU."""
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda"):
        return torch.cuda.get_device_name(device if device is not None else 0)
    return f"CPU ({os.cpu_count()} cores)"


def environment(device: torch.device | None = None) -> dict:
    """What a number was measured with: date, the device (:func:`device_name`) and the versions."""
    import triton

    return dict(date=datetime.date.today().isoformat(), gpu=device_name(device),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                python=platform.python_version())
