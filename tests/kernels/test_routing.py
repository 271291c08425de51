"""Routing (pisa_kernels.routing): the top-k budget, forced sink blocks, empty blocks, covariance
bias, and the block bookkeeping both backends share (pisa-method.md §4)."""

import dataclasses
import math

import pytest
import torch

from pisa_kernels.routing import (EMPTY, FORCED, PARTIAL, QUERY_TILE, ROUTING_CHUNK_BYTES, PooledStats,
                                  block_kinds, cap_mass_bias, exact_order, forced_blocks_from_tokens, num_blocks,
                                  route, routing_chunk_bytes, top_blocks, topk_count)


def test_constants_and_block_counts():
    assert QUERY_TILE == 128
    assert [num_blocks(n, 64) for n in (1, 63, 64, 65, 75600)] == [1, 1, 1, 2, 1182]


@pytest.mark.parametrize("sparsity,nb,k", [
    (0.875, 1182, 147),  # Wan 720p (pisa-method.md §4)
    (0.875, 512, 64),    # Wan 480p
    (0.875, 1184, 148),  # 0.125 * 1184 = 148 exactly: must not round down to 147
    (0.875, 8, 1),
    (0.875, 7, 1),       # floor(0.875) = 0 -> at least one block
    (0.0, 10, 10),
    (0.999, 5, 1),
    (0.5, 3, 1),
    (0.85, 72, 10),      # FLUX 1024² with 512 text tokens
    (0.7, 10, 3),
])
def test_topk_count(sparsity, nb, k):
    assert topk_count(sparsity, nb) == k


def test_topk_count_is_monotone_and_bounded():
    for nb in (1, 2, 7, 64, 1182):
        prev = nb
        for i in range(0, 1000, 7):
            s = i / 1000
            k = topk_count(s, nb)
            assert 1 <= k <= nb and k <= prev
            prev = k


@pytest.mark.parametrize("kt,expected,expected_flipped", [
    (1, {6}, {2}),                                    # NaN ranks above everything (as in torch.sort)
    (3, {6, 1, 2}, {2, 4, 6}),                        # three scores of 3.0: the two lowest indices
    (6, {6, 1, 2, 4, 3, 0}, {2, 4, 6, 7, 5, 8}),
    (8, {6, 1, 2, 4, 3, 0, 7, 8}, {2, 4, 6, 7, 5, 8, 0, 1}),  # -0.0 and 0.0 tie
    (9, set(range(9)), set(range(9))),                # -inf last
])
def test_top_blocks_breaks_ties_by_index(kt, expected, expected_flipped):
    nan, inf = float("nan"), float("inf")
    score = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0, -inf, nan, -0.0, 0.0]]])
    score = torch.cat([score, score.flip(-1)])  # the same scores in the other index order
    idx = torch.full((2, 1, kt), -1, dtype=torch.int32)
    mask = torch.full((2, 1, 9), 7, dtype=torch.int8)
    top_blocks(score, kt, idx, mask)
    for r, want in enumerate((expected, expected_flipped)):
        assert set(idx[r, 0].tolist()) == want
        assert mask[r, 0].tolist() == [int(j in want) for j in range(9)]


def make_stats(bh=2, nq=3, nb=8, d=16, b=1, seed=0, blen=None, covnorm=None):
    """A PooledStats with the routing inputs; other fields (internal, they change with the kernels)
    get their defaults or None."""
    g = torch.Generator().manual_seed(seed)
    known = dict(qbar=torch.randn(bh, nq, d, generator=g), kbar=torch.randn(bh, nb, d, generator=g),
                 vsum=torch.randn(bh, nb, d, generator=g),
                 blen=torch.full((b, nb), 64.0) if blen is None else blen, covnorm=covnorm)
    kw = {}
    for f in dataclasses.fields(PooledStats):
        if f.name in known:
            kw[f.name] = known[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw[f.name] = None
    return PooledStats(**kw)


def brute_topk(stats, scale, k, cov=False):
    score = scale * stats.qbar @ stats.kbar.transpose(1, 2)
    if cov:
        score = score + torch.log(stats.covnorm + 1e-5)[:, None, :]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(k, dim=-1).indices, True)


def check_selection(sel, k_total, nb):
    assert sel.count == k_total and sel.idx.shape[-1] == k_total and sel.mask.shape[-1] == nb
    assert sel.idx.dtype == torch.int32 and sel.mask.dtype == torch.int8
    assert bool((sel.mask.sum(-1) == k_total).all())
    # idx lists exactly the selected blocks
    from_idx = torch.zeros_like(sel.mask, dtype=torch.bool).scatter_(-1, sel.idx.long(), True)
    assert torch.equal(from_idx, sel.mask.bool())


def test_topk_selection():
    st = make_stats()
    sel = route(st, scale=0.25, k=3, heads=2)
    check_selection(sel, 3, 8)
    assert torch.equal(sel.mask.bool(), brute_topk(st, 0.25, 3))
    assert not sel.all_blocks


def test_all_blocks():
    sel = route(make_stats(), scale=0.25, k=8, heads=2)
    check_selection(sel, 8, 8)
    assert sel.all_blocks


def test_forced_blocks_on_top_of_budget():
    st = make_stats()
    forced = torch.zeros(8, dtype=torch.bool)
    forced[[0, 7]] = True
    sel = route(st, scale=0.25, k=2, heads=2, kinds=block_kinds(st.blen, 8 * 64, 64, forced), n_forced=2)
    check_selection(sel, 4, 8)
    assert bool(sel.mask[:, :, 0].all()) and bool(sel.mask[:, :, 7].all())
    # The remaining two are the top-2 among the others.
    score = 0.25 * st.qbar @ st.kbar.transpose(1, 2)
    score[:, :, forced] = -math.inf
    rest = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(2, dim=-1).indices, True)
    assert torch.equal(sel.mask.bool() & ~forced, rest)


def test_empty_blocks_never_preferred():
    """Blocks without a valid key (per batch element) lose to any block with one, even with a huge
    score (their centroid is 0 or garbage)."""
    blen = torch.full((2, 8), 64.0)
    blen[0, [1, 2]] = 0
    blen[1, 5] = 0
    st = make_stats(bh=4, b=2, blen=blen)
    st.kbar[:2, [1, 2]] = 100.0 * st.qbar[:2].mean(1, keepdim=True)  # would win on score
    st.kbar[2:, 5] = 100.0 * st.qbar[2:].mean(1, keepdim=True).squeeze(1)
    sel = route(st, scale=0.25, k=4, heads=2, kinds=block_kinds(blen, 8 * 64, 64))
    check_selection(sel, 4, 8)
    assert not bool(sel.mask[:2, :, [1, 2]].any())
    assert not bool(sel.mask[2:, :, 5].any())


def test_block_kinds():
    """A short last block is full; fewer valid keys than keys make a block PARTIAL, none EMPTY too;
    sinks are FORCED whatever else they are."""
    n, block = 300, 64  # five blocks, the last of 44 keys
    blen = torch.tensor([[64.0, 63.0, 0.0, 64.0, 44.0],
                         [64.0, 64.0, 64.0, 1.0, 43.0]])
    forced = torch.tensor([False, False, True, False, True])
    kinds = block_kinds(blen, n, block, forced)
    assert kinds.dtype == torch.int8
    assert kinds.tolist() == [[0, PARTIAL, PARTIAL | EMPTY | FORCED, 0, FORCED],
                              [0, 0, FORCED, PARTIAL, PARTIAL | FORCED]]
    assert block_kinds(blen[:, :4], 256, 64).tolist() == [[0, PARTIAL, PARTIAL | EMPTY, 0], [0, 0, 0, PARTIAL]]


def exact_lists_are_ordered(sel, kinds, heads):
    """Each tile's list: its full blocks, then its PARTIAL ones, then its EMPTY ones, as counted."""
    for row in range(sel.idx.shape[0]):
        kind = kinds[row // heads]
        for t in range(sel.idx.shape[1]):
            idx = sel.idx[row, t].long()
            group = ((kind[idx] & PARTIAL) + ((kind[idx] & EMPTY) >> 1)).tolist()
            assert group == sorted(group), (row, t, group)
            n_full, n_used = sel.counts[row, t].tolist()
            assert n_full == group.count(0) and n_used == n_full + group.count(1)


@pytest.mark.parametrize("k", [3, 8])
def test_exact_lists_full_partial_empty(k):
    """With kinds, the selection is the same as the scores and kinds select, and every tile lists
    its blocks full first (the kernel's unmasked loop), then partial (its masked loop), then empty
    (skipped); also when every block is exact (k = NB)."""
    blen = torch.full((2, 8), 64.0)
    blen[0, [1, 6]] = 10.0  # partial
    blen[0, 3] = 0.0  # empty
    blen[1, [0, 7]] = 0.0
    blen[1, 2] = 5.0
    forced = torch.zeros(8, dtype=torch.bool)
    forced[[3, 4]] = True  # an empty sink and a full sink
    st = make_stats(bh=4, b=2, blen=blen)
    kinds = block_kinds(blen, 8 * 64, 64, forced)
    sel = route(st, scale=0.25, k=k, heads=2, kinds=kinds, n_forced=2)
    check_selection(sel, min(8, k + 2), 8)
    exact_lists_are_ordered(sel, kinds, heads=2)
    assert bool(sel.mask[:, :, [3, 4]].all())  # sinks on top of the budget, empty or not
    if k < 8:
        assert not bool(sel.mask[2:, :, [0, 7]].any())  # empty blocks lose to every other one
        plain = route(st, scale=0.25, k=k, heads=2)  # the same scores without kinds
        score = 0.25 * st.qbar @ st.kbar.transpose(1, 2)
        score[:, :, 3] = score[:, :, 4] = math.inf
        score[2:, :, 0] = score[2:, :, 7] = -math.inf
        want = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(k + 2, dim=-1).indices, True)
        assert torch.equal(sel.mask.bool(), want)
        assert plain.counts is None


def test_exact_order_lists_every_block():
    kinds = torch.tensor([[0, PARTIAL, PARTIAL | EMPTY, FORCED, PARTIAL | FORCED, 0]], dtype=torch.int8)
    idx, counts = exact_order(kinds)
    assert idx.dtype == torch.int32 and counts.dtype == torch.int32
    assert idx.tolist() == [[0, 3, 5, 1, 4, 2]] and counts.tolist() == [[3, 5]]


def test_covariance_bias():
    """With ``cov``, a block with a much larger first-order residual norm is preferred."""
    st = make_stats(covnorm=torch.ones(2, 8))
    plain = route(st, scale=0.25, k=2, heads=2, cov=True)
    assert torch.equal(plain.mask.bool(), brute_topk(st, 0.25, 2))  # uniform bias: same choice
    st.covnorm[:, 4] = 1e6
    biased = route(st, scale=0.25, k=2, heads=2, cov=True)
    assert bool(biased.mask[:, :, 4].all())
    assert torch.equal(biased.mask.bool(), brute_topk(st, 0.25, 2, cov=True))


def test_forced_blocks_from_tokens():
    sink = torch.zeros(300, dtype=torch.bool)
    assert forced_blocks_from_tokens(sink, 64) is None
    assert forced_blocks_from_tokens(None, 64) is None
    sink[[0, 130, 299]] = True
    fb = forced_blocks_from_tokens(sink, 64)
    assert fb.tolist() == [True, False, True, False, True]
    assert forced_blocks_from_tokens(sink, 128).tolist() == [True, True, True]


def lognormal_stats(bh=4, nq=3, nb=8, d=16, seed=1):
    g = torch.Generator().manual_seed(seed + 100)
    st = make_stats(bh=bh, nq=nq, nb=nb, d=d, seed=seed, b=bh // 2)
    st.q2 = torch.rand(bh, nq, d, generator=g) * 3
    st.kvar = torch.rand(bh, nb, d, generator=g) * 2
    return st


@pytest.mark.parametrize("chunk_bytes", [1, 2 << 20])
def test_lognormal_bias_marks_the_selection(chunk_bytes):
    """The reference's bias holds ``s^2/2 q2 . kvar`` at every unselected block and -inf at the
    selected ones, the same selection as without it (the bias does not route), whatever the chunking."""
    st = lognormal_stats()
    scale = 0.25
    sel = route(st, scale=scale, k=3, heads=2, chunk_bytes=chunk_bytes, tail_bias=True)
    check_selection(sel, 3, 8)
    assert torch.equal(sel.mask.bool(), brute_topk(st, scale, 3))
    c = 0.5 * scale ** 2 * torch.einsum("btd,bjd->btj", st.q2, st.kvar)
    chosen = sel.mask.bool()
    assert bool(torch.isneginf(sel.tail_bias[chosen]).all())
    torch.testing.assert_close(sel.tail_bias[~chosen], c[~chosen])
    assert route(st, scale=scale, k=3, heads=2, chunk_bytes=chunk_bytes).tail_bias is None  # Triton: no bias


def test_all_blocks_has_no_bias():
    sel = route(lognormal_stats(), scale=0.25, k=8, heads=2, tail_bias=True)
    assert sel.all_blocks and sel.tail_bias is None and bool(sel.mask.all())


def test_routing_chunk_bytes_bounds():
    assert routing_chunk_bytes(0) == 2 << 20
    assert routing_chunk_bytes(1 << 30) == (1 << 30) // 128
    assert routing_chunk_bytes(1 << 40) == ROUTING_CHUNK_BYTES


def test_mass_bias_cap():
    """Samuelson's bound: the log-normal estimate c = sigma^2/2 of log mean exp(x - xbar) never
    exceeds what the largest of n values allows, sqrt(2 c (n - 1)); below c = 2 (n - 1) nothing
    changes, a one-key block gets no correction."""
    c = torch.tensor([[0.0, 1.0, 126.0, 200.0, 5.0]])
    n = torch.tensor([[64.0, 64.0, 64.0, 64.0, 1.0]])
    expect = torch.tensor([[0.0, 1.0, 126.0, (2 * 200.0 * 63) ** 0.5, 0.0]])
    torch.testing.assert_close(cap_mass_bias(c.clone(), n), expect)
    # the bound holds for real samples: log mean exp of n values around their mean
    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 5.0, 50.0):
        x = torch.randn(1000, 64, generator=g, dtype=torch.float64) * scale
        x = x - x.mean(dim=1, keepdim=True)
        truth = torch.logsumexp(x, dim=1) - math.log(64)
        sigma2 = x.var(dim=1, unbiased=False)
        bound = cap_mass_bias(sigma2 / 2, torch.full_like(sigma2, 64.0))
        assert bool((truth <= torch.sqrt(2 * sigma2 / 2 * 63) + 1e-9).all())
        assert bool((bound <= sigma2 / 2 + 1e-12).all())
