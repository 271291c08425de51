"""Block statistics and routing, shared by the reference and the Triton backend.

Routing decides, per (batch, head, query tile), which key blocks are computed exactly.  It works on
pooled statistics (block means of q and k), so it is cheap: an ``NQ x NB`` score map per head, far
smaller than the ``N x N`` attention matrix.  Both backends call :func:`route` with the same pooled
statistics layout, so they select the same blocks on the same inputs (up to rounding of the means).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Rows per query tile.  Every query tile shares one exact set, so routing pools 128 queries; a
#: tile of 128 rows is also the shape the tensor cores of sm80+ GPUs run most efficiently.
QUERY_TILE = 128

#: Added to the block's first-order residual norm before its log (covariance routing).
COV_EPS = 1e-5

#: Most bytes of scratch the score map may take per routing chunk.
ROUTING_CHUNK_BYTES = 16 << 20

#: Bits of a block's kind (:func:`block_kinds`, one int8 per batch element and key block).
#: PARTIAL: some key of the block (inside the sequence) is invalid, so the Triton kernel reads it
#: through its masked path; every other block keeps the unmasked (tensor-descriptor) path.
PARTIAL = 1
#: EMPTY (always with PARTIAL): no valid key; never preferred over a block with one, and computing
#: it exactly adds nothing (every weight is 0), so the kernel skips it.
EMPTY = 2
#: FORCED: a sink block, selected in every query tile on top of the top-k budget.
FORCED = 4

#: Adaptive routing (``routing="adaptive"``): every query tile gets at least
#: ``max(1, k // ADAPTIVE_FLOOR_DIV)`` and at most ``ADAPTIVE_CAP_MUL * k`` blocks of the budget
#: (``k`` = :func:`topk_count`), forced blocks on top.
ADAPTIVE_FLOOR_DIV = 4
ADAPTIVE_CAP_MUL = 4
#: Adaptive routing shares its budget over every tile of the call (every head routed together: a
#: flat head takes blocks a concentrated one does not need; sharing within each head gained nothing,
#: docs/fidelity.md), and the budget is the widget's density, ``(1 - sparsity) x NB`` blocks per
#: tile on average, rounded once per call (``k_mean``; also where ``NB`` is small).


@dataclass
class PooledStats:
    """Per-block statistics of one attention call, in the processing order.

    ``BH`` is batch x heads (batch-major).  All tensors are float32, except the optional
    low-precision copies the Triton pre-scan writes for the forward kernel's tensor-core products.
    """

    qbar: torch.Tensor | None  # [BH, NQ, D]  mean query of each query tile (None: pooled in routing)
    kbar: torch.Tensor  # [BH, NB, D]  mean of the valid keys of each key block (0 if none)
    vsum: torch.Tensor | None  # [BH, NB, D]  SUM of the values of the valid keys of each block
    #                                (None where the Triton pre-scan wrote only ``vmean_lp``)
    blen: torch.Tensor  # [B, NB]      number of valid keys of each key block
    hsum: torch.Tensor | None  # [BH, D, D]  first-order moment sum_j sum_n (k_n - kbar_j) v_n^T
    covnorm: torch.Tensor | None  # [BH, NB]  ||H_j||_F, for covariance routing
    kbar_lp: torch.Tensor | None = None  # kbar in the input dtype
    vmean_lp: torch.Tensor | None = None  # vsum / blen in the input dtype (sums can overflow fp16)
    # Second moments of the log-normal tail (``tail="lognormal"``):
    q2: torch.Tensor | None = None  # [BH, NQ, D]  mean q^2 of each query tile (its finite rows)
    #: [BH, NB, D] per-dimension variance of the valid keys of each block (the statistics' dtype;
    #: the Triton pre-scan writes it in the input's 16-bit dtype, which the forward kernel reads)
    kvar: torch.Tensor | None = None

    @property
    def hmean(self) -> torch.Tensor | None:
        """The moment per valid key, ``hsum / (valid keys of the batch)``: the hybrid term's H."""
        if self.hsum is None:
            return None
        b = self.blen.shape[0]
        total = self.blen.sum(dim=-1).clamp_min(1.0).repeat_interleave(self.hsum.shape[0] // b)
        return self.hsum / total.view(-1, 1, 1)


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def topk_count(sparsity: float, n_blocks: int) -> int:
    """Key blocks per query tile chosen by score: ``max(1, floor(density * NB))``.

    The small epsilon keeps ``density * NB`` that is an integer in exact arithmetic from rounding
    down (e.g. 0.125 * 1184).
    """
    density = 1.0 - float(sparsity)
    return max(1, min(n_blocks, int(math.floor(density * n_blocks + 1e-6))))


@dataclass
class Selection:
    """The exact key blocks of every query tile, and the log-normal tail's mass correction."""

    idx: torch.Tensor  # [BH, NQ, KT] int32, in no particular order (but see ``counts``)
    mask: torch.Tensor  # [BH, NQ, NB] int8, 1 where selected
    #: KT: the blocks of every query tile (top-k routing), or, with ``tile_count``, the width of
    #: ``idx`` (the most any tile may take; a tile's own blocks are the first ``tile_count`` entries)
    count: int
    #: [BH, NQ, NB]: ``c_ij`` (natural-log units) of every unselected block, ``-inf`` at the
    #: selected ones, for the reference's log-normal tail (the Triton kernel computes ``c_ij``
    #: itself from ``q2`` and ``kvar``: O(N) memory instead of O(N^2)).  See :func:`mass_bias`.
    tail_bias: torch.Tensor | None = None
    #: [BH, NQ, 2] int32 where the blocks had kinds: each tile's ``idx`` lists its full blocks
    #: first, then its PARTIAL ones, then its EMPTY ones; ``counts[..., 0]`` is the number of full
    #: blocks and ``counts[..., 1]`` that of the non-empty ones (:func:`exact_order`).
    counts: torch.Tensor | None = None
    #: [BH, NQ] int32, adaptive routing only: the exact blocks of each tile (forced ones included;
    #: ``counts`` is then always set, also without block kinds).  None: every tile has ``count``.
    tile_count: torch.Tensor | None = None

    @property
    def all_blocks(self) -> bool:
        return self.tile_count is None and self.count == self.mask.shape[-1]


def block_kinds(blen: torch.Tensor, tokens: int, block: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """int8 ``[B, NB]``: the PARTIAL / EMPTY / FORCED bits of every key block, from the valid-key
    counts of the pre-scan (``blen [B, NB]``) and the sink blocks (``forced``: bool ``[NB]``).

    A block is PARTIAL when it holds fewer valid keys than it has keys inside the sequence (the
    last block of a length that is not a multiple of ``block`` is short, not partial)."""
    rows = (tokens - block * torch.arange(blen.shape[1], device=blen.device)).clamp(max=block)
    kinds = (blen < rows).to(torch.int8) * PARTIAL + (blen <= 0).to(torch.int8) * EMPTY
    if forced is not None:
        kinds |= forced.to(torch.int8) * FORCED
    return kinds


def _group(kinds: torch.Tensor) -> torch.Tensor:
    """0 for a full block, 1 for a PARTIAL one with a valid key, 2 for an EMPTY one."""
    return (kinds & PARTIAL) + ((kinds & EMPTY) >> 1)


def exact_order(kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block as one exact list per batch element, in the kernel's order (full, PARTIAL,
    EMPTY): ``(idx [B, NB] int32, counts [B, 2] int32)`` as in :attr:`Selection.counts`.  The list
    of the dense query rows, and of every tile when all blocks are exact."""
    group = _group(kinds)
    idx = torch.sort(group, dim=-1, stable=True).indices.to(torch.int32)
    counts = torch.stack(((group == 0).sum(-1), (group <= 1).sum(-1)), dim=-1).to(torch.int32)
    return idx, counts


def top_blocks(score: torch.Tensor, kt: int, idx: torch.Tensor, mask: torch.Tensor,
               kinds: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> None:
    """The ``kt`` highest scores of every row of ``score [R, NQ, NB]``: their block indices into
    ``idx [R, NQ, kt]`` (int32) and a 0/1 row into ``mask [R, NQ, NB]``.

    Ties go to the lower block index and NaN ranks above everything (as in ``torch.sort``), so the
    result is one function of the scores: the Triton backend's kernel
    (:func:`pisa_kernels.triton_kernels.top_blocks`) selects the same blocks.

    ``kinds`` (int8 ``[R, 1, NB]``, :func:`block_kinds` of each row's batch element): EMPTY blocks
    score ``-inf`` and FORCED ones ``+inf`` (written into ``score``, which is scratch), and each
    row's indices come full blocks first, then PARTIAL, then EMPTY ones, with the two boundaries
    in ``counts [R, NQ, 2]``.  Without kinds the indices are in no particular order.
    """
    if kinds is not None:
        score.masked_fill_((kinds & EMPTY) != 0, -torch.inf).masked_fill_((kinds & FORCED) != 0, torch.inf)
    top = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :kt]
    if kinds is not None:
        group = _group(kinds).expand(-1, score.shape[1], -1).gather(-1, top)
        top = top.gather(-1, torch.sort(group, dim=-1, stable=True).indices)
        counts[..., 0] = (group == 0).sum(-1)
        counts[..., 1] = (group <= 1).sum(-1)
    idx.copy_(top)
    mask.zero_().scatter_(-1, top, 1)


def chunk_rows(chunk_bytes: int, nq: int, nb: int) -> int:
    """(batch x head) rows per routing chunk: as many ``NQ x NB`` fp32 score maps as ``chunk_bytes``
    holds (at least one).  Both selections of adaptive routing use it, so their score chunks are the
    same GEMMs and reductions, bit for bit."""
    return max(1, chunk_bytes // max(1, nq * nb * 4))


def route(stats: PooledStats, *, scale: float, k: int, heads: int, kinds: torch.Tensor | None = None,
          n_forced: int = 0, cov: bool = False, tail_bias: bool = False, chunk_bytes: int = ROUTING_CHUNK_BYTES,
          select=top_blocks, adaptive: bool = False, k_mean: float | None = None,
          adaptive_select=None) -> Selection:
    """Top-``k`` key blocks per query tile by pooled score, plus the forced (sink) blocks.

    ``score = scale * qbar_i . kbar_j`` (+ ``log(||H_j||_F + eps)`` with ``cov``: blocks whose
    first-order residual is large go to the exact path, where the Taylor tail would be least
    accurate).  ``kinds`` (:func:`block_kinds`, or None where every block is full and none is
    forced): FORCED blocks come on top of the ``k`` budget, EMPTY blocks (no valid key) are never
    preferred over a block with one, and every tile's list is ordered full, PARTIAL, EMPTY
    (:attr:`Selection.counts`).  ``n_forced`` is the host-side count of FORCED blocks (passed in so
    routing never synchronises with the device).

    ``tail_bias`` (the reference's log-normal tail; needs ``stats.q2`` and ``stats.kvar``) also
    writes ``Selection.tail_bias`` through each chunk's score buffer.  ``chunk_bytes`` bounds that
    scratch (see :func:`routing_chunk_bytes`).  ``select`` takes each chunk's top ``k``
    (:func:`top_blocks`, or the Triton kernel with the same result).

    ``adaptive``: the budget (``k`` blocks per tile, or ``k_mean`` on average) is shared between
    tiles by need (:func:`adaptive_route`, which takes ``adaptive_select``: None for
    :class:`SortedAdaptive`, or the Triton kernels' selector with the same result); ``cov`` and
    ``select`` do not apply.
    """
    if adaptive and k + n_forced < stats.kbar.shape[1]:
        return adaptive_route(stats, scale=scale, k=k, heads=heads, kinds=kinds, n_forced=n_forced,
                              tail_bias=tail_bias, chunk_bytes=chunk_bytes, k_mean=k_mean,
                              select=adaptive_select or SortedAdaptive)
    bh, nq, _ = stats.qbar.shape
    nb = stats.kbar.shape[1]
    kt = min(nb, k + n_forced)
    device = stats.qbar.device
    idx = torch.empty(bh, nq, kt, dtype=torch.int32, device=device)
    mask = torch.empty(bh, nq, nb, dtype=torch.int8, device=device)
    counts = torch.empty(bh, nq, 2, dtype=torch.int32, device=device) if kinds is not None else None
    batch_of = torch.arange(bh, device=device) // heads
    kinds_rows = kinds[batch_of].unsqueeze(1) if kinds is not None else None  # [BH, 1, NB]
    if kt == nb:  # everything exact: no tail, so no bias
        if kinds is None:
            idx.copy_(torch.arange(nb, dtype=torch.int32, device=device).expand(bh, nq, nb))
        else:
            order, per_batch = exact_order(kinds)
            idx.copy_(order[batch_of].unsqueeze(1).expand(bh, nq, nb))
            counts.copy_(per_batch[batch_of].unsqueeze(1).expand(bh, nq, 2))
        mask.fill_(1)
        return Selection(idx, mask, kt, counts=counts)
    bias = torch.empty(bh, nq, nb, dtype=stats.kbar.dtype, device=device) if tail_bias else None
    rows = chunk_rows(chunk_bytes, nq, nb)
    for s in range(0, bh, rows):
        e = min(bh, s + rows)
        # In place (beta=0 ignores the buffer's contents): one score buffer per chunk, no temporary.
        score = torch.empty(e - s, nq, nb, dtype=stats.kbar.dtype, device=device)
        score.baddbmm_(stats.qbar[s:e], stats.kbar[s:e].transpose(1, 2), beta=0.0, alpha=scale)
        if cov and stats.covnorm is not None:
            score.add_(torch.log(stats.covnorm[s:e] + COV_EPS).unsqueeze(1))
        if kinds is None:
            select(score, kt, idx[s:e], mask[s:e])
        else:
            select(score, kt, idx[s:e], mask[s:e], kinds_rows[s:e], counts[s:e])
        if bias is not None:
            c = mass_bias(stats.q2[s:e], stats.kvar[s:e], scale, out=score)
            blen_rows = stats.blen[batch_of[s:e]].unsqueeze(1)  # [rows, 1, NB]
            bias[s:e] = cap_mass_bias(c, blen_rows).masked_fill_(mask[s:e].bool(), -torch.inf)
    return Selection(idx, mask, kt, bias, counts)


def adaptive_limits(k: int, n_blocks: int, n_forced: int = 0) -> tuple[int, int]:
    """``(floor, cap)`` of adaptive routing: the fewest and the most blocks of the budget one query
    tile takes (forced blocks on top), ``floor <= k <= cap``."""
    cap = max(k, min(n_blocks - n_forced, ADAPTIVE_CAP_MUL * k))
    return min(k, max(1, k // ADAPTIVE_FLOOR_DIV)), cap


def block_log_mass(score: torch.Tensor, blen_rows: torch.Tensor, stats: PooledStats | None = None,
                   scale: float = 1.0, rows: slice | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """In place on ``score [R, NQ, NB]`` (the pooled logits ``s qbar_i . kbar_j``): the log of each
    block's share of its tile's estimated softmax mass, ``log(n_j e^{z_ij + c_ij} / sum_l n_l e^{z_il +
    c_il})`` (``c``: the log-normal correction, capped as the tail caps it, where ``stats`` has the
    second moments, or ``bias``: that correction computed beforehand, :func:`capped_mass_bias`; else
    0).  Blocks without a valid key get ``-inf``; a tile without any valid block gets ``-inf``
    everywhere."""
    if bias is not None:
        score.add_(bias)
    elif stats is not None and stats.q2 is not None and stats.kvar is not None:
        score.add_(capped_mass_bias(stats, blen_rows, scale, rows))
    score.add_(torch.log(blen_rows))  # log 0 = -inf: an empty block holds no mass
    lse = torch.logsumexp(score, dim=-1, keepdim=True)
    return score.sub_(torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))


def capped_mass_bias(stats: PooledStats, blen_rows: torch.Tensor, scale: float, rows: slice) -> torch.Tensor:
    """:func:`block_log_mass`'s log-normal correction of rows ``rows`` (``cap_mass_bias`` of
    ``mass_bias``): a new buffer of the rows' score shape."""
    return cap_mass_bias(mass_bias(stats.q2[rows], stats.kvar[rows].to(stats.q2.dtype), scale), blen_rows)


def adaptive_budget(k: int, k_mean: float | None, tiles: int, n_blocks: int, n_forced: int = 0) -> int:
    """Blocks of the budget (forced ones not counted) shared by ``tiles`` tiles: ``k`` per tile
    (``k_mean`` None: the top-k routing's count, for comparisons at the same number of exact blocks),
    or ``round(k_mean x tiles)`` (the widget's density ``(1 - sparsity) x NB`` per tile, not rounded
    down per tile), between ``floor`` and ``cap`` per tile (:func:`adaptive_limits`)."""
    floor, cap = adaptive_limits(k, n_blocks, n_forced)
    total = k * tiles if k_mean is None else math.floor(k_mean * tiles + 0.5 + 1e-9)
    return max(floor * tiles, min(cap * tiles, total))


def _order_keys_(x: torch.Tensor) -> torch.Tensor:
    """In place: float32 ``x`` as int32 keys in the same order (NaN above +inf, -0.0 = +0.0)."""
    nan = torch.isnan(x)
    x.add_(0.0)  # -0.0 + 0.0 = +0.0: the two zeros tie
    i = x.view(torch.int32)
    i.bitwise_xor_(torch.bitwise_and(i >> 31, 0x7FFFFFFF))
    return i.masked_fill_(nan, 0x7FFFFFFF)


def adaptive_counts(share: torch.Tensor, budget: int, floor: int, scope: str = "call") -> torch.Tensor:
    """Blocks of the budget per tile (``[R, NQ]`` int32, forced blocks not counted) from each tile's
    block shares sorted in descending order, ranks ``floor .. cap - 1`` (``share [R, NQ, cap -
    floor]`` float32, see :func:`adaptive_route`; overwritten: it is scratch): every tile takes
    ``floor``, then the ``budget - floor x tiles`` largest shares of the scope (``"call"``: all
    tiles; ``"head"``: each row's, ``budget`` per row) go to their tiles.  Ties go to the lower
    rank, then to the lower (row, tile): one function of the shares, and every tile's blocks are a
    prefix of its sorted list.  The sum over the scope is ``budget`` exactly.

    No sort: the threshold (the ``take``-th largest share) comes from a bitwise binary search on
    order-preserving integer keys, 32 counting passes (as the top-k kernel finds its k-th score),
    so the scratch is a byte per candidate, not a sort's values and 8-byte indices."""
    r, nq, width = share.shape
    counts = torch.full((r, nq), floor, dtype=torch.int32, device=share.device)
    groups = 1 if scope == "call" else r
    tiles = r * nq // groups
    take = budget - floor * tiles
    if width == 0 or take <= 0:
        return counts
    keys = _order_keys_(share).view(groups, tiles, width)

    def at_least(t):  # [G]: candidates of each group with key >= t
        return (keys >= t.view(-1, 1, 1)).sum(dim=(1, 2))

    # the largest t with #{key >= t} >= take: the sign first, then bits 30..0
    zero = torch.zeros(groups, dtype=torch.int32, device=share.device)
    kth = torch.where(at_least(zero) >= take, zero, torch.full_like(zero, -2147483648))
    for bit in range(30, -1, -1):
        cand = kth | (1 << bit)
        kth = torch.where(at_least(cand) >= take, cand, kth)
    t = kth.view(-1, 1, 1)
    above = (keys > t).sum(-1, dtype=torch.int32)  # [G, tiles]
    tie = keys == t  # [G, tiles, width]
    need = take - above.sum(-1)  # [G]: ties to take, rank-major (lower rank, then lower tile)
    per_rank = tie.sum(1)  # [G, width]
    before = per_rank.cumsum(-1) - per_rank  # ties at lower ranks
    full = before + per_rank <= need.view(-1, 1)  # ranks whose ties all go
    cut = (before < need.view(-1, 1)) & ~full  # the one rank whose ties go in part (tile order)
    taken = (tie & full.unsqueeze(1)).sum(-1, dtype=torch.int32)
    rank = (cut * torch.arange(width, device=share.device)).sum(-1)  # [G] (0 where no rank is cut)
    part = tie.gather(2, rank.view(-1, 1, 1).expand(-1, tiles, 1)).squeeze(2) & cut.any(-1, keepdim=True)
    quota = (need - (per_rank * full).sum(-1)).view(-1, 1)
    taken += (part & (part.cumsum(1) <= quota)).to(torch.int32)
    return counts + (above + taken).view(r, nq)


class SortedAdaptive:
    """Adaptive routing's selection in PyTorch: the reference's, and the oracle of the Triton
    backend's (:func:`pisa_kernels.triton_kernels.adaptive_blocks`, the same result bit for bit).

    :func:`adaptive_route` hands it every score chunk (:meth:`rank`: a stable descending sort per
    tile, kept are the first ``width`` block indices and the candidate shares, ranks ``lo = n_forced
    + floor`` to ``width - 1``), then asks for the selection (:meth:`finish`: the counts by
    :func:`adaptive_counts`, each tile's first ``tile_count`` ranks as its blocks).  Scratch: 8 bytes
    per (tile, rank below ``width``), and the sort's 12 bytes per score of a third of a chunk."""

    def __init__(self, bh: int, nq: int, nb: int, floor: int, n_forced: int, width: int, device):
        self.floor, self.lo, self.width, self.nb = floor, n_forced + floor, width, nb
        self.share = torch.empty(bh, nq, width - self.lo, dtype=torch.float32, device=device)  # the candidates
        self.order = torch.empty(bh, nq, width, dtype=torch.int32, device=device)
        self.mask = torch.empty(bh, nq, nb, dtype=torch.int8, device=device)

    def rank(self, score: torch.Tensor, s: int, kinds_rows: torch.Tensor | None) -> None:
        """Rows ``s ..`` of the call from their shares ``score [rows, NQ, NB]`` (scratch)."""
        if kinds_rows is not None:
            score.masked_fill_((kinds_rows & EMPTY) != 0, -torch.inf).masked_fill_((kinds_rows & FORCED) != 0,
                                                                                    torch.inf)
        piece = max(1, -(-score.shape[0] // 3))  # the sort's values (4 B) and int64 indices (8 B): a third
        for a in range(0, score.shape[0], piece):
            top = torch.sort(score[a:a + piece], dim=-1, descending=True, stable=True)
            r = slice(s + a, s + a + top.values.shape[0])
            self.share[r] = top.values[..., self.lo:self.width]
            self.order[r] = top.indices[..., :self.width]
            del top

    def finish(self, budget: int, scope: str, kinds_rows: torch.Tensor | None, rows: int):
        """``(idx, mask, counts, tile_count)`` of :class:`Selection`; ``rows``: rows per step."""
        bh, nq, width = self.order.shape
        tile_count = adaptive_counts(self.share, budget, self.floor, scope) + (self.lo - self.floor)
        del self.share
        counts = torch.empty(bh, nq, 2, dtype=torch.int32, device=self.order.device)
        for s in range(0, bh, rows):
            e = min(bh, s + rows)
            own = self.order[s:e].long()
            take = torch.arange(width, device=own.device) < tile_count[s:e].unsqueeze(-1)  # [rows, NQ, width]
            self.mask[s:e].zero_().scatter_(-1, own, take.to(torch.int8))
            group = 0 if kinds_rows is None else _group(kinds_rows[s:e]).expand(-1, nq, -1).gather(-1, own)
            # int64 keys: the kinds' int8 would overflow in key * nb (past 42 blocks)
            key = torch.where(take, group, 3).long()  # the tile's own blocks by kind, then the rest
            # each part in block order (as the Triton kernel compacts them): one sort of distinct keys
            self.order[s:e] = torch.sort(key * self.nb + own, dim=-1).values % self.nb
            counts[s:e, :, 0] = (key == 0).sum(-1)
            counts[s:e, :, 1] = (key <= 1).sum(-1)
        return self.order, self.mask, counts, tile_count


def adaptive_route(stats: PooledStats, *, scale: float, k: int, heads: int, kinds: torch.Tensor | None = None,
                   n_forced: int = 0, tail_bias: bool = False, chunk_bytes: int = ROUTING_CHUNK_BYTES,
                   scope: str = "call", k_mean: float | None = None, select=SortedAdaptive) -> Selection:
    """Adaptive routing: the call's budget of exact blocks, shared between tiles by need.

    Each tile ranks its blocks by their estimated share of the tile's softmax mass
    (:func:`block_log_mass`: pooled logit, block length and, with the log-normal tail, its mass
    correction; forced blocks first, then ties to the lower index, as :func:`top_blocks`).  Every
    tile takes its first ``floor`` blocks, at most ``cap`` (:func:`adaptive_limits`), and the rest of
    the budget (:func:`adaptive_budget`: ``k`` per tile, or ``k_mean`` per tile rounded once over
    the scope) goes to the largest shares of the scope (``"call"``: every tile; ``"head"``: each
    (batch, head) keeps its own, :func:`adaptive_counts`): one threshold on the normalised mass, which leaves the least estimated
    mass to the tail for the budget.  The mean count over the scope is the budget's exactly, forced
    blocks on top.

    The Selection has ``tile_count`` and always ``counts``; ``idx`` is ``cap + n_forced`` wide, each
    tile's blocks first (ordered full, PARTIAL, EMPTY with ``kinds``, each kind in block order), then
    the rest of its first ``cap + n_forced`` ranks in block order.  ``select`` makes the selector
    from ``(BH, NQ, NB, floor, n_forced, width, device)`` (:class:`SortedAdaptive`, or the Triton
    backend's :func:`pisa_kernels.triton_kernels.adaptive_blocks`, the same result); the score
    chunks, computed here, are the same for both.  No host synchronisation.
    """
    if scope not in ("call", "head"):
        raise ValueError(f"adaptive scope must be 'call' or 'head', got {scope!r}")
    bh, nq, _ = stats.qbar.shape
    nb = stats.kbar.shape[1]
    device = stats.qbar.device
    floor, cap = adaptive_limits(k, nb, n_forced)
    width = cap + n_forced
    batch_of = torch.arange(bh, device=device) // heads
    kinds_rows = kinds[batch_of].unsqueeze(1) if kinds is not None else None  # [BH, 1, NB]
    selector = select(bh, nq, nb, floor, n_forced, width, device)
    rows = chunk_rows(chunk_bytes, nq, nb)
    lognormal = stats.q2 is not None and stats.kvar is not None
    for s in range(0, bh, rows):
        e = min(bh, s + rows)
        blen_rows = stats.blen[batch_of[s:e]].unsqueeze(1)  # [rows, 1, NB]
        # the log-normal correction first (its cap's temporary is gone before the scores exist): at
        # most two buffers of the chunk's size at a time
        c = capped_mass_bias(stats, blen_rows, scale, slice(s, e)) if lognormal else None
        score = torch.empty(e - s, nq, nb, dtype=stats.kbar.dtype, device=device)
        score.baddbmm_(stats.qbar[s:e], stats.kbar[s:e].transpose(1, 2), beta=0.0, alpha=scale)
        block_log_mass(score, blen_rows, bias=c)
        del c
        selector.rank(score, s, kinds_rows[s:e] if kinds_rows is not None else None)
        del score
    budget = adaptive_budget(k, k_mean, nq if scope == "head" else bh * nq, nb, n_forced)
    idx, mask, counts, tile_count = selector.finish(budget, scope, kinds_rows, rows)
    bias = None
    if tail_bias:
        bias = torch.empty(bh, nq, nb, dtype=stats.kbar.dtype, device=device)
        for s in range(0, bh, rows):
            e = min(bh, s + rows)
            c = mass_bias(stats.q2[s:e], stats.kvar[s:e], scale, out=bias[s:e])
            cap_mass_bias(c, stats.blen[batch_of[s:e]].unsqueeze(1)).masked_fill_(mask[s:e].bool(), -torch.inf)
    return Selection(idx, mask, width, bias, counts, tile_count)


def mass_bias(q2: torch.Tensor, kvar: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``c [BH, NQ, NB] = s^2/2 E_i[q^2] . Var_j[k]``: the second-order term of block ``j``'s mass for
    query tile ``i`` under a diagonal key covariance (docs/fidelity.md).

    The zeroth order counts a block as ``n_j exp(s q . kbar_j)``, but the mean of ``exp`` over the
    block's keys exceeds ``exp`` of the mean by the spread of the logits inside it (large where RoPE
    rotates fast); a log-normal logit has mass ``n_j exp(s q . kbar_j + s^2/2 q^T Cov_j q)``.  With
    the tile's mean ``q^2`` in place of each row's it is one ``NQ x NB`` GEMM per head, like the
    routing score.  ``out``: a float32 buffer of the result's shape to reuse.
    """
    if out is None:
        out = torch.empty(q2.shape[0], q2.shape[1], kvar.shape[1], dtype=q2.dtype, device=q2.device)
    return out.baddbmm_(q2, kvar.transpose(1, 2), beta=0.0, alpha=0.5 * scale * scale)


def cap_mass_bias(c: torch.Tensor, blen: torch.Tensor) -> torch.Tensor:
    """``min(c, sqrt(2 c (n_j - 1)))`` in place: no block holds more mass than its largest key could.

    ``c`` estimates ``log mean_n exp(x_n - xbar)`` for the block's logits ``x`` as ``sigma^2 / 2``.
    By Samuelson's inequality no one of ``n`` values lies more than ``sigma sqrt(n - 1)`` from their
    mean, so the true value is at most ``sqrt(2 c (n - 1))``; past ``c = 2 (n - 1)`` (126 for a
    64-token block: huge logit spreads) the log-normal estimate would exceed it.  ``blen``: the
    blocks' valid-key counts, broadcastable to ``c``.
    """
    m = (blen - 1.0).clamp_min(0.0)
    if m.dtype != c.dtype:
        return torch.minimum(c, torch.sqrt(2.0 * c * m), out=c)
    # the same operations and roundings with one temporary of c's size, not two
    return torch.minimum(c, (c * 2.0).mul_(m).sqrt_(), out=c)


def routing_chunk_bytes(qkv_bytes: int) -> int:
    """Score scratch per routing chunk: 1/128 of the bytes of q, k, v, between 2 and 16 MiB.

    Scaled so the scratch (and torch.topk's workspace, which grows with it) stays a small share of
    the call's extra memory at every size; 16 MiB is where fewer, larger chunks stop being faster."""
    return max(2 << 20, min(ROUTING_CHUNK_BYTES, qkv_bytes // 128))


def forced_blocks_from_tokens(sink_tokens: torch.Tensor | None, block: int) -> torch.Tensor | None:
    """Blocks (in the processing order) that contain any sink token.  ``sink_tokens``: CPU bool [N]."""
    if sink_tokens is None or not bool(sink_tokens.any()):
        return None
    n = sink_tokens.numel()
    nb = num_blocks(n, block)
    padded = torch.zeros(nb * block, dtype=torch.bool, device=sink_tokens.device)
    padded[:n] = sink_tokens
    return padded.view(nb, block).any(dim=1)
