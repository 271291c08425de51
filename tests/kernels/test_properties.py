"""Properties of PISA that follow from the formulas alone, checked on the naive oracle itself, the
reference and the Triton kernels (interpreter on CPU).

They do not need an implementation to compare against, so they also validate the oracle:

* every block exact (sparsity 0, or N within one block) is dense attention, for every order;
* keys constant inside every key block make the zeroth-order tail exact and ``H_j = 0``, so orders
  1 and 0 equal dense attention at any sparsity (catches a mean-vs-sum ``V̂``, a missing ``n_j``,
  selected blocks counted twice, ...);
* when every block has the same first-order moment ``H_j``, the hybrid term is the per-block first
  order, so order 1 is second-order accurate: its error shrinks like ``s^2`` while order 0's shrinks
  like ``s`` (catches a wrong first-order coefficient, e.g. ``s log2 e`` or ``s`` applied twice);
* order "drop" equals dense attention masked to the selected blocks;
* order 0 equals dense attention in which every unselected block's keys are replaced by their
  block mean (the definition of the zeroth-order term, computed a different way).
"""

import math

import pytest
import torch

from naive_pisa import dense_attention, naive_pisa
from pisa_kernels import pisa_attention
from pisa_kernels.tiling import tile_permutation
from pisa_test_utils import assert_close_to, block_constant_qkv, capture_routing, rand_qkv, selection_of

IMPLS = ["naive", "reference", "triton"]


def run(impl, q, k, v, triton_device=None, **kw):
    if impl == "naive":
        return naive_pisa(q, k, v, **kw)[0]
    if impl == "reference":
        return pisa_attention(q, k, v, backend="reference", **kw)
    # Triton: fp32 copies on the Triton device (fp64 is reference-only).
    args = [t.to(device=triton_device, dtype=torch.float32) for t in (q, k, v)]
    kw = {key: (val.to(triton_device) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    return pisa_attention(*args, backend="triton", **kw).cpu().double()


def tol_of(impl, device=None):
    if impl != "triton":
        return 1e-10
    return 2e-5 if device is None or device.type == "cpu" else 3e-3  # GPU fp32 dots run as tf32


@pytest.fixture
def dev_for(request):
    """The Triton device when the test is parametrized with impl='triton', else None."""
    if request.getfixturevalue("impl") == "triton":
        return request.getfixturevalue("triton_device")
    return None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order", [1, 0, "drop"])
def test_all_blocks_exact_is_dense(impl, order, dev_for):
    q, k, v = rand_qkv(2, 2, 200, 64, dtype=torch.float64, seed=1, v_shift=0.5)
    mask = torch.rand(2, 200, generator=torch.Generator().manual_seed(3)) < 0.8
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(4))
    dense = dense_attention(q, k, v, kv_valid=mask)
    out = run(impl, q, k, v, dev_for, sparsity=0.0, order=order, kv_valid=mask, token_perm=perm)
    assert_close_to(out, dense, tol_of(impl, dev_for), "sparsity 0")
    # N within one key block: k = max(1, ...) = 1 = NB, dense at any sparsity.
    q1, k1, v1 = (t[:, :, :50] for t in (q, k, v))
    out1 = run(impl, q1, k1, v1, dev_for, sparsity=0.95, order=order)
    assert_close_to(out1, dense_attention(q1, k1, v1), tol_of(impl, dev_for), "one block")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order", [1, 0])
@pytest.mark.parametrize("block,tiled", [(64, True), (128, False)])
def test_block_constant_keys_make_the_tail_exact(impl, order, block, tiled, dev_for):
    grid = (15, 22)
    n = grid[0] * grid[1]
    perm = tile_permutation(grid, block_size=block) if tiled else None
    q, k, v = block_constant_qkv(2, 2, n, 64, block=block, perm=perm, seed=block)
    lengths = torch.tensor([n, n - 100])  # masked keys: the valid part of each block is still constant
    dense = dense_attention(q, k, v, kv_valid=lengths)
    out = run(impl, q, k, v, dev_for, sparsity=0.8, order=order, block_size=block, token_perm=perm,
              kv_valid=lengths)
    assert_close_to(out, dense, tol_of(impl, dev_for), f"order {order}")
    # ...whereas dropping the tail is far off (the test has teeth).
    drop = run(impl, q, k, v, dev_for, sparsity=0.8, order="drop", block_size=block, token_perm=perm,
               kv_valid=lengths)
    assert (drop - dense).abs().max() > 1e-2


def shared_moment_qkv(b, h, nb, block, d, seed=0):
    """Keys ``c_j + delta_n`` and values ``w_j + u_n`` with the same zero-mean ``delta`` and the same
    ``u`` in every (full) block: every block has the same ``H_j = sum_n delta_n u_n^T``."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(b, h, nb, 1, d, generator=g, dtype=torch.float64) * 2
    delta = torch.randn(b, h, 1, block, d, generator=g, dtype=torch.float64)
    delta = delta - delta.mean(dim=3, keepdim=True)
    w = torch.randn(b, h, nb, 1, d, generator=g, dtype=torch.float64)
    u = torch.randn(b, h, 1, block, d, generator=g, dtype=torch.float64)
    n = nb * block
    k = (c + delta).reshape(b, h, n, d)
    v = (w + u).reshape(b, h, n, d)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("impl", IMPLS)
def test_first_order_is_second_order_accurate(impl, dev_for):
    q, k, v = shared_moment_qkv(1, 2, 6, 64, 64)
    errs = {}
    for scale in (1e-2, 1e-3):
        dense = dense_attention(q, k, v, scale=scale)
        e1 = float((run(impl, q, k, v, dev_for, scale=scale, order=1, sparsity=0.7) - dense).abs().max())
        e0 = float((run(impl, q, k, v, dev_for, scale=scale, order=0, sparsity=0.7) - dense).abs().max())
        errs[scale] = (e1, e0)
    # Order 0 error ~ s, order 1 error ~ s^2 (the ratio is ~13 s on these inputs).
    e1, e0 = errs[1e-3]
    assert e1 < 0.05 * e0, errs
    assert errs[1e-3][0] < 0.05 * errs[1e-2][0], errs  # 10x smaller scale: ~100x smaller error


def masked_dense(q, k, v, allowed, scale):
    """float64 softmax attention with a token mask ``allowed`` [B, H, N, N] (rows without any
    allowed key give 0)."""
    z = (q @ k.transpose(-1, -2)) * scale
    z = z.masked_fill(~allowed, -math.inf)
    return torch.softmax(z, dim=-1).nan_to_num(0.0) @ v


def token_selection(sel_mask, b, h, n, block, valid=None):
    """Selection ``[BH, NQ, NB]`` -> allowed keys ``[B, H, N, N]`` (no permutation)."""
    sel = sel_mask.cpu().bool().view(b, h, *sel_mask.shape[1:])
    rows_tile = torch.arange(n) // 128
    key_block = torch.arange(n) // block
    allowed = sel[:, :, rows_tile][:, :, :, key_block]
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    return allowed


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("block", [64, 128])
def test_drop_is_masked_dense(impl, block, dev_for):
    b, h, n = 2, 2, 400
    q, k, v = rand_qkv(b, h, n, 64, dtype=torch.float64, seed=5)
    lengths = torch.tensor([n, 301])
    with capture_routing() as log:
        out = run(impl, q, k, v, dev_for, sparsity=0.7, order="drop", block_size=block, kv_valid=lengths)
    sel = selection_of(log)
    valid = torch.arange(n)[None, :] < lengths[:, None]
    expect = masked_dense(q, k, v, token_selection(sel.mask, b, h, n, block, valid), 64 ** -0.5)
    assert_close_to(out, expect, tol_of(impl, dev_for), "drop")


@pytest.mark.parametrize("impl", ["naive", "reference", "triton"])
@pytest.mark.parametrize("block", [64, 128])
def test_order0_is_dense_over_centroid_keys(impl, block, dev_for):
    """Zeroth order = exact attention in which each unselected block's valid keys are all replaced
    by the block's mean key (so each contributes ``n_j e^{zbar}`` and ``e^{zbar} V̂_j``)."""
    b, h, n = 1, 2, 333
    q, k, v = rand_qkv(b, h, n, 64, dtype=torch.float64, seed=6, v_shift=0.5)
    lengths = torch.tensor([290])
    valid = torch.arange(n)[None, :] < lengths[:, None]
    with capture_routing() as log:
        pisa_attention(q, k, v, sparsity=0.6, order=0, block_size=block, kv_valid=lengths, backend="reference")
    sel = selection_of(log).mask.cpu().bool()  # [BH, NQ, NB]
    out = run(impl, q, k, v, dev_for, sparsity=0.6, order=0, block_size=block, kv_valid=lengths)
    expect = torch.empty(b, h, n, 64, dtype=torch.float64)
    nb = -(-n // block)
    key_block = torch.arange(n) // block
    for hi in range(h):
        kk = k[0, hi]
        kbar = torch.stack([kk[j * block:(j + 1) * block][valid[0, j * block:(j + 1) * block]].mean(0)
                            for j in range(nb)])
        for t in range(-(-n // 128)):
            rows = slice(t * 128, min(n, (t + 1) * 128))
            unsel = ~sel[hi, t][key_block]
            keys = torch.where(unsel[:, None], kbar[key_block], kk)
            z = (q[0, hi, rows] @ keys.T) * 64 ** -0.5
            z = z.masked_fill(~valid[0][None, :], -math.inf)
            expect[0, hi, rows] = torch.softmax(z, dim=-1) @ v[0, hi]
    assert_close_to(out, expect, tol_of(impl, dev_for), "order 0 vs centroid keys")
