"""What the library accepts, defined once: the API validates against these, the ComfyUI node builds
its widgets and its dense/sparse decision from them, and the tests read them instead of restating
them."""

from __future__ import annotations

import math

import torch

#: Dtypes :func:`pisa_kernels.pisa_attention` accepts (float64 runs the reference only).
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
#: Dtypes the Triton kernels compute in.
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Key block sizes (tokens).  Query tiles are always ``routing.QUERY_TILE`` tokens.
BLOCK_SIZES = (64, 128)
#: Routings (``pisa_attention(routing=...)``): ``topk`` the same number of blocks per query tile by
#: pooled score, ``cov`` that score + ``log ||H_j||_F``, ``adaptive`` the same mean number, shared
#: between tiles by their estimated mass (routing.adaptive_route).
ROUTINGS = ("topk", "cov", "adaptive")
#: How the tail weighs an unselected block: ``plain`` ``n_j exp(s q . kbar_j)`` (the paper's zeroth
#: order), ``lognormal`` times ``exp(c_ij)``, its second-order mass term (routing.mass_bias).
TAILS = ("plain", "lognormal")
#: Largest head dim of the Triton kernels (one register tile per row); larger ones use the reference.
TRITON_MAX_HEAD_DIM = 128
#: Head dims the kernels are tuned and measured for: the ComfyUI node sends only these to PISA
#: (every DiT it targets uses 64 or 128) and keeps other calls dense.
MEASURED_HEAD_DIMS = (64, 128)


def check_sparsity(sparsity) -> float:
    """``sparsity`` as a float in ``[0, 1)``, or ValueError (bools and non-finite values refused)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) \
            or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)
