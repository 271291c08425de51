"""The one place the node layer reaches into the library, ``pisa_kernels``: its API, its limits,
its errors and its bounded caches.

ComfyUI imports the repository as a package named after its folder, so ``pisa_kernels`` is a
sibling package reached relatively; tests and tools may also import ``pisa_comfy`` top-level next
to a top-level ``pisa_kernels``.
"""

from __future__ import annotations

import torch

try:
    from ..pisa_kernels import backend as _backend
    from ..pisa_kernels import pisa_attention as _pisa_attention
    from ..pisa_kernels.capture_format import Capture, write_capture
    from ..pisa_kernels.errors import KernelDoesNotFit
    from ..pisa_kernels.limits import BLOCK_SIZES, KERNEL_DTYPES, MEASURED_HEAD_DIMS, check_sparsity
    from ..pisa_kernels.lru import lookup, remember
    from ..pisa_kernels.tiling import tile_permutation
except ImportError:  # pisa_comfy imported as a top-level package
    from pisa_kernels import backend as _backend
    from pisa_kernels import pisa_attention as _pisa_attention
    from pisa_kernels.capture_format import Capture, write_capture
    from pisa_kernels.errors import KernelDoesNotFit
    from pisa_kernels.limits import BLOCK_SIZES, KERNEL_DTYPES, MEASURED_HEAD_DIMS, check_sparsity
    from pisa_kernels.lru import lookup, remember
    from pisa_kernels.tiling import tile_permutation

__all__ = ["run_pisa", "backend_choice", "tile_permutation", "Capture", "write_capture", "KernelDoesNotFit",
           "BLOCK_SIZES", "KERNEL_DTYPES", "MEASURED_HEAD_DIMS", "check_sparsity", "lookup", "remember"]


def run_pisa(q, k, v, **kwargs):
    """``pisa_attention(..., return_stats=True)``: ``(out, PisaStats)``."""
    return _pisa_attention(q, k, v, return_stats=True, **kwargs)


def backend_choice(requested: str, device: torch.device) -> tuple[str | None, str]:
    """The backend PISA uses on ``device`` (None: attention stays dense) and the log sentence
    "PISA runs on <backend> on <device> because <reason>".

    With ``"auto"`` the node runs the Triton kernels or nothing: the PyTorch reference is a
    correctness oracle that is slower than dense attention, so where Triton cannot run (CPU, Apple,
    AMD, older NVIDIA GPUs, no Triton) the node keeps ComfyUI's dense attention.  Tests pin
    ``"reference"`` to exercise the sparse path on the CPU.
    """
    try:
        chosen = _backend.resolve_backend(requested, device)
    except ValueError as exc:
        return None, f"PISA runs on dense attention on {device} because {exc}"
    if requested == "reference":
        return chosen, f"PISA runs on reference on {device} because the reference backend was requested"
    if chosen == "triton":
        return chosen, f"PISA runs on triton on {device} because the Triton kernels support this device"
    reason = _backend.triton_unavailable_reason(device) or "the Triton interpreter is a test vehicle"
    return None, (f"PISA runs on dense attention on {device} because {reason} "
                  "(the PyTorch reference would be slower than dense)")
