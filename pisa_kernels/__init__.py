"""PISA: Piecewise Sparse Attention for Diffusion Transformers.

Host-independent: imports torch (and Triton where available), never ComfyUI.

* :func:`pisa_attention` - the public API (Triton kernels on CUDA sm80+, PyTorch reference elsewhere).
* :mod:`pisa_kernels.tiling` - token orders (compact 2-D / 3-D tiles) for better blocks.
* :mod:`pisa_kernels.backend` - which backend runs where, in words.
* ``python -m pisa_lab.bench`` - kernel benchmark against dense SDPA.
"""

from .api import PisaStats, pisa_attention
from .backend import describe, resolve_backend, triton_unavailable_reason
from .routing import QUERY_TILE, topk_count

__all__ = ["pisa_attention", "PisaStats", "describe", "resolve_backend", "triton_unavailable_reason",
           "QUERY_TILE", "topk_count"]
__version__ = "0.1.0"
