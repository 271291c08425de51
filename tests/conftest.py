"""Suite-wide pytest setup, kept minimal (every test folder shares it).

* The repository root goes on ``sys.path`` so tests ``import pisa_kernels`` / ``pisa_comfy`` as
  top-level packages, and this folder for the shared helper ``prerequisites`` (skip, or fail under
  ``CI=true``, when a prerequisite is missing).
* Without CUDA, ``TRITON_INTERPRET=1`` is set here, before anything imports Triton (Triton reads
  it when a kernel is decorated), so the Triton kernels run on CPU tensors in the interpreter.
  An explicit ``TRITON_INTERPRET`` in the environment is left alone.
* Tests marked ``gpu`` are skipped, with the reason, where CUDA is not available.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from prerequisites import strict


def pytest_report_header(config):
    return "missing test prerequisites: " + ("fail (CI=true)" if strict() else "skip with the reason (CI is not true)")


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
