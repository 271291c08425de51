"""Adaptive routing (``routing="adaptive"``, routing.adaptive_route): the call's exact-block budget
shared between query tiles by estimated mass (issue 17).

* The selection against a plain-Python oracle of the same rule (shares, floor, cap, one threshold
  over the scope, ties to the lower rank and then the lower tile), on random and on heavily tied
  scores; the budget's mean exact, floor and cap honoured, forced (sink) blocks in every tile on top,
  blocks without a valid key never preferred, each tile's list ordered full / PARTIAL / EMPTY.
* The API: stats (mean density = the top-k routing's, per-tile counts), the reference consuming
  the selection, the heaviest-first tile order.
* The Triton kernel (interpreter on CPU, fp32 / fp16) against the reference on the same adaptive
  selection: plain and log-normal tails, every order, key padding, sinks, dense rows, token order.
* The Triton selection (triton_kernels.adaptive_blocks) against the sorted one (routing.SortedAdaptive)
  bit for bit: idx, mask, counts, tile counts (and so the reference's tail bias), on random, tied,
  flat, non-finite and kind-carrying shares, both scopes, several chunks and row widths; and through
  the public API.  (At the Wan 720p size on a GPU: test_gpu.py.)
"""

import math

import pytest
import torch

from pisa_kernels import pisa_attention
from pisa_kernels import routing as R
from pisa_kernels.limits import ROUTINGS
from pisa_kernels.routing import EMPTY, FORCED, PARTIAL, PooledStats, block_kinds, route, topk_count
from pisa_test_utils import (adaptive_forward, assert_same_selection, capture_routing, joint_text_case, max_err, rand_qkv,
                             selection_of)


def make_stats(bh=4, nq=5, nb=16, d=8, b=1, seed=0, blen=None, tied=False, second=False):
    g = torch.Generator().manual_seed(seed)
    if tied:  # integer pooled scores: many exact ties
        qbar = torch.randint(-1, 2, (bh, nq, d), generator=g).float()
        kbar = torch.randint(-1, 2, (bh, nb, d), generator=g).float()
    else:
        qbar, kbar = torch.randn(bh, nq, d, generator=g), torch.randn(bh, nb, d, generator=g)
    blen = torch.full((b, nb), 64.0) if blen is None else blen
    q2 = torch.rand(bh, nq, d, generator=g) if second else None
    kvar = torch.rand(bh, nb, d, generator=g) if second else None
    return PooledStats(qbar=qbar, kbar=kbar, vsum=None, blen=blen, hsum=None, covnorm=None, q2=q2, kvar=kvar)


def oracle(stats, scale, k, heads, kinds=None, n_forced=0, scope="call"):
    """The rule in plain Python, float64: ``{(row, tile): set of blocks}``."""
    bh, nq, _ = stats.qbar.shape
    nb = stats.kbar.shape[1]
    floor, cap = R.adaptive_limits(k, nb, n_forced)
    score = scale * stats.qbar.double() @ stats.kbar.double().transpose(1, 2)
    ranked, chosen = {}, {}
    for row in range(bh):
        b = row // heads
        for t in range(nq):
            logm = []
            for j in range(nb):
                n = float(stats.blen[b, j])
                c = 0.0
                if stats.q2 is not None:
                    c = 0.5 * scale * scale * float(stats.q2[row, t].double() @ stats.kvar[row, j].double())
                    c = min(c, math.sqrt(2.0 * c * max(n - 1.0, 0.0)))
                logm.append(float(score[row, t, j]) + c + math.log(n) if n > 0 else -math.inf)
            top = max(logm)
            lse = top + math.log(sum(math.exp(x - top) for x in logm)) if top > -math.inf else 0.0
            share = [x - lse for x in logm]
            kind = [int(kinds[b, j]) if kinds is not None else 0 for j in range(nb)]
            forced = [j for j in range(nb) if kind[j] & FORCED]
            rest = sorted((j for j in range(nb) if not kind[j] & FORCED),
                          key=lambda j: (-(share[j] if not kind[j] & EMPTY else -math.inf), j))
            ranked[row, t] = [(share[j] if not kind[j] & EMPTY else -math.inf, j) for j in rest]
            chosen[row, t] = set(forced) | set(rest[:floor])
    scopes = [list(range(bh))] if scope == "call" else [[r] for r in range(bh)]
    for rows in scopes:
        cand = []
        for row in rows:
            for t in range(nq):
                for rank in range(floor, cap):
                    cand.append((-ranked[row, t][rank][0], rank, row, t))
        cand.sort(key=lambda c: (c[0], c[1], c[2], c[3]))
        for _, rank, row, t in cand[:(k - floor) * len(rows) * nq]:
            chosen[row, t].add(ranked[row, t][rank][1])
    return chosen


def check_against_oracle(sel, want, stats, k, n_forced, nb):
    bh, nq = sel.tile_count.shape
    floor, cap = R.adaptive_limits(k, nb, n_forced)
    assert sel.idx.dtype == torch.int32 and sel.mask.dtype == torch.int8 and sel.tile_count.dtype == torch.int32
    assert sel.count == cap + n_forced == sel.idx.shape[-1] and not sel.all_blocks
    for row in range(bh):
        for t in range(nq):
            got = set(torch.nonzero(sel.mask[row, t]).flatten().tolist())
            assert got == want[row, t], (row, t, sorted(got), sorted(want[row, t]))
            c = int(sel.tile_count[row, t])
            assert set(sel.idx[row, t, :c].tolist()) == got and len(got) == c
            assert floor <= c - n_forced <= cap


@pytest.mark.parametrize("scope", ["call", "head"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("second", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_selection_is_the_oracles(scope, tied, second, k):
    st = make_stats(seed=k, tied=tied, second=second)
    sel = R.adaptive_route(st, scale=0.5, k=k, heads=4, scope=scope)
    check_against_oracle(sel, oracle(st, 0.5, k, 4, scope=scope), st, k, 0, 16)
    spent = sel.tile_count.sum(-1) if scope == "head" else sel.tile_count.sum()
    assert bool((spent == k * (5 if scope == "head" else 20)).all())  # the budget, exactly
    assert torch.equal(sel.counts[..., 0], sel.tile_count) and torch.equal(sel.counts[..., 1], sel.tile_count)


def test_budget_moves_to_the_tiles_that_need_it():
    """One tile whose mass sits on one block, one that is flat: the flat one gets the budget."""
    nb, d = 16, 16
    kbar = torch.eye(nb, d).unsqueeze(0)
    qbar = torch.zeros(1, 2, d)
    qbar[0, 0, 3] = 40.0  # tile 0: block 3 holds all its mass
    st = PooledStats(qbar=qbar, kbar=kbar, vsum=None, blen=torch.full((1, nb), 64.0), hsum=None, covnorm=None)
    sel = R.adaptive_route(st, scale=1.0, k=4, heads=1)
    floor, _ = R.adaptive_limits(4, nb)
    assert sel.tile_count.tolist() == [[floor, 8 - floor]] and bool(sel.mask[0, 0, 3])


def test_equal_shares_share_the_budget_evenly():
    """All scores equal: ties go to the lower rank first, so every tile gets k (as the top-k routing)."""
    st = make_stats()
    st.qbar.zero_()
    sel = R.adaptive_route(st, scale=1.0, k=3, heads=4)
    assert bool((sel.tile_count == 3).all())
    assert bool((sel.mask[..., :3] == 1).all()) and int(sel.mask.sum()) == 3 * 20  # ties to the lower index


def test_limits():
    assert R.adaptive_limits(8, 100) == (2, 32)
    assert R.adaptive_limits(1, 100) == (1, 4)
    assert R.adaptive_limits(5, 12, n_forced=2) == (1, 10)  # the cap leaves the forced blocks out
    assert R.adaptive_limits(147, 1182) == (36, 588)  # Wan 720p at 0.875


def test_forced_empty_and_partial_blocks():
    """Sinks in every tile on top of the budget, blocks without a valid key last (here: never,
    since every tile has enough valid ones), each list ordered full / PARTIAL / EMPTY as counted."""
    nb, heads = 16, 2
    blen = torch.full((2, nb), 64.0)
    blen[0, [2, 9]] = 0.0  # empty in batch element 0
    blen[1, [4, 5]] = 17.0  # partial in batch element 1
    forced = torch.zeros(nb, dtype=torch.bool)
    forced[[0, 9]] = True  # block 9 is a sink without a valid key in batch element 0
    st = make_stats(bh=4, nb=nb, b=2, blen=blen, seed=3)
    st.kbar[0, 2] = 50.0  # an empty block with a huge centroid must still not be preferred
    kinds = block_kinds(blen, nb * 64, 64, forced)
    sel = R.adaptive_route(st, scale=0.5, k=3, heads=heads, kinds=kinds, n_forced=2)
    check_against_oracle(sel, oracle(st, 0.5, 3, heads, kinds, 2), st, 3, 2, nb)
    assert bool(sel.mask[..., 0].all()) and bool(sel.mask[..., 9].all())
    assert not bool(sel.mask[:2, :, 2].any())
    assert int((sel.tile_count - 2).sum()) == 3 * 4 * 5
    for row in range(4):
        kind = kinds[row // heads]
        for t in range(5):
            c = int(sel.tile_count[row, t])
            idx = sel.idx[row, t, :c].long()
            group = ((kind[idx] & PARTIAL) + ((kind[idx] & EMPTY) >> 1)).tolist()
            assert group == sorted(group)
            assert sel.counts[row, t].tolist() == [group.count(0), group.count(0) + group.count(1)]


def test_route_with_the_whole_budget_is_all_blocks():
    st = make_stats()
    sel = route(st, scale=0.5, k=16, heads=4, adaptive=True)
    assert sel.all_blocks and sel.tile_count is None


def test_lognormal_mass_bias_in_the_reference_selection():
    """With tail_bias the reference's selection carries c_ij at every unselected block, -inf at the selected."""
    st = make_stats(second=True)
    sel = route(st, scale=0.5, k=3, heads=4, adaptive=True, tail_bias=True)
    c = R.cap_mass_bias(R.mass_bias(st.q2, st.kvar, 0.5), st.blen.unsqueeze(1))
    assert torch.equal(sel.tail_bias, c.masked_fill(sel.mask.bool(), -torch.inf))


def sorted_counts(share, budget, floor, scope):
    """adaptive_counts by a stable sort (the first implementation): the second oracle."""
    r, nq, width = share.shape
    groups = 1 if scope == "call" else r
    tiles = r * nq // groups
    flat = share.reshape(groups, tiles, width).transpose(1, 2).reshape(groups, -1)
    top = torch.sort(flat, dim=-1, descending=True, stable=True).indices[:, :budget - floor * tiles]
    per = torch.zeros(groups, tiles, dtype=torch.int32).scatter_add_(1, top % tiles, torch.ones_like(top, dtype=torch.int32))
    return floor + per.view(r, nq)


@pytest.mark.parametrize("seed", range(12))
def test_threshold_search_equals_the_sort(seed):
    """The sort-free threshold (bitwise search, ties rank-major) against a stable sort: random,
    heavily tied, with -inf / +-0.0 / NaN, every budget from the floor to the cap, both scopes."""
    g = torch.Generator().manual_seed(seed)
    r, nq, width = 3, 4, 6
    if seed % 3 == 0:
        share = torch.randn(r, nq, width, generator=g)
    elif seed % 3 == 1:
        share = torch.randint(-2, 1, (r, nq, width), generator=g).float()
    else:
        share = torch.randint(-3, 1, (r, nq, width), generator=g).float()
        share[0, 0, 2:] = -torch.inf
        share[1, 2, :3] = -0.0
        share[2, 1, 0] = float("nan")
    share = torch.sort(share, dim=-1, descending=True).values  # per tile, as adaptive_route hands them over
    floor = 1
    for scope in ("call", "head"):
        tiles = r * nq if scope == "call" else nq
        for budget in range(floor * tiles, (floor + width) * tiles + 1):
            got = R.adaptive_counts(share.clone(), budget, floor, scope)
            assert torch.equal(got, sorted_counts(share, budget, floor, scope)), (scope, budget)


def test_widget_budget_follows_the_density():
    """The widget's budget (``k_mean``): (1 - sparsity) x NB blocks per tile on average, rounded once
    over the scope (not down per tile, as the top-k count), the rest of a rank in tile order."""
    assert R.adaptive_budget(5, 5.375, 100, 43) == 538 and R.adaptive_budget(5, None, 100, 43) == 500
    assert R.adaptive_budget(1, 0.3, 10, 43) == 10  # the floor: at least one block a tile
    st = make_stats()
    st.qbar.zero_()  # every share equal: ranks fill in tile order
    sel = R.adaptive_route(st, scale=1.0, k=2, heads=4, k_mean=2.5)
    assert int(sel.tile_count.sum()) == 50
    assert sel.tile_count.flatten().tolist() == [3] * 10 + [2] * 10


def test_api_stats_density_and_tile_order():
    q, k, v = rand_qkv(2, 3, 700, 32, dtype=torch.float32, seed=5)
    assert "adaptive" in ROUTINGS
    with pytest.raises(ValueError, match="routing"):
        pisa_attention(q, k, v, routing="threshold")
    _, st_t = pisa_attention(q, k, v, sparsity=0.75, backend="reference", return_stats=True)
    with capture_routing() as log:
        _, st_a = pisa_attention(q, k, v, sparsity=0.75, routing="adaptive", backend="reference",
                                     tail="lognormal", return_stats=True)
    sel = selection_of(log)
    nb, nq = 11, 6
    kt = topk_count(0.75, nb)
    assert st_t.exact_blocks == kt and st_t.exact_mean == kt and st_t.tile_counts is None
    # the widget's density: 0.25 x 11 = 2.75 blocks a tile on average (the top-k count: 2)
    assert st_a.tile_counts.shape == (6, nq) and int(st_a.tile_counts.sum()) == round(2.75 * 6 * nq)
    assert abs(st_a.exact_mean - 2.75) < 1e-12 and abs(st_a.density - 0.25) < 1e-12
    mean, std, lo, hi = st_a.density_spread()
    assert abs(mean - st_a.density) < 1e-12 and std > 0 and lo < mean < hi
    assert torch.equal(st_a.tile_counts, sel.tile_count)
    from pisa_kernels import triton_kernels as tk

    order = tk.tile_order(sel)
    assert sorted(order.tolist()) == list(range(6 * nq))
    cost = sel.counts[..., 1].flatten()[order.long()]
    assert bool((cost[:-1] >= cost[1:]).all())


def test_head_groups_keep_the_mean(monkeypatch):
    """Long permuted calls route a group of heads at a time: each group keeps the mean exactly, and
    the stats put the groups' counts back together in (batch, head) order."""
    from pisa_kernels import api

    monkeypatch.setattr(api, "PERM_GROUP_MIN_BYTES", 0)
    q, k, v = rand_qkv(2, 8, 400, 16, dtype=torch.float32, seed=6)
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    with capture_routing() as log:
        _, st = pisa_attention(q, k, v, sparsity=0.7, routing="adaptive", token_perm=perm, backend="reference",
                               return_stats=True)
    assert len(log) == api.PERM_HEAD_GROUPS
    for _, sel, _ in log:  # 0.3 x 7 = 2.1 blocks a tile, rounded once per group of 2 x 2 heads x 4 tiles
        assert int(sel.tile_count.sum()) == round(2.1 * sel.tile_count.numel())
    parts = [sel.tile_count.view(2, 2, -1) for _, sel, _ in log]
    assert torch.equal(st.tile_counts, torch.cat(parts, dim=1).view(16, -1))
    assert abs(st.exact_mean - float(st.tile_counts.double().mean())) < 1e-12


# ---- the Triton kernel (interpreter on CPU) against the reference -------------------------------------


def tri_tol(dtype, device):
    if dtype == torch.float32:
        return 2e-5 if device.type == "cpu" else 3e-3
    return 5e-3


def compare(q, k, v, device, **kw):
    """Reference vs Triton with adaptive routing, on the reference's selection (replayed: the
    budget's one threshold over the call may break a near-tie differently on the two backends'
    pooled statistics); the backends' own selections must agree on almost every tile."""
    q, k, v = (t.to(device) for t in (q, k, v))
    kw = {a: (b.to(device) if isinstance(b, torch.Tensor) else b) for a, b in kw.items()}
    kw.update(routing="adaptive", cuda_graph=False)
    with capture_routing() as log_r:
        ref = pisa_attention(q, k, v, backend="reference", **kw)
    sel_r = selection_of(log_r)
    with capture_routing() as log_t:
        pisa_attention(q, k, v, backend="triton", **kw)
    sel_t = selection_of(log_t)
    assert sel_t.tile_count is not None and int(sel_t.tile_count.sum()) == int(sel_r.tile_count.sum())
    differs = float((sel_r.mask != sel_t.mask).any(-1).float().mean())
    assert differs <= 0.25, f"the backends routed {differs:.0%} of the tiles differently"
    with capture_routing(replay=sel_r):
        tri = pisa_attention(q, k, v, backend="triton", **kw)
    assert tri.shape == q.shape and tri.dtype == q.dtype
    err = max_err(tri, ref)
    assert err <= tri_tol(q.dtype, device), f"triton vs reference: {err:.3e} ({kw})"
    return sel_r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("order", [1, 0, "drop"])
@pytest.mark.parametrize("tail", ["plain", "lognormal"])
def test_triton_matches_reference(dtype, order, tail, triton_device):
    q, k, v = rand_qkv(1, 2, 700, 64, dtype=dtype, seed=11, v_shift=0.5)
    q = q * 2  # sharper attention: the tiles' counts spread
    sel = compare(q, k, v, triton_device, sparsity=0.75, order=order, tail=tail)
    assert int(sel.tile_count.max()) > int(sel.tile_count.min())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["padding_sinks_dense", "joint_perm", "block128_lengths"])
def test_triton_node_paths(dtype, case, triton_device):
    """Key padding (partial and empty blocks: the masked loop and the skip), sinks, dense rows in
    their own programs (numbered first, the regular tiles reordered after them), token orders."""
    n, b = 300, 2
    q, k, v = rand_qkv(b, 2, n, 64, dtype=dtype, seed=21, v_shift=0.5)
    kw = {"sparsity": 0.7, "order": 1, "tail": "lognormal"}
    if case == "padding_sinks_dense":
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[:, 64:128] = False
        valid[1, 200:230] = False
        kw.update(kv_valid=valid, sink_kv=[(0, 128)], dense_q=[(0, 128)])
    elif case == "joint_perm":
        q, k, v, joint = joint_text_case(b, dtype, seed=22)
        kw.update(joint)
    else:
        q, k, v = rand_qkv(b, 2, 900, 64, dtype=dtype, seed=23, v_shift=0.5)
        kw.update(block_size=128, kv_valid=torch.tensor([900, 611]), order=0, sparsity=0.6)
    compare(q, k, v, triton_device, **kw)


def test_triton_tile_order_off_gives_the_same(triton_device):
    """The heaviest-first order only changes which program runs which tile."""
    q, k, v = rand_qkv(1, 2, 500, 32, dtype=torch.float32, seed=31)
    q, k, v = (t.to(triton_device) * 2 for t in (q, k, v))
    a, sel = adaptive_forward(q, k, v, sparsity=0.7, reorder=True)
    b, _ = adaptive_forward(q, k, v, sparsity=0.7, reorder=False)
    assert sel.tile_count is not None and int(sel.tile_count.min()) < int(sel.tile_count.max())  # counts differ
    assert max_err(a, b) <= 1e-6


@pytest.mark.parametrize("what", ["q_nan", "k_nan", "k_inf"])
def test_nonfinite_inputs_keep_the_budget(what):
    """A NaN / Inf query or key poisons its tile's (or every tile's) shares; the selection must still
    spend the budget exactly, keep the sinks and not crash; the output is NaN where dense's is."""
    q, k, v = rand_qkv(1, 2, 500, 32, dtype=torch.float32, seed=41)
    t = q if what == "q_nan" else k
    t[0, 1, 130] = float("nan") if what.endswith("nan") else float("inf")
    with capture_routing() as log:
        out, st = pisa_attention(q, k, v, sparsity=0.7, routing="adaptive", tail="lognormal", sink_kv=[(0, 64)],
                                 backend="reference", return_stats=True)
    sel = selection_of(log)
    assert abs(float(sel.tile_count.double().mean()) - st.exact_mean) < 1e-12
    assert bool((sel.tile_count <= sel.count).all()) and bool((sel.tile_count >= 2).all())
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(dense).any(-1))


# ---- the Triton selection (interpreter on CPU) against the sorted one, bit for bit ----------------------


def both_selections(st, device, **kw):
    from pisa_kernels import triton_kernels as tk

    st = PooledStats(**{f: (t.to(device) if isinstance(t, torch.Tensor) else t) for f, t in vars(st).items()})
    kw = {a: (b.to(device) if isinstance(b, torch.Tensor) else b) for a, b in kw.items()}
    kw.setdefault("scale", 0.5)
    return R.adaptive_route(st, **kw), R.adaptive_route(st, select=tk.adaptive_blocks, **kw)


@pytest.mark.parametrize("case", ["random", "integer", "flat", "head_scope", "widget_budget", "nonfinite",
                                  "chunks_and_wide_rows"])
def test_triton_selection_is_the_sorted_one(case, triton_device):
    """Ties at the threshold (integer scores, every share equal) go rank-major, then to the lower
    tile, in both; NaN / +-inf shares rank as the sort ranks them."""
    kw = dict(k=3, heads=2)
    if case in ("random", "head_scope", "widget_budget"):
        st = make_stats(bh=4, nq=3, b=2, seed=7, second=case == "random")
        kw.update(scope="head") if case == "head_scope" else None
        kw.update(k=2, k_mean=2.6) if case == "widget_budget" else None
    elif case == "integer":
        st = make_stats(bh=4, nq=3, b=2, seed=8, tied=True)
    elif case == "flat":
        st = make_stats(bh=4, nq=3, b=2, seed=9)
        st.qbar.zero_()
    elif case == "nonfinite":
        st = make_stats(bh=2, nq=3, seed=10)
        st.qbar[0, 1, 0] = float("nan")  # a tile of NaN shares
        st.kbar[1, 3] = float("inf")  # +-inf and NaN logits in the other head
        kw.update(heads=2, k=4)
    else:  # several score chunks (one head each), a row of 130 blocks (the second row width)
        st = make_stats(bh=3, nq=2, nb=130, b=1, seed=11, tied=True)
        kw.update(heads=3, k=9, chunk_bytes=2 * 130 * 4, tail_bias=False)
    a, b = both_selections(st, triton_device, **kw)
    assert_same_selection(a, b)
    assert int(a.tile_count.max()) > int(a.tile_count.min()) or case == "flat"


def kinds_case(nb: int, tied: bool):
    """Sinks (one without a valid key), empty and partial blocks, two batch elements."""
    blen = torch.full((2, nb), 64.0)
    blen[0, [2, 9]] = 0.0
    blen[1, [0, 4, 5]] = 17.0  # block 0: a partial sink
    blen[1, 11] = 0.0
    forced = torch.zeros(nb, dtype=torch.bool)
    forced[[0, 9]] = True
    st = make_stats(bh=4, nq=3, nb=nb, b=2, blen=blen, seed=12, tied=tied, second=True)
    return st, block_kinds(blen, nb * 64, 64, forced)


@pytest.mark.parametrize("nb", [16, 72, 130])
def test_sorted_selection_lists_with_kinds(nb):
    """Each tile's idx: its own blocks (the mask's), ordered full / PARTIAL / EMPTY, each kind in block
    order, then the rest of its first ``width`` ranks in block order, every block once.  Past 42 blocks
    the kinds' int8 overflowed the sort key ``kind x NB + block`` (FLUX 1024²: 72 blocks)."""
    st, kinds = kinds_case(nb, tied=False)
    sel = R.adaptive_route(st, scale=0.5, k=max(3, nb // 8), heads=2, kinds=kinds, n_forced=2)
    group = R._group(kinds).long()
    for row in range(4):
        for t in range(3):
            ids = sel.idx[row, t].tolist()
            c = int(sel.tile_count[row, t])
            assert len(set(ids)) == len(ids) and all(0 <= i < nb for i in ids)
            own = set(torch.nonzero(sel.mask[row, t]).flatten().tolist())
            assert set(ids[:c]) == own
            keys = [(int(group[row // 2, i]), i) for i in ids[:c]]
            assert keys == sorted(keys) and ids[c:] == sorted(ids[c:])
            n_full, n_used = sel.counts[row, t].tolist()
            assert n_full == sum(g == 0 for g, _ in keys) and n_used == sum(g <= 1 for g, _ in keys)


@pytest.mark.parametrize("nb", [16, 72])
@pytest.mark.parametrize("tied", [False, True])
def test_triton_selection_with_kinds(tied, nb, triton_device):
    """The kinds' case (:func:`kinds_case`): the lists ordered full / PARTIAL / EMPTY, the same as the
    sort's; with the reference's tail bias.  72 blocks: FLUX 1024²'s row (past int8 sort keys)."""
    st, kinds = kinds_case(nb, tied)
    a, b = both_selections(st, triton_device, k=max(3, nb // 8), heads=2, kinds=kinds, n_forced=2, tail_bias=True)
    assert_same_selection(a, b)
    assert bool(a.counts[2:, :, 0].lt(a.counts[2:, :, 1]).all())  # the partial sink, after the full blocks


def test_triton_selection_falls_back_past_the_widest_row():
    from pisa_kernels import triton_kernels as tk

    widest = tk.TOP_BLOCKS_WIDTHS[-1]
    assert isinstance(tk.adaptive_blocks(1, 1, widest, 1, 0, 4, "cpu"), tk.AdaptiveBlocks)
    assert type(tk.adaptive_blocks(1, 1, widest + 1, 1, 0, 4, "cpu")) is R.SortedAdaptive


def test_triton_backend_routes_as_the_sorted_selection(triton_device):
    """Through pisa_attention: the Triton backend's adaptive selection is the sorted one on its own
    pooled statistics (key padding and sinks: kinds), and its output still matches the reference."""
    n, b = 300, 2
    q, k, v = rand_qkv(b, 2, n, 64, dtype=torch.float32, seed=51, v_shift=0.5)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, 200:230] = False
    kw = dict(sparsity=0.7, tail="lognormal", kv_valid=valid, sink_kv=[(0, 64)])
    with capture_routing() as log:
        pisa_attention(*(t.to(triton_device) * 2 for t in (q, k, v)), routing="adaptive", backend="triton",
                       cuda_graph=False, **{a: (c.to(triton_device) if isinstance(c, torch.Tensor) else c)
                                            for a, c in kw.items()})
    stats, sel, route_kw = log[0]
    assert_same_selection(sel, route(stats, **dict(route_kw, adaptive_select=None)))
    compare(q * 2, k * 2, v * 2, triton_device, **kw)
