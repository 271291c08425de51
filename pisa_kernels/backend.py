"""Which backend can run where, decided once per device and explained in words.

The Triton kernels need a CUDA GPU of compute capability 8.0 or newer (sm80: A100; sm86/89:
RTX 30/40; sm90: H100) and an importable Triton.  Under ``TRITON_INTERPRET=1`` they also run on
CPU tensors (slowly), which is how CI checks them.  Everything else uses the PyTorch reference.
"""

from __future__ import annotations

import functools
import os

import torch

MIN_CAPABILITY = (8, 0)
#: The Gluon forward kernel (pisa_kernels.hopper_kernel) is for sm90 only (its wgmma and register
#: reallocation are Hopper's), and Gluon's API still changes between Triton releases: it runs with
#: the releases it was validated with on a GPU (docs/kernels.md); elsewhere the Triton kernel runs.
HOPPER_CAPABILITY = (9, 0)
HOPPER_TRITON_VERSIONS = ("3.6.",)


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """Why Triton or this package's kernels do not import here (one sentence), else ``None``.
    Also the environment check of ``install.py``, so it reports what the backend decides."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        from . import triton_kernels  # noqa: F401
    except Exception as exc:  # ImportError, or an old Triton lacking what the kernels use
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _hopper_import_error() -> str | None:
    try:
        from . import hopper_kernel  # noqa: F401
    except Exception as exc:  # no Gluon in this Triton, or a Gluon without what the kernel uses
        return f"{type(exc).__name__}: {exc}"
    return None


def hopper_unavailable_reason(device: torch.device) -> str | None:
    """``None`` if the Gluon Hopper forward kernel can run on ``device``, else why not (asked per
    call: the CUDA part is cached per device)."""
    reason = triton_unavailable_reason(device)
    if reason is not None:
        return reason
    if device.type != "cuda":
        return "the Hopper kernel runs on CUDA GPUs only"
    return _hopper_cuda_reason(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _hopper_cuda_reason(index: int) -> str | None:
    cap = torch.cuda.get_device_capability(index)
    if cap != HOPPER_CAPABILITY:
        return f"GPU capability sm{cap[0]}{cap[1]} is not Hopper's sm90"
    import triton

    if not triton.__version__.startswith(HOPPER_TRITON_VERSIONS):
        tested = ", ".join(v.rstrip(".") for v in HOPPER_TRITON_VERSIONS)
        return f"Triton {triton.__version__}: the Hopper kernel is validated with Triton {tested}"
    err = _hopper_import_error()
    return f"Gluon is not usable ({err})" if err is not None else None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_reason(index: int) -> str | None:
    cap = torch.cuda.get_device_capability(index)
    if torch.version.hip is not None:
        return "the Triton kernels are only validated on NVIDIA GPUs, not on ROCm"
    if cap < MIN_CAPABILITY:
        return f"GPU capability sm{cap[0]}{cap[1]} is below sm80"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """``None`` if the Triton backend can run on ``device``, else why not (one sentence)."""
    err = triton_import_error()
    if err is not None:
        return f"Triton is not usable ({err})"
    if device.type == "cuda":
        return _cuda_reason(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu" and interpreter_enabled():
        return None
    return f"device {device.type} has no Triton backend"


def resolve_backend(requested: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` or ``"reference"``; refuse ``"triton"`` where it cannot run.
    ``"gluon"`` (the Triton backend with the Hopper forward kernel) is ``"triton"`` here and
    refused where :func:`hopper_unavailable_reason` says so."""
    if requested not in ("auto", "triton", "gluon", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton', 'gluon' or 'reference', got {requested!r}")
    if requested == "reference":
        return "reference"
    if requested == "gluon":
        reason = hopper_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"backend='gluon' cannot run here: {reason}")
        return "triton"
    reason = triton_unavailable_reason(device)
    if reason is None:
        # On CPU the interpreter is a test vehicle, not a speed path: auto keeps the reference.
        if requested == "auto" and device.type != "cuda":
            return "reference"
        return "triton"
    if requested == "triton":
        raise ValueError(f"backend='triton' cannot run here: {reason}")
    return "reference"


def describe(device: torch.device | str | None = None) -> str:
    """One line for logs: what PISA runs on this device and why."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    reason = triton_unavailable_reason(device)
    if reason is None and device.type == "cuda":
        hopper = " (forward pass: the Gluon Hopper kernel)" if hopper_unavailable_reason(device) is None else ""
        return f"PISA runs the Triton kernels{hopper} on {torch.cuda.get_device_name(device)}"
    return f"PISA runs the PyTorch reference on {device.type} ({reason or 'Triton interpreter only'})"
