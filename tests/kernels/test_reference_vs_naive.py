"""The PyTorch reference (``backend="reference"``) against the independent float64 oracle
(``naive_pisa``), at float64 (tolerance 1e-10) on small random and structured inputs.

The reference is the oracle of the Triton kernels, so it is checked here against the formulas of
pisa-method.md §3-§6 one feature at a time (orders, partial blocks, tiny N, sinks, dense rows, masks,
batches, head dims, layouts, strides, token orders, block sizes, covariance routing).  The routing
is recomputed naively as well and must pick the same blocks (except among blocks without a valid
key, which contribute nothing whichever way the tie is broken).
"""

import pytest
import torch

from naive_pisa import naive_pisa
from pisa_kernels import pisa_attention
from pisa_kernels.tiling import joint_permutation, tile_permutation
from pisa_test_utils import (TOL, assert_close_to, capture_routing, rand_qkv, same_selection_on_nonempty,
                             strided_variant, structured_qkv)

ORDERS = [1, 0, "drop"]


def check(q, k, v, *, naive_routing=True, tol=None, **kw):
    """Run the reference, check its routing against the naive routing (or replay it into the
    oracle), and compare the outputs.  Returns the reference output."""
    with capture_routing() as log:
        out = pisa_attention(q, k, v, backend="reference", **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    stats, sel, _ = log[0] if log else (None, None, None)
    if sel is None:  # dense_q covering everything still routes; no routing only if impossible
        pytest.fail("the reference did not route")
    heads = q.shape[1] if kw.get("layout", "BHND") == "BHND" else q.shape[2]
    if naive_routing:
        expect, naive_sel = naive_pisa(q, k, v, **kw)
        assert same_selection_on_nonempty(sel.mask, naive_sel, stats.blen, heads), "routing differs from naive"
    else:
        expect, _ = naive_pisa(q, k, v, selection=sel.mask.bool(), **kw)
    assert_close_to(out, expect, tol if tol is not None else TOL[q.dtype], f"reference vs naive {kw}")
    return out


# --- orders x sequence lengths (partial last blocks, N below one block, N = 1) x block sizes ---


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 127, 130, 257, 383])
@pytest.mark.parametrize("block", [64, 128])
def test_orders_lengths_blocks(order, n, block):
    q, k, v = rand_qkv(1, 2, n, 64, dtype=torch.float64, seed=n + block, v_shift=0.5)
    check(q, k, v, sparsity=0.6, block_size=block, order=order)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75, 0.875, 0.95, 0.999])
@pytest.mark.parametrize("order", ORDERS)
def test_sparsities(sparsity, order):
    q, k, v = rand_qkv(1, 2, 700, 64, dtype=torch.float64, seed=3, v_shift=0.5)
    check(q, k, v, sparsity=sparsity, order=order)


@pytest.mark.parametrize("d", [8, 16, 32, 64, 80, 128, 256])
@pytest.mark.parametrize("order", [1, 0])
def test_head_dims(d, order):
    """64 and 128 are the target head dims; the reference takes any (the Triton path caps at 128)."""
    q, k, v = rand_qkv(1, 2, 300, d, dtype=torch.float64, seed=d, v_shift=0.5)
    check(q, k, v, sparsity=0.7, order=order)


def test_custom_scale():
    """A scale other than D^-1/2: the first-order coefficient is the natural ``s`` (pitfall 6)."""
    q, k, v = rand_qkv(1, 2, 400, 64, dtype=torch.float64, seed=5)
    for scale in (0.05, 0.3, 1.0):
        check(q, k, v, sparsity=0.75, order=1, scale=scale)


# --- batches, heads, layouts and strides ---


@pytest.mark.parametrize("b,h", [(2, 1), (3, 2), (2, 5)])
@pytest.mark.parametrize("order", ORDERS)
def test_batches_heads(b, h, order):
    q, k, v = rand_qkv(b, h, 200, 64, dtype=torch.float64, seed=b * 10 + h)
    check(q, k, v, sparsity=0.5, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_layout_bnhd(order):
    q, k, v = rand_qkv(2, 3, 333, 64, dtype=torch.float64, seed=11, layout="BNHD")
    out = check(q, k, v, sparsity=0.6, order=order, layout="BNHD")
    # The same tokens in BHND give the same result, transposed.
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out_h = pisa_attention(qh, kh, vh, sparsity=0.6, order=order, backend="reference")
    assert torch.equal(out_h.transpose(1, 2), out)


@pytest.mark.parametrize("kind", ["d2", "n2", "transposed", "offset"])
@pytest.mark.parametrize("layout", ["BHND", "BNHD"])
def test_strided_inputs(kind, layout):
    """Views with unusual strides give the same result as contiguous copies (pitfall 8)."""
    q, k, v = rand_qkv(2, 2, 200, 64, dtype=torch.float64, seed=21, layout=layout)
    qs, ks, vs = (strided_variant(t, kind, seed=i) for i, t in enumerate((q, k, v)))
    assert not qs.is_contiguous() or kind == "offset"
    kv_valid = torch.tensor([200, 150])
    out = check(qs, ks, vs, sparsity=0.6, order=1, layout=layout, kv_valid=kv_valid)
    base = pisa_attention(q, k, v, sparsity=0.6, order=1, layout=layout, kv_valid=kv_valid, backend="reference")
    torch.testing.assert_close(out, base, rtol=1e-12, atol=1e-12)


def test_expanded_batch():
    """A batch broadcast with stride 0 (CFG with shared conditioning) is read correctly."""
    q, k, v = rand_qkv(1, 2, 150, 64, dtype=torch.float64, seed=4)
    qe, ke, ve = (t.expand(3, -1, -1, -1) for t in (q, k, v))
    out = check(qe, ke, ve, sparsity=0.5, order=1)
    single = pisa_attention(q, k, v, sparsity=0.5, order=1, backend="reference")
    torch.testing.assert_close(out, single.expand(3, -1, -1, -1), rtol=1e-12, atol=1e-12)


# --- key masks ---


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("lengths", [[1], [64], [100], [129], [300], [0]])
def test_kv_lengths(order, lengths):
    """Lengths: the keys past the length get zero weight everywhere (exact part, tail, means,
    sums, H); a length of 0 gives a zero output."""
    q, k, v = rand_qkv(1, 2, 300, 64, dtype=torch.float64, seed=sum(lengths) + 1, v_shift=0.5)
    out = check(q, k, v, sparsity=0.6, order=order, kv_valid=torch.tensor(lengths))
    if lengths == [0]:
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("pattern", ["random", "holes", "block_gaps", "mixed_batch"])
def test_kv_bool_masks(order, pattern):
    b, n = 3, 350
    g = torch.Generator().manual_seed(7)
    if pattern == "random":
        mask = torch.rand(b, n, generator=g) < 0.7
    elif pattern == "holes":  # a few invalid keys scattered
        mask = torch.rand(b, n, generator=g) < 0.97
    elif pattern == "block_gaps":  # whole key blocks invalid (must never be selected or tail-counted)
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[:, 64:192] = False
        mask[1, 256:] = False
    else:  # one element all valid, one with no valid key at all, one partial
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[1] = False
        mask[2, 100:] = False
    q, k, v = rand_qkv(b, 2, n, 64, dtype=torch.float64, seed=8, v_shift=0.5)
    check(q, k, v, sparsity=0.7, order=order, kv_valid=mask)


def test_masked_keys_have_no_influence():
    """Changing the masked keys and values (even to huge numbers) changes nothing."""
    q, k, v = rand_qkv(2, 2, 300, 64, dtype=torch.float64, seed=9)
    lengths = torch.tensor([300, 170])
    a = pisa_attention(q, k, v, sparsity=0.6, kv_valid=lengths, backend="reference")
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 170:] = 1e3
    v2[1, :, 170:] = -1e4
    b = pisa_attention(q, k2, v2, sparsity=0.6, kv_valid=lengths, backend="reference")
    assert torch.equal(a, b)


# --- sinks and dense query rows ---


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("sink", [[(0, 1)], [(0, 64)], [(250, 300)], [(10, 20), (200, 210)], [(0, 300)]])
def test_sinks(order, sink):
    """Blocks holding a sink token are exact for every query tile, on top of the top-k budget."""
    q, k, v = rand_qkv(1, 2, 300, 64, dtype=torch.float64, seed=12, v_shift=0.5)
    check(q, k, v, sparsity=0.75, order=order, sink_kv=sink)


def test_sink_as_bool_tensor():
    q, k, v = rand_qkv(1, 2, 300, 64, dtype=torch.float64, seed=13)
    mask = torch.zeros(300, dtype=torch.bool)
    mask[270:] = True
    a = check(q, k, v, sparsity=0.75, sink_kv=mask)
    b = pisa_attention(q, k, v, sparsity=0.75, sink_kv=[(270, 300)], backend="reference")
    assert torch.equal(a, b)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dense", [[(0, 1)], [(0, 40)], [(100, 300)], [(0, 300)], [(5, 6), (299, 300)]])
def test_dense_q(order, dense):
    q, k, v = rand_qkv(2, 2, 300, 64, dtype=torch.float64, seed=14, v_shift=0.5)
    check(q, k, v, sparsity=0.8, order=order, dense_q=dense, kv_valid=torch.tensor([300, 220]))


# --- token orders ---


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("block", [64, 128])
def test_tiled_perm(order, block):
    grid = (13, 21)  # not a multiple of the tile sides: ragged edge tiles
    n = grid[0] * grid[1]
    q, k, v = structured_qkv(1, 2, grid, 64, dtype=torch.float64, seed=15)
    perm = tile_permutation(grid, block_size=block)
    check(q, k, v, sparsity=0.7, order=order, block_size=block, token_perm=perm)
    assert perm.numel() == n


@pytest.mark.parametrize("order", ORDERS)
def test_random_perm_with_everything(order):
    """A random processing order together with a key mask, sinks and dense rows (all given in
    input positions)."""
    n = 320
    q, k, v = rand_qkv(2, 2, n, 64, dtype=torch.float64, seed=16, v_shift=0.5)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(2, n, generator=torch.Generator().manual_seed(2)) < 0.8
    check(q, k, v, sparsity=0.75, order=order, token_perm=perm, kv_valid=mask, sink_kv=[(0, 10)],
          dense_q=[(0, 10)])


def test_perm_identity_is_no_perm():
    q, k, v = rand_qkv(1, 2, 300, 64, dtype=torch.float64, seed=17)
    a = pisa_attention(q, k, v, sparsity=0.6, backend="reference")
    b = pisa_attention(q, k, v, sparsity=0.6, token_perm=torch.arange(300), backend="reference")
    assert torch.equal(a, b)


# --- routing ---


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n", [200, 640])
def test_cov_routing(order, n):
    q, k, v = rand_qkv(2, 2, n, 64, dtype=torch.float64, seed=18)
    k = k * torch.linspace(0.2, 3.0, n, dtype=torch.float64)[None, None, :, None]  # uneven residuals
    check(q, k, v, sparsity=0.7, order=order, routing="cov", kv_valid=torch.tensor([n, n - 77]))


# --- structured (DiT-like) inputs ---


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("block", [64, 128])
def test_structured_joint(order, block):
    """FLUX-/HunyuanVideo-like joint attention: 40 text tokens (the last 15 padded) then a tiled
    13x17 image grid; text keys forced exact (sink), text queries dense."""
    grid, n_text = (13, 17), 40
    q, k, v = structured_qkv(2, 2, grid, 64, dtype=torch.float64, seed=19, n_extra=n_text)
    n = q.shape[2]
    perm = joint_permutation(n, grid, n_text, block_size=block)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 25:n_text] = False
    check(q, k, v, sparsity=0.8, order=order, block_size=block, token_perm=perm, kv_valid=valid,
          sink_kv=[(0, n_text)], dense_q=[(0, n_text)], naive_routing=False)
    check(q, k, v, sparsity=0.8, order=order, block_size=block, token_perm=perm, kv_valid=valid,
          sink_kv=[(0, n_text)], dense_q=[(0, n_text)], routing="cov", naive_routing=False)


@pytest.mark.parametrize("layout", ["BHND", "BNHD"])
def test_structured_layouts(layout):
    q, k, v = structured_qkv(1, 3, (16, 20), 128, dtype=torch.float64, seed=20, layout=layout)
    check(q, k, v, sparsity=0.875, order=1, layout=layout, token_perm=tile_permutation((16, 20)))


# --- lower precisions: same blocks (replayed), float64 oracle on the rounded inputs ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", ORDERS)
def test_low_precision_inputs(dtype, order):
    q, k, v = rand_qkv(2, 2, 300, 64, dtype=dtype, seed=22, v_shift=0.5)
    check(q, k, v, sparsity=0.6, order=order, kv_valid=torch.tensor([300, 201]), naive_routing=False)


# --- the log-normal tail ---

LN_CASES = {
    "partial_blocks": dict(n=383, sparsity=0.6),
    "block128": dict(n=300, sparsity=0.5, block_size=128),
    "lengths": dict(n=300, sparsity=0.7, kv_valid=torch.tensor([300, 133])),
    "empty_blocks": dict(n=300, sparsity=0.6, kv_valid=torch.arange(300)[None, :].repeat(2, 1) % 200 < 64),
    # a random order scatters the sink tokens: three of them force at most three of the 11 blocks
    "perm_sinks_dense": dict(n=700, sparsity=0.75, sink_kv=[(0, 3)], dense_q=[(0, 20)],
                             token_perm=torch.randperm(700, generator=torch.Generator().manual_seed(3))),
    "cov": dict(n=300, sparsity=0.7, routing="cov"),
    # logits spread so widely inside blocks that the correction hits Samuelson's cap (c > 126)
    "capped": dict(n=300, sparsity=0.7, scales=(6.0, 6.0)),
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", list(LN_CASES))
def test_lognormal_tail(order, case):
    """``tail="lognormal"`` against the oracle's own mass correction (tile-mean q^2, per-block key
    variance over the valid keys), on inputs whose keys spread inside blocks (so the correction is
    large and must be applied exactly); "drop" has no tail, so the tail changes nothing there."""
    kw = dict(LN_CASES[case])
    n = kw.pop("n")
    q_scale, k_scale = kw.pop("scales", (2.0, 2.0))
    q, k, v = rand_qkv(2, 2, n, 64, dtype=torch.float64, seed=len(case), q_scale=q_scale, k_scale=k_scale,
                       v_shift=0.5)
    out = check(q, k, v, order=order, tail="lognormal", **kw)
    plain = pisa_attention(q, k, v, order=order, backend="reference", **kw)
    change = float((out - plain).abs().max())
    assert (change > 1e-3) if order != "drop" else (change == 0.0), change
