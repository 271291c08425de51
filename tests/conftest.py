"""Suite-wide pytest setup, kept minimal (every test folder shares it).

* The repository root goes on ``sys.path`` so tests ``import pisa_kernels`` / ``pisa_comfy`` as
  top-level packages (the root itself is a ComfyUI node folder; it is never imported as a package).
* Without CUDA, ``TRITON_INTERPRET=1`` is set here, before anything imports Triton (Triton reads
  it when a kernel is decorated), so the Triton kernels run on CPU tensors in the interpreter.
  An explicit ``TRITON_INTERPRET`` in the environment is left alone.
* Tests marked ``gpu`` are skipped, with the reason, where CUDA is not available.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _cuda_available() -> bool:
    try:
        import torch  # importing torch does not import triton

        return bool(torch.cuda.is_available())
    except Exception:
        return False


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
