"""``--profile``: one sparse step under ``torch.profiler``, every GPU kernel and copy of it, grouped
by what it belongs to (issue 13: find what a real step spends between the model's attention call
and PISA's kernels).

The groups are read from kernel names: PISA's own Triton kernels, dense attention (cuDNN / flash /
efficient SDPA, e.g. the cross-attention and the dense rows of other calls), GEMMs (the model's
linear layers), copies and layout changes (``copy_``, ``contiguous``, gathers, cat), and the rest
(norms, RoPE, activations, reductions).  The share of PISA's kernels against the time the PISA
calls took in the step (CUDA events) tells how much of the call is spent outside them.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from ..breakdown import library_kernel

#: (group, pattern on the kernel name), first match wins; PISA's kernels are the library's
#: (:func:`pisa_lab.breakdown.library_kernel`: the Triton and the Hopper kernels, every routing's).
GROUPS = (
    ("dense attention", re.compile(r"flash|fmha|cudnn|attention|sdpa|cutlass.*Attention", re.I)),
    ("GEMM", re.compile(r"gemm|nvjet|sm90_xmma|cutlass|wgmma|cublas", re.I)),
    ("copies and layout", re.compile(r"copy|memcpy|memset|gather|scatter|index|cat_|CatArray|transpose|"
                                     r"contiguous", re.I)),
)


def group_of(name: str) -> str:
    if library_kernel(name):
        return "PISA kernels"
    for group, pattern in GROUPS:
        if pattern.search(name):
            return group
    return "other"


def _device_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def profile_step(run, sigma: float, device, *, top: int = 25) -> dict:
    """Kernel times of one evaluation ``run(sigma)`` (already warm): per group and the ``top``
    kernels, in ms."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(sigma)
        torch.cuda.synchronize(device)
    kernels = [(evt.key, evt.count, _device_us(evt) / 1000.0) for evt in prof.key_averages()
               if _device_us(evt) > 0 and evt.device_type == torch.autograd.DeviceType.CUDA]
    by_group: dict[str, float] = defaultdict(float)
    for name, _, ms in kernels:
        by_group[group_of(name)] += ms
    kernels.sort(key=lambda k: -k[2])
    return {"total_kernel_ms": round(sum(ms for _, _, ms in kernels), 2),
            "groups_ms": {g: round(ms, 2) for g, ms in sorted(by_group.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": name[:120], "count": count, "ms": round(ms, 2), "group": group_of(name)}
                    for name, count, ms in kernels[:top]]}
