"""The Triton kernels against the PyTorch reference, on small shapes.

On a machine without CUDA they run on CPU tensors under ``TRITON_INTERPRET=1`` (set by
tests/conftest.py): that is how CI checks the kernels.  Each interpreted call takes about a second,
so the shapes are tiny and every case is chosen for a feature (orders, partial blocks, N < one
block, N = 1, masks, token orders, covariance routing, sinks, dense rows, head dims, block sizes,
batches, layouts, strides).  With CUDA the same tests run the compiled kernels.

bf16 only on the GPU: Triton 3.8's interpreter computes ``tl.dot`` on bf16 inputs wrongly
(checked with a 16x16 kernel: the result is garbage), so bf16 cases are skipped on CPU and covered by
test_gpu.py and by these tests on a GPU machine.

Both backends route on their own pooled statistics; on random inputs they must pick the same
blocks.  Inputs with tied scores (structured ones) replay the reference's selection instead.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pisa_kernels import pisa_attention
from pisa_kernels import reference as ref_mod
from pisa_kernels import routing
from pisa_kernels.tiling import joint_permutation, tile_permutation
from pisa_test_utils import (capture_routing, joint_text_case, max_err, rand_qkv, same_selection_on_nonempty, selection_of,
                             strided_variant, structured_qkv)


def tri_tol(dtype, device):
    if dtype == torch.float32:
        return 2e-5 if device.type == "cpu" else 3e-3  # tf32 dots on the GPU
    return {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]


def skip_bf16_interp(dtype, device):
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton 3.8's interpreter computes tl.dot on bf16 inputs wrongly; bf16 is checked on GPU")


def to_dev(kw, dev):
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def compare(q, k, v, device, *, replay=False, **kw):
    """Reference vs Triton on the same inputs (on ``device``); returns the Triton output."""
    q, k, v = (t.to(device) for t in (q, k, v))
    kw = dict(to_dev(kw, device), cuda_graph=False)  # a graph replay would not call the routing
    with capture_routing() as log_r:
        ref, st_r = pisa_attention(q, k, v, backend="reference", return_stats=True, **kw)
    sel_r = selection_of(log_r)
    with capture_routing(replay=sel_r if replay else None) as log_t:
        tri, st_t = pisa_attention(q, k, v, backend="triton", return_stats=True, **kw)
    sel_t = selection_of(log_t)
    assert st_t.backend == "triton" and st_r.backend == "reference"
    assert tri.shape == q.shape and tri.dtype == q.dtype and tri.device == q.device
    if not replay:
        heads = q.shape[1] if kw.get("layout", "BHND") == "BHND" else q.shape[2]
        assert same_selection_on_nonempty(sel_r.mask, sel_t.mask, log_r[0][0].blen, heads), \
            "Triton and reference routed differently"
    err = max_err(tri, ref)
    tol = tri_tol(q.dtype, device)
    assert err <= tol, f"triton vs reference: {err:.3e} > {tol:.0e} ({kw})"
    return tri


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("nb,kt", [(72, 10), (1182, 147), (5, 1), (17, 16), (100, 99), (100, 0), (8000, 7999)])
def test_top_blocks_kernel_selects_what_the_sort_selects(nb, kt, triton_device):
    """The routing's top-k kernel against routing.top_blocks: random, heavily tied, and special
    scores (+-inf, NaN, -0.0); every index and mask byte written."""
    g = torch.Generator().manual_seed(nb * 1000 + kt)
    special = torch.randint(-2, 2, (2, 3, nb), generator=g).float()
    special[0, 0, :3] = float("inf")
    special[0, 1, 1::3] = float("-inf")
    special[1, 2, ::4] = float("nan")
    special[1, 1, ::2] = -0.0
    for score in (torch.randn(2, 3, nb, generator=g), torch.randint(-3, 3, (2, 3, nb), generator=g).float(), special):
        assert_top_blocks_is_the_sort(score.to(triton_device), kt)


def assert_top_blocks_is_the_sort(score, kt):
    """The top-k kernel on ``score [R, NQ, NB]`` writes the sort's mask, and its blocks, every byte."""
    from pisa_kernels import triton_kernels as tk

    got_idx = torch.full((*score.shape[:2], kt), -1, dtype=torch.int32, device=score.device)
    got_mask = torch.full(score.shape, 7, dtype=torch.int8, device=score.device)
    want_idx, want_mask = torch.empty_like(got_idx), torch.empty_like(got_mask)
    tk.top_blocks(score, kt, got_idx, got_mask)
    routing.top_blocks(score, kt, want_idx, want_mask)
    assert torch.equal(got_mask.cpu(), want_mask.cpu())
    assert torch.equal(got_idx.sort(-1).values.cpu(), want_idx.sort(-1).values.cpu())


#: Score values the generated rows draw from: few distinct ones (ties), both zeros, the infinities,
#: NaN, the extremes of float32 and its subnormals (their int keys sit at the ends of each sign).
_SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan"), 3.4028235e38, -3.4028235e38,
            1e-45, -1e-45, 1.17549435e-38]


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(nb=st.integers(1, 300), data=st.data())
def test_top_blocks_kernel_is_the_sort_on_generated_rows(nb, data, triton_device):
    """The top-k kernel's search for the k-th largest key (every pass of it) against the sort, on
    generated rows: any k from 0 to the row's length, values drawn from random floats and from the
    special ones (ties, signed zeros, infinities, NaN, extremes)."""
    kt = data.draw(st.integers(0, nb), label="kt")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(2, 1, nb, generator=g) * 10.0 ** torch.randint(-30, 30, (1,), generator=g).item()
    special = torch.tensor(_SPECIAL)[torch.randint(0, len(_SPECIAL), (nb,), generator=g)]
    score[1, 0] = torch.where(torch.rand(nb, generator=g) < 0.7, special, score[1, 0])
    assert_top_blocks_is_the_sort(score.to(triton_device), kt)


@pytest.mark.parametrize("nb,kt", [(72, 10), (17, 16), (9, 9)])
def test_top_blocks_kernel_with_kinds_orders_as_the_sort(nb, kt, triton_device):
    """With block kinds (sinks, partial and empty blocks) the kernel selects what the sort selects
    and lists each row's full, partial and empty blocks in that order, with the same counts."""
    from pisa_kernels import triton_kernels as tk

    g = torch.Generator().manual_seed(nb + kt)
    r, nq = 2, 3
    score = torch.randn(r, nq, nb, generator=g).to(triton_device)
    kinds = torch.zeros(r, 1, nb, dtype=torch.int8)
    kinds[0, 0, 1::5] = routing.PARTIAL
    kinds[1, 0, 2::4] = routing.PARTIAL | routing.EMPTY
    kinds[:, 0, 0] |= routing.FORCED  # a full sink and (row 1) an empty one
    kinds[1, 0, 2] |= routing.FORCED
    kinds = kinds.to(triton_device)
    got = [torch.full((r, nq, kt), -1, dtype=torch.int32, device=triton_device),
           torch.full((r, nq, nb), 7, dtype=torch.int8, device=triton_device),
           torch.full((r, nq, 2), -1, dtype=torch.int32, device=triton_device)]
    want = [torch.empty_like(t) for t in got]
    tk.top_blocks(score.clone(), kt, got[0], got[1], kinds, got[2])
    routing.top_blocks(score.clone(), kt, want[0], want[1], kinds, want[2])
    assert torch.equal(got[1].cpu(), want[1].cpu()) and torch.equal(got[2].cpu(), want[2].cpu())
    assert bool(got[1][:, :, 0].all()) and bool(got[1][1, :, 2].all())  # the sinks
    for row in range(r):
        for t in range(nq):
            n_full, n_used = want[2][row, t].tolist()
            for lo, hi in ((0, n_full), (n_full, n_used), (n_used, kt)):  # the same blocks in each part
                assert sorted(got[0][row, t, lo:hi].tolist()) == sorted(want[0][row, t, lo:hi].tolist())


def test_top_blocks_longer_rows_than_the_kernel_takes_sort(monkeypatch, triton_device):
    from pisa_kernels import triton_kernels as tk

    monkeypatch.setattr(tk, "_top_blocks_kernel", None)  # must not be launched
    monkeypatch.setattr(tk, "TOP_BLOCKS_WIDTHS", (16, 64))
    score = torch.randn(1, 2, 100, device=triton_device)
    idx = torch.empty(1, 2, 7, dtype=torch.int32, device=triton_device)
    mask = torch.empty(1, 2, 100, dtype=torch.int8, device=triton_device)
    tk.top_blocks(score, 7, idx, mask)
    assert torch.equal(idx.sort(-1).values.long().cpu(), score.topk(7, dim=-1).indices.sort(-1).values.cpu())
    assert int(mask.sum()) == 14


@pytest.mark.parametrize("lognormal", [True, False])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])
def test_tail_bias_is_the_reference_tail_term_in_base_2(lognormal, chunk_bytes, triton_device):
    """The Hopper kernel's per-(tile, block) tail term (triton_kernels.tail_bias) against the
    reference's: ``log2 n_j + log2(e) c_ij`` (c from route(tail_bias=True): the log-normal mass
    correction, capped), -inf at the selected and at the empty blocks, at fp16's rounding; two
    batch elements with different lengths, a block whose cap binds, every chunking."""
    from pisa_kernels import triton_kernels as tk

    g = torch.Generator().manual_seed(3)
    bh, heads, nq, nb, d = 4, 2, 3, 1100, 16  # (two programs per row: 1,100 > TAIL_BIAS_BLOCK)
    blen = torch.randint(1, 65, (2, nb), generator=g).float()
    blen[0, 5:9] = 0.0
    blen[1, -1] = 1.0
    st = routing.PooledStats(qbar=torch.randn(bh, nq, d, generator=g), kbar=torch.randn(bh, nb, d, generator=g),
                             vsum=None, blen=blen, hsum=None, covnorm=None,
                             q2=torch.rand(bh, nq, d, generator=g) * 3 if lognormal else None,
                             kvar=torch.rand(bh, nb, d, generator=g) * 2 if lognormal else None)
    if lognormal:
        st.kvar[:, 11] = 4000.0  # its correction exceeds Samuelson's bound: capped
    sel = routing.route(st, scale=0.25, k=40, heads=heads, tail_bias=lognormal)
    log_n = torch.log2(blen).repeat_interleave(heads, 0).unsqueeze(1).expand(bh, nq, nb)
    want = log_n + (sel.tail_bias * tk.LOG2E if lognormal else torch.zeros_like(log_n))
    want = want.masked_fill(sel.mask.bool() | (log_n == -torch.inf), -torch.inf)
    dev = lambda t: t.to(triton_device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    st_d = routing.PooledStats(**{f: dev(getattr(st, f)) for f in ("qbar", "kbar", "vsum", "blen", "hsum", "covnorm",
                                                                   "q2", "kvar")})
    sel_d = routing.Selection(dev(sel.idx), dev(sel.mask), sel.count)
    got = tk.tail_bias(st_d, sel_d, 0.25, heads, chunk_bytes).cpu()
    assert got.dtype == torch.float16 and got.shape == (bh, nq, nb)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    free = ~torch.isneginf(want)
    assert bool(free.sum() > bh * nq * nb // 2)
    assert bool((want[free] > 100).any()) == lognormal  # the capped block's term (log2 n_j <= 6)
    torch.testing.assert_close(got[free].float(), want[free], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", [1, 0, "drop"])
def test_orders(dtype, order, triton_device):
    skip_bf16_interp(dtype, triton_device)
    q, k, v = rand_qkv(1, 2, 300, 64, dtype=dtype, seed=1, v_shift=0.5)
    compare(q, k, v, triton_device, sparsity=0.6, order=order)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.75, 0.65, 0.0])
def test_exact_block_counts(dtype, sparsity, triton_device):
    """16-bit inputs with 2, 3 and all 11 of 11 key blocks exact; the last block is partial."""
    skip_bf16_interp(dtype, triton_device)
    q, k, v = rand_qkv(1, 2, 690, 64, dtype=dtype, seed=7, v_shift=0.5)
    compare(q, k, v, triton_device, sparsity=sparsity, order=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,block", [(1, 64), (50, 128), (64, 64), (129, 64), (257, 128)])
def test_lengths_blocks(dtype, n, block, triton_device):
    """N = 1, N below one block, exact multiples and partial last blocks, both block sizes."""
    skip_bf16_interp(dtype, triton_device)
    q, k, v = rand_qkv(1, 2, n, 64, dtype=dtype, seed=n, v_shift=0.5)
    compare(q, k, v, triton_device, sparsity=0.5, order=1, block_size=block)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [32, 64, 80, 128])
def test_head_dims(dtype, d, triton_device):
    """64 and 128 are the targets; 32 and 80 exercise the padded head-dim tile (BLOCK_D > D)."""
    skip_bf16_interp(dtype, triton_device)
    q, k, v = rand_qkv(1, 1, 260, d, dtype=dtype, seed=d)
    compare(q, k, v, triton_device, sparsity=0.6, order=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["lengths", "bool", "empty_block", "empty_batch"])
def test_masks(dtype, mask_kind, triton_device):
    skip_bf16_interp(dtype, triton_device)
    b, n = 2, 260
    q, k, v = rand_qkv(b, 1, n, 64, dtype=dtype, seed=2, v_shift=0.5)
    if mask_kind == "lengths":
        kv_valid = torch.tensor([260, 133])
    elif mask_kind == "bool":
        kv_valid = torch.rand(b, n, generator=torch.Generator().manual_seed(3)) < 0.7
    elif mask_kind == "empty_block":  # whole key blocks without a valid key
        kv_valid = torch.ones(b, n, dtype=torch.bool)
        kv_valid[:, 64:192] = False
    else:  # one batch element has no valid key at all: zeros, not NaN
        kv_valid = torch.tensor([260, 0])
    out = compare(q, k, v, triton_device, sparsity=0.6, order=1, kv_valid=kv_valid)
    if mask_kind == "empty_batch":
        assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", [1, 0, "drop"])
def test_tiled_perm_and_mask(dtype, order, triton_device):
    skip_bf16_interp(dtype, triton_device)
    grid = (13, 21)
    n = grid[0] * grid[1]
    q, k, v = rand_qkv(1, 2, n, 64, dtype=dtype, seed=4)
    perm = tile_permutation(grid)
    compare(q, k, v, triton_device, sparsity=0.7, order=order, token_perm=perm, kv_valid=torch.tensor([n - 50]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", [1, 0])
@pytest.mark.parametrize("case", ["plain", "masks_block128", "perm_sinks_dense", "cov"])
def test_lognormal_tail(dtype, order, case, triton_device):
    """The kernel's log-normal tail (its correction computed per tile from the pooled q^2 and key
    variances) against the reference (the same correction from the routing)."""
    skip_bf16_interp(dtype, triton_device)
    n = 300
    q, k, v = rand_qkv(2, 1, n, 64, dtype=dtype, seed=11, v_shift=0.5)
    kw = dict(sparsity=0.7, order=order, tail="lognormal")
    if case == "masks_block128":
        kw.update(block_size=128, kv_valid=torch.tensor([n, 140]))
    elif case == "perm_sinks_dense":
        kw.update(token_perm=torch.randperm(n, generator=torch.Generator().manual_seed(12)),
                  kv_valid=torch.rand(2, n, generator=torch.Generator().manual_seed(13)) < 0.8,
                  sink_kv=[(0, 2)], dense_q=[(0, 20)])  # scattered sinks: two force at most two blocks
    elif case == "cov":
        kw.update(routing="cov")
    compare(q, k, v, triton_device, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_perm_sinks_dense_rows(dtype, triton_device):
    skip_bf16_interp(dtype, triton_device)
    n = 300
    q, k, v = rand_qkv(2, 1, n, 64, dtype=dtype, seed=5, v_shift=0.5)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(6))
    mask = torch.rand(2, n, generator=torch.Generator().manual_seed(7)) < 0.8
    compare(q, k, v, triton_device, sparsity=0.75, order=1, token_perm=perm, kv_valid=mask,
            sink_kv=[(0, 20), (290, 300)], dense_q=[(0, 20)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [64, 128])
def test_cov_routing(dtype, block, triton_device):
    skip_bf16_interp(dtype, triton_device)
    q, k, v = rand_qkv(1, 1, 330, 64, dtype=dtype, seed=8)
    k = k * torch.linspace(0.3, 2.0, 330, dtype=dtype)[None, None, :, None]
    compare(q, k, v, triton_device, sparsity=0.7, order=1, routing="cov", block_size=block,
            kv_valid=torch.tensor([300]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["BHND", "BNHD"])
def test_batch_layout_d128(dtype, layout, triton_device):
    skip_bf16_interp(dtype, triton_device)
    q, k, v = rand_qkv(2, 1, 200, 128, dtype=dtype, layout=layout, seed=9)
    compare(q, k, v, triton_device, sparsity=0.5, order=1, layout=layout, block_size=64,
            kv_valid=torch.tensor([200, 90]))


@pytest.mark.parametrize("kind", ["d2", "n2", "transposed", "offset"])
def test_strided_inputs(kind, triton_device):
    """Views with unusual strides (the kernels address through strides; a non-unit head-dim
    stride is copied first) equal the contiguous result."""
    q, k, v = rand_qkv(2, 1, 200, 64, dtype=torch.float32, seed=10)
    qs, ks, vs = (strided_variant(t, kind, seed=i) for i, t in enumerate((q, k, v)))
    compare(qs, ks, vs, triton_device, sparsity=0.6, order=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_structured_joint_replayed(dtype, triton_device):
    """DiT-like joint attention (text first, tiled grid, padded text keys, text sinks and dense
    text rows), on the reference's selection."""
    skip_bf16_interp(dtype, triton_device)
    grid, n_text = (12, 18), 40
    q, k, v = structured_qkv(2, 1, grid, 64, dtype=dtype, seed=11, n_extra=n_text)
    n = q.shape[2]
    perm = joint_permutation(n, grid, n_text)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 30:n_text] = False
    compare(q, k, v, triton_device, replay=True, sparsity=0.8, order=1, token_perm=perm, kv_valid=valid,
            sink_kv=[(0, n_text)], dense_q=[(0, n_text)])


NODE_CASES = ["partial_end", "forced_empty_block", "sinks_in_topk", "dense_start_end", "batch_lengths",
              "text_first_padded"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", NODE_CASES)
def test_masked_blocks_sinks_and_dense_rows(dtype, case, triton_device):
    """The paths of the node's calls: the exact blocks of a tile split into unmasked ones and the
    few with invalid keys (partial blocks, here at the end of a batch element; empty blocks,
    skipped, also as sinks), sinks that the top-k would have chosen anyway, dense query rows at the
    start and at the end (more than one tile of them, in their own programs), batch elements of
    different lengths, and joint attention with the text first and its end padded."""
    skip_bf16_interp(dtype, triton_device)
    n, b = 300, 2
    q, k, v = rand_qkv(b, 2, n, 64, dtype=dtype, seed=NODE_CASES.index(case) + 40, v_shift=0.5)
    kw = dict(sparsity=0.7, order=1, tail="lognormal")
    if case == "partial_end":
        kw.update(kv_valid=torch.tensor([n, n - 37]))
    elif case == "forced_empty_block":  # a sink whose keys are all padding (HunyuanVideo's padded text)
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[:, 64:128] = False
        valid[1, 200:230] = False
        kw.update(kv_valid=valid, sink_kv=[(0, 128)], dense_q=[(0, 128)])
    elif case == "sinks_in_topk":  # sink keys large: the top-k would pick their blocks too
        k = k.clone()
        k[:, :, 128:192] *= 4
        kw.update(sink_kv=[(128, 192)], token_perm=torch.randperm(n, generator=torch.Generator().manual_seed(1)))
    elif case == "dense_start_end":
        kw.update(dense_q=[(0, 10), (150, n)], sink_kv=[(0, 10)],
                  token_perm=torch.randperm(n, generator=torch.Generator().manual_seed(2)),
                  kv_valid=torch.tensor([n, 270]))
    elif case == "batch_lengths":
        q, k, v = (torch.cat([t, t[:1].flip(2)]) for t in (q, k, v))  # B = 3
        kw.update(kv_valid=torch.tensor([n, 137, 64]), sink_kv=[(280, n)], dense_q=[(280, n)])
    else:  # [text | grid], text padded at its end, joint token order (the node's HunyuanVideo call)
        q, k, v, joint = joint_text_case(b, dtype, seed=47)
        kw.update(joint)
    compare(q, k, v, triton_device, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_high_sparsity_single_block(dtype, triton_device):
    """k = 1 (sparsity 0.99): the tail carries almost all the mass."""
    q, k, v = rand_qkv(1, 1, 500, 64, dtype=dtype, seed=12, v_shift=1.0)
    compare(q, k, v, triton_device, sparsity=0.99, order=1)


# --- the pre-scan on its own ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,block", [(1, 64), (130, 64), (300, 128), (700, 64)])
@pytest.mark.parametrize("perm_on,valid_on,cov", [(False, False, False), (True, True, True)])
def test_pool_stats_match_reference(dtype, n, block, perm_on, valid_on, cov, triton_device):
    """The fused pre-scan (block means, value sums, valid counts, mean first-order moment, per-block
    ``||H_j||_F``, query-tile means) equals the reference pooling in the processing order."""
    from pisa_kernels import triton_kernels as tk

    b, h, d = 2, 2, 64
    q, k, v = (t.to(triton_device) for t in rand_qkv(b, h, n, d, dtype=dtype, seed=n + block))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(triton_device) if perm_on else None
    valid = (torch.rand(b, n, generator=torch.Generator().manual_seed(2)) < 0.7).to(triton_device) \
        if valid_on else None
    # The reference pools the gathered tokens; the Triton pre-scan reads them through the order and
    # writes k and v in the processing order (zeros at invalid keys) for the forward kernel.
    qp, kp, vp = (t if perm is None else t.index_select(2, perm) for t in (q, k, v))
    validp = None if valid is None else (valid if perm is None else valid.index_select(1, perm))
    copies = (torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))) if perm is not None else None
    st_t = tk.pool(q, k, v, valid=None if validp is None else validp.to(torch.int8).contiguous(),
                   block=block, first_order=True, cov=cov, lognormal=True, perm=perm, kv_out=copies)
    st_r = ref_mod.pool(qp, kp, vp, validp, block, first_order=True, cov=cov, lognormal=True)
    if copies is not None:
        keep = (torch.ones(b, n, dtype=torch.bool, device=triton_device) if validp is None else validp)[:, None, :, None]
        for got, want in zip(copies, (kp, vp)):
            assert torch.equal(got.cpu(), torch.where(keep, want, 0.0).cpu())
    tol = 1e-5 if triton_device.type == "cpu" else 2e-3
    loose = {}
    if st_t.vsum is None:  # 16-bit inputs: the Triton pre-scan writes the value means only, and the
        # key variances in the input dtype (for the forward kernel): fp16 rounding, times up to 64
        st_t.vsum = st_t.vmean_lp.float() * st_t.blen.repeat_interleave(h, dim=0).unsqueeze(-1)
        st_t.kvar = st_t.kvar.float()
        loose = {"vsum": 2e-2, "kvar": 2e-2}
    for name in ("qbar", "kbar", "vsum", "blen", "hmean", "q2", "kvar") + (("covnorm",) if cov else ()):
        a, r = getattr(st_t, name, None), getattr(st_r, name, None)
        if a is None and r is None:
            continue  # a statistic neither pre-scan materialises (internal layout changes)
        assert a is not None and r is not None, name
        assert a.shape == r.shape, (name, a.shape, r.shape)
        assert max_err(a, r) <= max(tol, loose.get(name, 0.0)), f"{name}: {max_err(a, r):.2e}"
