"""Launch the forward kernel once in a chosen mode, for Nsight Compute (ncu) to profile.

    ncu --kernel-name regex:_pisa_fwd --launch-skip 1 --launch-count 1 python scripts/profile_kernel.py MODE

MODE: ``exact`` (order drop: phase 1 only), ``tail`` (no exact block: phases 2-3 only), ``full``.
Shape: Wan 480p (N = 32760, H = 40, D = 128, bf16), sparsity 0.875.
"""
import sys

import torch

sys.path.insert(0, ".")
from pisa_kernels import triton_kernels as tk  # noqa: E402
from pisa_kernels.routing import Selection, num_blocks, route, topk_count  # noqa: E402

mode = sys.argv[1]
n, h, d = 32760, 40, 128
q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
st = tk.pool(q, k, v, valid=None, block=64, first_order=True, cov=False)
sel = route(st, scale=d ** -0.5, k=topk_count(0.875, num_blocks(n, 64)), heads=h)
if mode == "tail":
    sel = Selection(sel.idx, sel.mask, 0)
out = torch.empty_like(q)
for _ in range(2):
    tk.attend(q, k, v, out, valid=None, stats=st, sel=sel, scale=d ** -0.5, block=64,
              order=-1 if mode == "exact" else 1)
torch.cuda.synchronize()
