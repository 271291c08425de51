"""Triton kernels of PISA: a fused pre-scan (pooling) and one fused forward kernel.

Design (see docs/kernels.md for the measurements):

* ``_pool_k_kernel``: one program per (chunk of key blocks, batch x head).  It streams K and V once
  and writes the block mean of the valid keys, the value sums and the valid counts; it accumulates
  the first-order moment ``sum_j sum_n (k_n - kbar_j) v_n^T`` of its chunk in registers (one
  ``D x D`` tile) and writes that partial, so no ``[B, H, NB, D, D]`` temporary ever exists.  With
  covariance routing it also writes ``||H_j||_F`` per block, reduced on the fly.  The partial
  moments of the chunks meet through fp32 atomics in one ``D x D`` tile per head.
  For the log-normal tail it also writes each block's per-dimension key variance.
* ``_pool_q_kernel``: the mean query (and, for the log-normal tail, the mean ``q^2``) of each
  128-row query tile.
* ``_pisa_fwd_kernel``: one program per (query tile, batch x head).  Phase 1 runs exact
  FlashAttention-style attention over the selected key blocks (gathered by index); phase 2 scans all
  block centroids in groups, skipping the selected ones through a byte mask, adding the zeroth-order
  term and the tail mass ``g`` to the same online softmax (``acc``, ``l`` *and* ``g`` are rescaled
  whenever the running max moves), each centroid logit raised by its log-normal mass correction
  when asked; phase 3 adds the hybrid first-order term ``g * q @ Hmean``.  On sm90+, for 16-bit
  inputs with a power-of-two head dim and 16-byte aligned, non-broadcast strides, the K/V tiles of
  phase 1 and the centroid tiles of phase 2 come through tensor descriptors (TMA); everywhere else
  through pointers.

What the node's calls add costs only where it acts:

* Key padding (``kv_valid``): each tile's exact list comes from the routing ordered full blocks,
  then blocks with an invalid key, then blocks without any (``routing.Selection.counts``, from the
  pre-scan's valid counts), so only the few partial blocks take the masked pointer loads, the
  others keep the unmasked (TMA) loop, and empty blocks are not visited.
* Sinks (``sink_kv``) are ordinary entries of that list (the top-k kernel scores them ``+inf``).
* Dense query rows (``dense_q``) run as extra programs of the same launch, numbered first, each
  over every key block; the regular tiles leave those rows to them.
* Token orders: the pre-scan reads K and V through the permutation and writes their processing-
  order copies as it goes (the exact loop needs contiguous rows: reading K/V rows through a
  permutation inside the loop was measured 20% slower at Wan 720p, docs/kernels.md); q is read and
  the output written through the permutation, once per row, so neither is copied.

Sequence length, block counts and the number of selected blocks are runtime arguments and are not
specialised (``do_not_specialize``), so a new resolution never recompiles.  Inputs are addressed
through strides (``[B, H, N, D]`` and ``[B, N, H, D]`` views without copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .errors import KernelDoesNotFit
from .routing import EMPTY, FORCED, PARTIAL, QUERY_TILE, PooledStats, Selection, SortedAdaptive, mass_bias, num_blocks
from .routing import top_blocks as _sorted_top_blocks

try:  # host-side tensor descriptors (TMA), Triton >= 3.3; without them every tile loads through pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

LOG2E = 1.4426950408889634
_LOG2E_IN_KERNEL = tl.constexpr(LOG2E)
_TWO_LOG2E = tl.constexpr(2.0 * LOG2E)
_PARTIAL, _EMPTY, _FORCED = tl.constexpr(PARTIAL), tl.constexpr(EMPTY), tl.constexpr(FORCED)

#: Centroids per step of the tail scan, and its software-pipelining depth.
TAIL_GROUP = 64
TAIL_STAGES = 3

#: Programs of the pooling kernel a launch aims at, per SM: each (batch x head) is cut into chunks
#: of key blocks until the launch has about this many programs (two fit an SM, so 2.5 waves); each
#: adds its first-order partial into the head's ``D x D`` fp32 tile with atomics.  A fixed 16 chunks
#: a head left the head groups of a long token order (6-10 heads at the 720p shapes) at 96-160
#: programs on an H200's 132 SMs; 64 chunks there (640 programs at Wan 720p) measured 10-40 % faster,
#: and one launch of 40 heads already had 640 (H200, docs/kernels.md, Hopper section, item 9).
POOL_PROGRAMS_PER_SM = 5
#: ... but at least this many blocks per program, so the atomics stay a small share of the work.
POOL_MIN_BLOCKS = 8
#: SMs assumed where the device has none to ask (the CPU interpreter).
_DEFAULT_SMS = 132
#: The pooling kernel's launch configurations, the first that fits first (:func:`_launch`).
POOL_CONFIGS = [dict(num_warps=4, num_stages=s) for s in (3, 2, 1)]
#: Programs per chunk for head dim 128 with the first-order moment, each owning half the value
#: columns: the 128 x 128 fp32 accumulator of one program spills (255 registers and 416 bytes of
#: local memory a thread, Triton 3.6), half of it does not; 17-22 % faster at Wan / HunyuanVideo 720p.  Not with the
#: log-normal statistics (its key variances load the first program: no gain measured) nor with
#: covariance routing (its per-block norm needs every column).  Log entry 18.
POOL_DSPLIT = 2

_RUNTIME_INTS = ["N", "NB", "NQ", "KT", "blocks_per_prog"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _pool_k_kernel(K, V, VALID, PERM, KP, VP, KBAR, VSUM, KBAR_LP, VMEAN_LP, BLEN, HSUM, COVN, KVAR,
                   skb, skh, skn, svb, svh, svn, s_valid_b,
                   N, NB, H, D, blocks_per_prog,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HAS_VALID: tl.constexpr, HAS_PERM: tl.constexpr,
                   MOMENT: tl.constexpr, COV: tl.constexpr, WRITE_LP: tl.constexpr, SECOND: tl.constexpr,
                   KVAR_MAX: tl.constexpr, EXACT_DOT: tl.constexpr, DSPLIT: tl.constexpr):
    # DSPLIT programs share a chunk, each owning 1/DSPLIT of the value columns (of the moment, the
    # value sums and means), which keeps the moment's accumulator out of local memory (log entry
    # 18); the first also writes the key statistics.  Each reads the whole K tile (the key mean
    # enters every column of the moment); the programs of a chunk are neighbours in the launch, so
    # the repeated reads mostly hit L2.
    # With a token order (HAS_PERM) the rows are read through PERM (the input position of each
    # processing position) and written, in the processing order, to the contiguous [B, H, N, D]
    # copies KP / VP that the forward kernel reads: the order is applied in this pass over K and V
    # instead of in gathers of their own.  VALID is in the processing order.
    chunk = tl.program_id(0) // DSPLIT
    part = tl.program_id(0) % DSPLIT
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kbase = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    vbase = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    BLOCK_C: tl.constexpr = BLOCK_D // DSPLIT
    offs_c = part * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < D
    hacc = tl.zeros([BLOCK_D, BLOCK_C], dtype=tl.float32)
    j0 = chunk * blocks_per_prog
    n_here = tl.minimum(blocks_per_prog, NB - j0)
    for jj in range(0, n_here):
        j = j0 + jj
        offs = j * BLOCK + tl.arange(0, BLOCK)
        inb = offs < N
        if HAS_PERM:
            rows = tl.load(PERM + offs, mask=inb, other=0)
        else:
            rows = offs
        k_in = tl.load(kbase + rows[:, None].to(tl.int64) * skn + offs_d[None, :],
                       mask=inb[:, None] & dmask[None, :], other=0.0)
        v_in = tl.load(vbase + rows[:, None].to(tl.int64) * svn + offs_c[None, :],
                       mask=inb[:, None] & cmask[None, :], other=0.0)
        w = inb
        if HAS_VALID:
            # Invalid keys are selected away after the load (a padded key holding NaN must not reach
            # any statistic), so the K / V loads never wait for the VALID load (their mask would).
            w = w & (tl.load(VALID + b.to(tl.int64) * s_valid_b + offs, mask=inb, other=0) != 0)
            k_in = tl.where(w[:, None], k_in, 0.0)
            v_in = tl.where(w[:, None], v_in, 0.0)
        m2 = w[:, None] & dmask[None, :]
        if HAS_PERM:  # the processing-order copies (invalid keys as zeros: the kernel never reads them)
            cbase = (bh.to(tl.int64) * N + offs[:, None]) * D
            if part == 0:
                tl.store(KP + cbase + offs_d[None, :], k_in, mask=inb[:, None] & dmask[None, :])
            tl.store(VP + cbase + offs_c[None, :], v_in, mask=inb[:, None] & cmask[None, :])
        cnt = tl.sum(w.to(tl.float32), axis=0)
        kbar = tl.sum(k_in.to(tl.float32), axis=0) / tl.maximum(cnt, 1.0)
        vsum = tl.sum(v_in.to(tl.float32), axis=0)
        out_off = (bh.to(tl.int64) * NB + j) * D + offs_d
        col_off = (bh.to(tl.int64) * NB + j) * D + offs_c
        if part == 0:
            tl.store(KBAR + out_off, kbar, mask=dmask)
            if SECOND:
                # Per-dimension variance of the valid keys, two-pass on the tile already in registers.
                kc = tl.where(m2, k_in.to(tl.float32) - kbar[None, :], 0.0)
                kvar = tl.minimum(tl.sum(kc * kc, axis=0) / tl.maximum(cnt, 1.0), KVAR_MAX)  # finite in fp16
                tl.store(KVAR + out_off, kvar.to(KVAR.dtype.element_ty), mask=dmask)
            if WRITE_LP:
                tl.store(KBAR_LP + out_off, kbar.to(KBAR_LP.dtype.element_ty), mask=dmask)
            if h == 0:
                tl.store(BLEN + b * NB + j, cnt)
        if WRITE_LP:
            # The forward kernel takes the value MEAN in the input dtype (a 64-token sum of fp16
            # values can exceed fp16's range) and weights it by the block length in fp32.
            tl.store(VMEAN_LP + col_off, (vsum / tl.maximum(cnt, 1.0)).to(VMEAN_LP.dtype.element_ty), mask=cmask)
        else:  # fp32 inputs: the forward kernel divides the sums itself
            tl.store(VSUM + col_off, vsum, mask=cmask)
        if MOMENT or COV:
            # H_j = sum_n (k_n - kbar) v_n^T = K^T V - kbar vsum^T: one tensor-core product on the
            # loaded tiles (masked rows are zero) and a rank-one correction, both fp32-accumulated.
            if EXACT_DOT:  # fp32 inputs: a TF32 product would cancel badly against the fp32 correction
                hj = tl.dot(tl.trans(k_in), v_in, input_precision="ieee") - kbar[:, None] * vsum[None, :]
            else:
                hj = tl.dot(tl.trans(k_in), v_in) - kbar[:, None] * vsum[None, :]
            if MOMENT:
                hacc += hj
            if COV:  # (only with DSPLIT == 1: the norm needs every column)
                tl.store(COVN + bh.to(tl.int64) * NB + j, tl.sqrt(tl.sum(tl.sum(hj * hj, axis=1), axis=0)))
    if MOMENT:
        # fp32 atomics into one D x D tile per head: no per-chunk partial buffers.
        hp = HSUM + bh.to(tl.int64) * D * D
        tl.atomic_add(hp + offs_d[:, None] * D + offs_c[None, :], hacc, mask=dmask[:, None] & cmask[None, :],
                      sem="relaxed")


@triton.jit(do_not_specialize=["N", "NQ"])
def _pool_q_kernel(Q, PERM, QBAR, Q2, sqb, sqh, sqn, N, NQ, H, D,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SECOND: tl.constexpr, HAS_PERM: tl.constexpr):
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    inb = offs < N
    if HAS_PERM:
        rows = tl.load(PERM + offs, mask=inb, other=0)
    else:
        rows = offs
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows[:, None].to(tl.int64) * sqn + offs_d[None, :],
                mask=inb[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    cnt = tl.sum(inb.to(tl.float32), axis=0)
    tl.store(QBAR + (bh.to(tl.int64) * NQ + qt) * D + offs_d, tl.sum(q, axis=0) / cnt, mask=dmask)
    if SECOND:
        # Non-finite rows are left out: one NaN / Inf query must not spread to its whole tile
        # (it still gives its own row NaN, as dense attention does).
        qq = q * q
        qq = tl.where(qq < float("inf"), qq, 0.0)
        tl.store(Q2 + (bh.to(tl.int64) * NQ + qt) * D + offs_d, tl.sum(qq, axis=0) / cnt, mask=dmask)


@triton.jit
def _kind_scores(x, kind):
    """EMPTY blocks score -inf (never preferred over a block with a valid key), FORCED ones +inf."""
    x = tl.where((kind & _EMPTY) != 0, float("-inf"), x)
    return tl.where((kind & _FORCED) != 0, float("inf"), x)


@triton.jit
def _order_key(x):
    """int32 keys in the order of the float32 ``x`` (negatives have their magnitude bits flipped;
    -0.0 + 0.0 = +0.0, so the two zeros tie), every NaN above +inf, as in torch.sort."""
    x = x + 0.0
    i = x.to(tl.int32, bitcast=True)
    return tl.where(x == x, i ^ ((i >> 31) & 0x7FFFFFFF), 0x7FFFFFFF)


@triton.jit
def _first(key, ok, m):
    """The ``m`` largest keys of the row ``key[ok]``, ties to the lower position (a mask): the
    ``m``-th largest, the largest ``t`` with ``#{key >= t} >= m``, by a bitwise binary search (the
    sign, then bits 30..0: 32 counting passes over the row in registers), then the keys above it and
    the first ties by a prefix sum."""
    kth = tl.where(tl.sum((ok & (key >= 0)).to(tl.int32), axis=0) >= m, 0, -2147483648)
    for bit in tl.static_range(30, -1, -1):
        cand = kth | (1 << bit)
        kth = tl.where(tl.sum((ok & (key >= cand)).to(tl.int32), axis=0) >= m, cand, kth)
    above = ok & (key > kth)
    tie = ok & (key == kth)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= m - tl.sum(above.to(tl.int32), axis=0)))


@triton.jit
def _kind_order(take, kind):
    """Where the taken entries go in the forward kernel's order (routing.Selection.counts): full
    blocks, then PARTIAL, then EMPTY ones, each in entry order; and the counts of the full and of
    the non-empty ones."""
    group = (kind & _PARTIAL) + ((kind & _EMPTY) >> 1)
    full = (take & (group == 0)).to(tl.int32)
    part = (take & (group == 1)).to(tl.int32)
    empty = (take & (group == 2)).to(tl.int32)
    n_full = tl.sum(full, axis=0)
    n_part = tl.sum(part, axis=0)
    pos = tl.where(group == 0, tl.cumsum(full, axis=0),
                   tl.where(group == 1, n_full + tl.cumsum(part, axis=0), n_full + n_part + tl.cumsum(empty, axis=0))) - 1
    return pos, n_full, n_full + n_part


@triton.jit(do_not_specialize=["NB", "KT", "NQ"])
def _top_blocks_kernel(S, IDX, MASK, KIND, CNT, NB, KT, NQ, BLOCK: tl.constexpr, HAS_KIND: tl.constexpr):
    """One row of scores: its KT largest (:func:`_first`), compacted with a prefix sum.  With block
    kinds (routing.block_kinds, one row per NQ score rows) EMPTY blocks score -inf and FORCED ones
    +inf, and the compaction writes the full blocks first, then the PARTIAL, then the EMPTY ones, and
    the two counts."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < NB
    x = tl.load(S + row * NB + offs, mask=ok, other=0.0)
    if HAS_KIND:
        kind = tl.load(KIND + (row // NQ) * NB + offs, mask=ok, other=0).to(tl.int32)
        x = _kind_scores(x, kind)
    take = _first(_order_key(x), ok, KT)
    if HAS_KIND:
        pos, n_full, n_used = _kind_order(take, kind)
        tl.store(CNT + row * 2, n_full)
        tl.store(CNT + row * 2 + 1, n_used)
    else:
        pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(IDX + row * KT + pos, offs, mask=take)
    tl.store(MASK + row * NB + offs, take.to(tl.int8), mask=ok)


#: Scores per warp in the top-k kernel: two warps for a row of up to 2,048 blocks (HunyuanVideo
#: 720p has 1,861); measured against one and eight warps (log entry 18).
TOP_BLOCKS_PER_WARP = 1024
#: Row widths of the top-k kernel (a compile-time constant): a row of NB blocks takes the first that
#: holds it, so a new length compiles nothing once its width is compiled (FLUX 1024²: 128, Wan
#: 480p: 512, Wan / HunyuanVideo 720p: 2,048).  Longer rows (over 500K tokens) sort.
TOP_BLOCKS_WIDTHS = (128, 512, 2048, 8192)


def top_blocks(score: torch.Tensor, kt: int, idx: torch.Tensor, mask: torch.Tensor,
               kinds: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> None:
    """:func:`pisa_kernels.routing.top_blocks` (the same blocks, ties to the lower index, the same
    order of full, PARTIAL and EMPTY blocks with ``kinds``) in one launch, instead of a sort (or
    ``torch.topk``), the kinds' two masked fills and the mask's scatter."""
    r, nq, nb = score.shape
    block = next((w for w in TOP_BLOCKS_WIDTHS if w >= nb), None)
    tensors = (score, idx, mask) + ((kinds, counts) if kinds is not None else ())
    if score.dtype != torch.float32 or block is None or not all(t.is_contiguous() for t in tensors):
        return _sorted_top_blocks(score, kt, idx, mask, kinds, counts)
    _top_blocks_kernel[(r * nq,)](score, idx, mask, kinds if kinds is not None else mask,
                                  counts if counts is not None else idx, nb, kt, nq, BLOCK=block,
                                  HAS_KIND=kinds is not None, num_warps=max(1, block // TOP_BLOCKS_PER_WARP))


@triton.jit(do_not_specialize=["NB", "NQ", "H", "row0", "out0"])
def _tail_bias_kernel(C, MASK, BLEN, OUT, NB, NQ, H, row0, out0, BLOCK: tl.constexpr, LOGNORMAL: tl.constexpr):
    """A slice of one query tile's row of :func:`tail_bias` (``C``: the chunk's ``c_ij`` from
    ``routing.mass_bias``; its tiles from ``row0``, their rows of ``OUT`` from ``out0``)."""
    row = tl.program_id(0).to(tl.int64)
    tile = row0 + row
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NB
    n = tl.load(BLEN + (tile // NQ // H) * NB + offs, mask=ok, other=0.0)
    bias = tl.log2(tl.maximum(n, 1.0))
    if LOGNORMAL:  # Samuelson's bound (routing.cap_mass_bias), then base 2
        c = tl.load(C + row * NB + offs, mask=ok, other=0.0)
        bias += tl.minimum(c, tl.sqrt(2.0 * c * tl.maximum(n - 1.0, 0.0))) * _LOG2E_IN_KERNEL
    free = (tl.load(MASK + tile * NB + offs, mask=ok, other=1) == 0) & (n > 0)
    tl.store(OUT + (out0 + row) * NB + offs, tl.where(free, bias, float("-inf")).to(OUT.dtype.element_ty), mask=ok)


#: Blocks per program of the tail-bias kernel.
TAIL_BIAS_BLOCK = 1024


def tail_bias(stats: PooledStats, sel: Selection, scale: float, heads: int, chunk_bytes: int,
              rows: tuple[int, int] | None = None) -> torch.Tensor:
    """float16 ``[BH, NQ, NB]`` (``rows``: only batch x heads ``rows[0] .. rows[1] - 1``): what the
    Hopper kernel's tail adds to each centroid's logit, in
    base 2: ``log2 n_j`` (the block's valid keys) plus, with the log-normal tail (``stats.kvar``),
    ``log2(e) c_ij`` capped as :func:`routing.cap_mass_bias` caps it; ``-inf`` at the selected and
    the empty blocks.  One load per centroid in the kernel instead of the selection byte, the length
    and the correction's product (which also took a shared-memory stage).  ``c`` is computed in
    fp32 per chunk of ``chunk_bytes`` (:func:`routing.routing_chunk_bytes`)."""
    bh, nq, nb = sel.mask.shape
    first, end = rows if rows is not None else (0, bh)
    out = torch.empty(end - first, nq, nb, dtype=torch.float16, device=sel.mask.device)
    lognormal = stats.kvar is not None and stats.q2 is not None
    step = max(1, chunk_bytes // max(1, nq * nb * 4)) if lognormal else end - first
    grid_y = triton.cdiv(nb, TAIL_BIAS_BLOCK)
    for s in range(first, end, step):
        e = min(end, s + step)
        c = mass_bias(stats.q2[s:e], stats.kvar[s:e].float(), scale) if lognormal else out
        _tail_bias_kernel[((e - s) * nq, grid_y)](c, sel.mask, stats.blen, out, nb, nq, heads, s * nq,
                                                  (s - first) * nq, BLOCK=TAIL_BIAS_BLOCK, LOGNORMAL=lognormal,
                                                  num_warps=4)
    return out


#: Adaptive routing's threshold over a scope (routing.adaptive_counts: the largest candidate shares
#: of every tile of the call) by radix selection: RADIX_LEVELS passes over the candidates' keys, each
#: a histogram of the next RADIX_BITS of the keys whose higher digits are the threshold's, instead
#: of the 32 counting passes of a bitwise search (each a read of every candidate).
RADIX_BITS = 8
RADIX_LEVELS = 32 // RADIX_BITS
#: Candidate keys per step of a radix program, and the most programs per scope: enough to fill an
#: H200's 132 SMs, few enough that their histograms' atomics (256 bins each) stay a small cost.
RADIX_BLOCK = 4096
RADIX_PROGRAMS = 512
#: The most programs of the per-tile tie count per scope (each recomputes the threshold from the
#: histograms: 1,024 loads, so it takes many tiles).
TIE_PROGRAMS = 1024
#: Tiles per step of the one program per scope that places the cut among tied candidates (its
#: scans over the tiles are sequential: few, wide steps).
CUT_BLOCK = 4096
_DIGIT, _BINS, _LEVELS = tl.constexpr(RADIX_BITS), tl.constexpr(1 << RADIX_BITS), tl.constexpr(RADIX_LEVELS)
#: The key that marks a tile's first ``n_forced + floor`` ranks in the candidate keys: the largest
#: int32 (a NaN's key), so the marks count as keys above every candidate and no count needs a rank.
_MARK = tl.constexpr(0x7FFFFFFF)


@triton.jit(do_not_specialize=["NB", "NQ", "LO", "W", "NW"])
def _adaptive_rank_kernel(S, CKEY, BITS, KIND, NB, NQ, LO, W, NW, BLOCK: tl.constexpr, HAS_KIND: tl.constexpr):
    """One tile's row of block shares (routing.block_log_mass; with kinds EMPTY blocks -inf, FORCED
    ones +inf): its first W ranks (descending share, ties to the lower block: :func:`_first`) as a
    bitmap over the blocks (``NW`` int32 words, bit ``j % 32`` of word ``j // 32``) and their keys
    in block order (a prefix-sum compaction), the first LO ranks marked (``_MARK``)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < NB
    x = tl.load(S + row * NB + offs, mask=ok, other=0.0)
    if HAS_KIND:
        x = _kind_scores(x, tl.load(KIND + (row // NQ) * NB + offs, mask=ok, other=0).to(tl.int32))
    key = _order_key(x)
    top = _first(key, ok, W)
    pos = tl.cumsum(top.to(tl.int32), axis=0) - 1
    tl.store(CKEY + row * W + pos, tl.where(_first(key, ok, LO), _MARK, key), mask=top)
    # distinct powers of two: their (wrapping int32) sum is their bitwise or
    words = tl.sum(tl.reshape(top.to(tl.int32) << (offs % 32), [BLOCK // 32, 32]), axis=1)
    w = tl.arange(0, BLOCK // 32)
    tl.store(BITS + row * NW + w, words, mask=w < NW)


@triton.jit
def _radix_prefix(HIST, g, take, LEVEL: tl.constexpr):
    """The digits of levels < LEVEL of the ``take``-th largest key of scope ``g`` (unsigned order:
    ``key + 2^31``, int64, the lower digits 0), from those levels' histograms, and how many keys have
    higher digits above them."""
    bins = tl.arange(0, _BINS)
    prefix = 0
    above = 0
    for level in tl.static_range(LEVEL):
        h = tl.load(HIST + (g * _LEVELS + level) * _BINS + bins)
        # the largest digit d with (keys above) + #{digit >= d} >= take
        d = tl.sum((above + tl.cumsum(h, axis=0, reverse=True) >= take).to(tl.int32), axis=0) - 1
        above = above + tl.sum(tl.where(bins > d, h, 0), axis=0)
        prefix = prefix + (d.to(tl.int64) << (32 - _DIGIT * (level + 1)))
    return prefix, above


@triton.jit(do_not_specialize=["n", "steps", "take"])
def _radix_kernel(CKEY, HIST, n, steps, take, LEVEL: tl.constexpr, BLOCK: tl.constexpr):
    """Level LEVEL's histogram of scope ``program_id(1)``'s ``n`` keys (from ``CKEY + g n``): the
    next digit of the keys whose higher digits are those of the ``take``-th largest, added into
    ``HIST`` with integer atomics (exact in any order)."""
    g = tl.program_id(1)
    prefix, _ = _radix_prefix(HIST, g, take, LEVEL)
    SHIFT: tl.constexpr = 32 - _DIGIT * (LEVEL + 1)
    base = CKEY + g.to(tl.int64) * n
    hist = tl.zeros([_BINS], dtype=tl.int32)
    for step in range(steps):
        offs = (tl.program_id(0).to(tl.int64) * steps + step) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        u = tl.load(base + offs, mask=ok, other=0).to(tl.int64) + 2147483648
        if LEVEL == 0:
            match = ok
        else:
            match = ok & ((u >> (SHIFT + _DIGIT)) == (prefix >> (SHIFT + _DIGIT)))
        hist += tl.histogram(((u >> SHIFT) & (_BINS - 1)).to(tl.int32), _BINS, mask=match)
    bins = tl.arange(0, _BINS)
    tl.atomic_add(HIST + (g * _LEVELS + LEVEL) * _BINS + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit(do_not_specialize=["tiles", "W", "LO", "per_prog", "take"])
def _tie_span_kernel(CKEY, HIST, AE, tiles, W, LO, per_prog, take, BLOCK: tl.constexpr):
    """Per tile of scope ``program_id(1)``: its candidates above the threshold ``t`` (the ``take``-th
    largest key, from the histograms) and those equal to it, as ``above | equal << 16``; the LO marks
    of every tile are no candidates (above ``t``, or equal where ``t`` is the largest key)."""
    g = tl.program_id(1)
    prefix, _ = _radix_prefix(HIST, g, take, _LEVELS)
    t = (prefix - 2147483648).to(tl.int32)
    marks_above = tl.where(t == _MARK, 0, LO)
    offs = tl.arange(0, BLOCK)
    for i in range(per_prog):
        tile = tl.program_id(0) * per_prog + i
        row = g.to(tl.int64) * tiles + tile
        ok = (offs < W) & (tile < tiles)
        key = tl.load(CKEY + row * W + offs, mask=ok, other=0)
        above = tl.sum((ok & (key > t)).to(tl.int32), axis=0) - marks_above
        equal = tl.sum((ok & (key == t)).to(tl.int32), axis=0) - (LO - marks_above)
        tl.store(AE + row, above | (equal << 16), mask=tile < tiles)


@triton.jit(do_not_specialize=["tiles", "C", "take", "nbits"])
def _tie_cut_kernel(AE, CUT, tiles, C, take, nbits, BLOCK: tl.constexpr):
    """Which ties at the threshold scope ``program_id(0)`` takes (routing.adaptive_counts: the lower
    candidate rank first, then the lower tile).  A tile's ties hold its candidate ranks
    ``[a, a + e)`` (``AE``: ``a | e << 16``), so ``T(u) = sum_i clamp(u, a_i, a_i + e_i) - a_i`` ties lie
    at ranks below ``u``; ``CUT[g] = (u, c)``: every tie at a rank below ``u`` (the largest with
    ``T(u) <= need``) goes, and one at rank ``u`` goes to each tile below ``c``.  Where every tie goes
    (the usual case), ``u = C`` and ``c = 0`` without a search."""
    g = tl.program_id(0)
    base = AE + g.to(tl.int64) * tiles
    offs = tl.arange(0, BLOCK)
    above = tl.zeros([BLOCK], dtype=tl.int32)
    equal = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(0, tiles, BLOCK):
        ae = tl.load(base + s + offs, mask=s + offs < tiles, other=0)
        above += ae & 0xFFFF
        equal += ae >> 16
    need = take - tl.sum(above, axis=0)  # ties to take
    rank = C + tl.zeros_like(need)
    cut = tl.zeros_like(need)
    if tl.sum(equal, axis=0) > need:
        rank = tl.zeros_like(need)
        below = tl.zeros_like(need)  # T(rank)
        for i in range(nbits):  # the largest u in [0, C] with T(u) <= need, bit by bit
            cand = rank | (1 << (nbits - 1 - i))
            n_below = tl.zeros([BLOCK], dtype=tl.int32)
            for s in range(0, tiles, BLOCK):
                ae = tl.load(base + s + offs, mask=s + offs < tiles, other=0)
                a = ae & 0xFFFF
                n_below += tl.minimum(tl.maximum(cand, a), a + (ae >> 16)) - a
            fits = (cand <= C) & (tl.sum(n_below, axis=0) <= need)
            rank = tl.where(fits, cand, rank)
            below = tl.where(fits, tl.sum(n_below, axis=0), below)
        seen = tl.zeros_like(need)  # tiles before this step with a tie at `rank`
        for s in range(0, tiles, BLOCK):
            ae = tl.load(base + s + offs, mask=s + offs < tiles, other=0)
            a = ae & 0xFFFF
            hit = (s + offs < tiles) & (a <= rank) & (rank < a + (ae >> 16))
            nth = seen + tl.cumsum(hit.to(tl.int32), axis=0)
            cut = tl.maximum(cut, tl.max(tl.where(hit & (nth == need - below), s + offs + 1, 0), axis=0))
            seen += tl.sum(hit.to(tl.int32), axis=0)
    tl.store(CUT + g * 2, rank)
    tl.store(CUT + g * 2 + 1, cut)


@triton.jit(do_not_specialize=["NB", "NQ", "W", "LO", "NW", "tiles"])
def _adaptive_pick_kernel(CKEY, BITS, AE, CUT, MASK, KIND, CNT, TCOUNT, NB, NQ, W, LO, NW, tiles,
                          BLOCK: tl.constexpr, HAS_KIND: tl.constexpr):
    """One tile, over its blocks: its count (LO, its candidates above the threshold and its share of
    the ties), its blocks (the first ``count`` of its W ranks, from the rank kernel's bitmap and keys:
    :func:`_first` on the marked keys, whose marks are its first LO ranks) in the forward kernel's
    order, then the rest of the W in block order, as its idx row over its keys' row (in place, after
    a barrier); its whole mask row, the counts."""
    row = tl.program_id(0).to(tl.int64)
    g = row // tiles
    ae = tl.load(AE + row)
    a = ae & 0xFFFF
    e = ae >> 16
    rank = tl.load(CUT + g * 2)
    taken = tl.minimum(tl.maximum(rank, a), a + e)
    taken += ((a <= rank) & (rank < a + e) & (row % tiles < tl.load(CUT + g * 2 + 1))).to(tl.int32)
    count = LO + taken
    offs = tl.arange(0, BLOCK)
    ok = offs < NB
    word = tl.load(BITS + row * NW + offs // 32, mask=ok, other=0)
    member = ok & (((word >> (offs % 32)) & 1) != 0)  # block among the tile's first W ranks
    slot = tl.cumsum(member.to(tl.int32), axis=0) - 1  # its entry in the keys' row (block order)
    own = _first(tl.load(CKEY + row * W + slot, mask=member, other=0), member, count)
    if HAS_KIND:
        kind = tl.load(KIND + (row // NQ) * NB + offs, mask=ok, other=0).to(tl.int32)
    else:
        kind = tl.zeros([BLOCK], dtype=tl.int32)
    pos, n_full, n_used = _kind_order(own, kind)
    pos = tl.where(own, pos, count + tl.cumsum((member & ~own).to(tl.int32), axis=0) - 1)
    tl.debug_barrier()  # every key of the row is read before any is overwritten
    tl.store(CKEY + row * W + pos, offs, mask=member)
    tl.store(MASK + row * NB + offs, own.to(tl.int8), mask=ok)
    tl.store(CNT + row * 2, n_full)
    tl.store(CNT + row * 2 + 1, n_used)
    tl.store(TCOUNT + row, count)


def _warps(block: int) -> int:
    return max(1, block // TOP_BLOCKS_PER_WARP)


class AdaptiveBlocks:
    """Adaptive routing's selection in Triton kernels (routing.adaptive_route's ``select`` on the
    Triton backend): the same idx, mask, counts and tile counts as :class:`routing.SortedAdaptive`,
    bit for bit, without its sorts.

    Per score chunk one launch (:func:`_adaptive_rank_kernel`: each tile's first ``width`` ranks as a
    bitmap over its blocks, and their keys in block order, the first ``n_forced + floor`` marked);
    then the threshold of each scope by radix selection over the candidate keys (``RADIX_LEVELS``
    launches of :func:`_radix_kernel`), each tile's candidates above and at it
    (:func:`_tie_span_kernel`), the cut among the ties (:func:`_tie_cut_kernel`) and each tile's list
    and mask row (:func:`_adaptive_pick_kernel`, which writes the idx over the keys).  A tile's count
    of candidates at least ``t`` needs no sorted candidates: the ranks are in descending order, so it
    is the number of its keys at least ``t`` (marks included) less the marks.

    Memory: the keys (4 bytes per (tile, rank below ``width``), which become the idx) and the bitmap
    (a bit per (tile, block)) while the score chunks are ranked; the mask (a byte per (tile, block))
    only from :meth:`finish`, after the score chunks are freed."""

    def __init__(self, bh: int, nq: int, nb: int, floor: int, n_forced: int, width: int, device, block: int):
        self.floor, self.lo, self.block, self.nb = floor, n_forced + floor, block, nb
        self.wblock = next(w for w in TOP_BLOCKS_WIDTHS if w >= width)
        self.nw = -(-nb // 32)
        self.ckey = torch.empty(bh, nq, width, dtype=torch.int32, device=device)
        self.bits = torch.empty(bh, nq, self.nw, dtype=torch.int32, device=device)
        #: set to a dict to keep copies of the intermediates (scripts/adaptive_select_gpu_check.py)
        self.trace: dict | None = None

    def rank(self, score: torch.Tensor, s: int, kinds_rows: torch.Tensor | None) -> None:
        r, nq, nb = score.shape
        e = s + r
        _adaptive_rank_kernel[(r * nq,)](score, self.ckey[s:e], self.bits[s:e],
                                         kinds_rows if kinds_rows is not None else self.bits, nb, nq, self.lo,
                                         self.ckey.shape[-1], self.nw, BLOCK=self.block,
                                         HAS_KIND=kinds_rows is not None, num_warps=_warps(self.block))

    def finish(self, budget: int, scope: str, kinds_rows: torch.Tensor | None, rows: int):
        bh, nq, width = self.ckey.shape
        dev = self.ckey.device
        groups = 1 if scope == "call" else bh
        tiles = bh * nq // groups
        n = tiles * width
        # the marks of every tile's first lo ranks count among the keys, above every candidate
        take_marked = budget + (self.lo - self.floor) * tiles
        hist = torch.zeros(groups, RADIX_LEVELS, 1 << RADIX_BITS, dtype=torch.int32, device=dev)
        steps = -(-n // RADIX_BLOCK)
        progs = min(steps, RADIX_PROGRAMS)
        steps = -(-steps // progs)
        for level in range(RADIX_LEVELS):
            _radix_kernel[(progs, groups)](self.ckey, hist, n, steps, take_marked, LEVEL=level, BLOCK=RADIX_BLOCK,
                                           num_warps=4)
        ae = torch.empty(bh, nq, dtype=torch.int32, device=dev)
        per = -(-tiles // TIE_PROGRAMS)
        _tie_span_kernel[(-(-tiles // per), groups)](self.ckey, hist, ae, tiles, width, self.lo, per, take_marked,
                                                    BLOCK=self.wblock, num_warps=_warps(self.wblock))
        cut = torch.empty(groups, 2, dtype=torch.int32, device=dev)
        c = width - self.lo
        _tie_cut_kernel[(groups,)](ae, cut, tiles, c, budget - self.floor * tiles, c.bit_length(), BLOCK=CUT_BLOCK,
                                   num_warps=4)
        if self.trace is not None:
            self.trace.update(ckey=self.ckey.clone(), bits=self.bits.clone(), hist=hist.clone(), ae=ae.clone(),
                              cut=cut.clone(), take_marked=take_marked)
        mask = torch.empty(bh, nq, self.nb, dtype=torch.int8, device=dev)  # every row written by the pick
        counts = torch.empty(bh, nq, 2, dtype=torch.int32, device=dev)
        tile_count = torch.empty(bh, nq, dtype=torch.int32, device=dev)
        _adaptive_pick_kernel[(bh * nq,)](self.ckey, self.bits, ae, cut, mask,
                                          kinds_rows if kinds_rows is not None else mask, counts, tile_count,
                                          self.nb, nq, width, self.lo, self.nw, tiles, BLOCK=self.block,
                                          HAS_KIND=kinds_rows is not None, num_warps=_warps(self.block))
        idx = self.ckey  # the pick wrote each tile's list over its keys
        del self.ckey, self.bits
        return idx, mask, counts, tile_count


def adaptive_blocks(bh: int, nq: int, nb: int, floor: int, n_forced: int, width: int, device):
    """routing.adaptive_route's selector on the Triton backend (fp32 shares, as its pre-scan writes):
    :class:`AdaptiveBlocks`, or :class:`routing.SortedAdaptive` where a row is wider than the
    kernels' widest (``TOP_BLOCKS_WIDTHS``) or a call has 2^31 candidate keys (int32 counts)."""
    block = next((w for w in TOP_BLOCKS_WIDTHS if w >= nb), None)
    if block is None or bh * nq * width >= 1 << 31:
        return SortedAdaptive(bh, nq, nb, floor, n_forced, width, device)
    return AdaptiveBlocks(bh, nq, nb, floor, n_forced, width, device, block)


@triton.jit
def _exact_block(K, V, VALID, b, h, j, N, skb, skh, skn, svb, svh, svn, s_valid_b, offs_d, dmask,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, KV_TMA: tl.constexpr):
    """K and V tiles of key block ``j`` and which of its rows are valid keys.  A MASKED block (one
    with an invalid key: routing.PARTIAL) is read through pointers, its invalid keys never loaded (a
    padded value holding NaN must not meet its zero weight); in every other block each row inside
    the sequence is a valid key, so with KV_TMA K and V are tensor descriptors (Hopper's bulk
    tensor copies; rows past N read as 0)."""
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    kok = offs_n < N
    if KV_TMA:
        k = K.load([b, h, j * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D)
        v = V.load([b, h, j * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        if MASKED:
            kok = kok & (tl.load(VALID + b64 * s_valid_b + offs_n, mask=offs_n < N, other=0) != 0)
        kv_mask = kok[:, None] & dmask[None, :]
        k = tl.load(K + b64 * skb + h64 * skh + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b64 * svb + h64 * svh + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
    return k, v, kok


@triton.jit
def _softmax_step(q, k, v, kok, m_i, l_i, acc, qk_scale):
    """One exact key block into the online softmax.  Raw logits; the scale is folded into one FMA
    with the max (base-2 units)."""
    qk = tl.where(kok[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # accumulate in place (no temporary)
    return m_new, l_i, acc


@triton.jit
def _exact_phase(q, m_i, l_i, acc, KD, VD, K, V, VALID, IDX, n_full, n_used, b, h, N,
                 skb, skh, skn, svb, svh, svn, s_valid_b, offs_d, dmask, qk_scale,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, KV_TMA: tl.constexpr):
    """Phase 1: exact attention over the blocks ``IDX[0:n_used]``, of which the first ``n_full``
    have no invalid key: those take the unmasked loads (descriptors ``KD`` / ``VD`` with KV_TMA),
    only the few after them (SPLIT: keys may be masked) the masked pointer loads of ``K`` / ``V``.
    EMPTY blocks (listed after ``n_used``) would add exactly nothing and are not visited."""
    for i in range(0, n_full):
        k, v, kok = _exact_block(KD, VD, VALID, b, h, tl.load(IDX + i), N, skb, skh, skn, svb, svh, svn,
                                 s_valid_b, offs_d, dmask, BLOCK_N, BLOCK_D, False, KV_TMA)
        m_i, l_i, acc = _softmax_step(q, k, v, kok, m_i, l_i, acc, qk_scale)
    if SPLIT:
        # (a few blocks a tile: not software-pipelined, which would only add its buffers and prologue)
        for i in tl.range(n_full, n_used, num_stages=1):
            k, v, kok = _exact_block(K, V, VALID, b, h, tl.load(IDX + i), N, skb, skh, skn, svb, svh, svn,
                                     s_valid_b, offs_d, dmask, BLOCK_N, BLOCK_D, True, False)
            m_i, l_i, acc = _softmax_step(q, k, v, kok, m_i, l_i, acc, qk_scale)
    return m_i, l_i, acc


@triton.jit
def _tail_phase(q, m_i, l_i, g_i, acc, SEL, KBAR, VMEAN, BLEN, Q2, KVAR, tile, bh, b64, nb_tail, NB, D,
                offs_d, dmask, qk_scale, sm_scale, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                TAIL_STAGES: tl.constexpr, LOGNORMAL: tl.constexpr, TAIL_TMA: tl.constexpr):
    """Phase 2: the zeroth-order tail over every non-selected, non-empty block among the first
    ``nb_tail`` (centroid logits), in the same online softmax (``acc``, ``l`` and the tail mass
    ``g`` rescaled together).  Returns the softmax state and, for the plain tail, the valid keys
    it scanned (phase 3's mean moment)."""
    total = 0.0
    sel_base = SEL + tile * NB
    if LOGNORMAL:
        # c_ij = s^2/2 E_i[q^2] . Var_j[k] (log-normal mass), base-2 units: the tile's mean q^2
        # once, then one D-vector dot per centroid.
        q2 = tl.load(Q2 + tile * D + offs_d, mask=dmask, other=0.0) * (0.5 * sm_scale * sm_scale * _LOG2E_IN_KERNEL)
    for j0 in tl.range(0, nb_tail, GROUP, num_stages=TAIL_STAGES):
        offs_j = j0 + tl.arange(0, GROUP)
        jm = offs_j < NB
        cmask = jm[:, None] & dmask[None, :]
        coff = (bh.to(tl.int64) * NB + offs_j[:, None]) * D + offs_d[None, :]
        if TAIL_TMA:  # [BH, NB, D] descriptors: rows past NB read as 0
            kb = KBAR.load([bh, j0, 0]).reshape(GROUP, BLOCK_D)
        else:
            kb = tl.load(KBAR + coff, mask=cmask, other=0.0)
        nj = tl.load(BLEN + b64 * NB + offs_j, mask=jm, other=0.0)
        if not LOGNORMAL:
            total += tl.sum(nj, axis=0)
        ok = (tl.load(sel_base + offs_j, mask=jm, other=1) == 0) & (nj > 0)
        if LOGNORMAL:
            if TAIL_TMA:
                kv = KVAR.load([bh, j0, 0]).reshape(GROUP, BLOCK_D)
            else:
                kv = tl.load(KVAR + coff, mask=cmask, other=0.0)
            c = tl.sum(kv.to(tl.float32) * q2[None, :], axis=1)
            # Samuelson's bound (routing.cap_mass_bias), in base-2 units: c <= sqrt(2 c (n - 1)).
            c = tl.minimum(c, tl.sqrt(c * tl.maximum(nj - 1.0, 0.0) * _TWO_LOG2E))
            # n_j e^{z + c}: the block's length, its log-normal correction and the selection
            # mask ride in one bias per centroid, so each logit costs one FMA (and the valid
            # key count comes from the host): 4-6 % faster for this tail; for the plain tail
            # the same form measured 6-10 % slower (docs/kernels.md, log entry 16).
            bias = tl.where(ok, tl.math.log2(tl.maximum(nj, 1.0)) + c, float("-inf"))
            zc = tl.dot(q, tl.trans(kb)) * qk_scale + bias[None, :]
        else:
            zc = tl.dot(q, tl.trans(kb)) * qk_scale  # centroid logits, base-2 units
            zc = tl.where(ok[None, :], zc, float("-inf"))
        if TAIL_TMA:
            vm = VMEAN.load([bh, j0, 0]).reshape(GROUP, BLOCK_D)
        else:
            vm = tl.load(VMEAN + coff, mask=cmask, other=0.0)
        m_new = tl.maximum(m_i, tl.max(zc, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha
        g_i = g_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
        # n_j e^{z - m}: the block's token-weighted tail mass, which multiplies the value mean
        # (n_j v̄_j = V̂_j) and adds to g.
        if LOGNORMAL:
            wn = tl.math.exp2(zc - m_i[:, None])  # n_j is in the bias
        else:
            wn = tl.math.exp2(zc - m_i[:, None]) * nj[None, :]
        acc = tl.dot(wn.to(vm.dtype), vm, acc)
        g_i = g_i + tl.sum(wn, axis=1)
    return m_i, l_i, g_i, acc, total


@triton.jit(do_not_specialize=["N", "NB", "NQ", "KT", "ND"])
def _pisa_fwd_kernel(Q, KD, VD, K, V, O, VALID, IDX, CNT, SEL, KBAR, VMEAN, BLEN, HSUM, Q2, KVAR, TOTAL,
                     PERM, DROWS, DFLAG, DIDX, DCNT, TORD,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, s_valid_b,
                     N, NB, NQ, H, D, KT, ND, qk_scale, sm_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     GROUP: tl.constexpr, TAIL_STAGES: tl.constexpr, ORDER: tl.constexpr,
                     SPLIT: tl.constexpr, LOGNORMAL: tl.constexpr, KV_TMA: tl.constexpr,
                     TAIL_TMA: tl.constexpr, HAS_PERM: tl.constexpr, HAS_DENSE: tl.constexpr,
                     TILE_COUNTS: tl.constexpr, REORDER: tl.constexpr):
    # Programs: one per (query tile, batch x head); with dense query rows (HAS_DENSE) also one per
    # (tile of ND dense rows, batch x head), numbered FIRST: each runs over every key block, several
    # times a regular program's work, so it must start early and not trail the launch.
    # TILE_COUNTS (adaptive routing): each tile's own number of exact blocks, from CNT.  REORDER:
    # the regular programs take their tiles (bh * NQ + qt) from TORD, in the order of the launch
    # (heaviest first, so no long tile starts in the last wave).
    if HAS_DENSE:
        n_dt = tl.cdiv(ND, BLOCK_M)
        n_dense = n_dt * tl.num_programs(1)
        lin = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        dense = lin < n_dense
        r = tl.where(dense, lin, lin - n_dense)
        if REORDER:
            r = tl.where(dense, r, tl.load(TORD + r, mask=lin >= n_dense, other=0))
        per = tl.where(dense, n_dt, NQ)
        bh = r // per
        qt = r % per
    elif REORDER:
        t = tl.load(TORD + tl.program_id(1) * NQ + tl.program_id(0))
        bh = t // NQ
        qt = t % NQ
    else:
        qt = tl.program_id(0)
        bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    tile = bh.to(tl.int64) * NQ + qt
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    # rows: where each row of this program sits in q and the output (the input order; a token
    # order reads and writes through PERM, so the output needs no scatter).
    mrow = offs_m < N
    if HAS_PERM:
        rows = tl.load(PERM + offs_m, mask=mrow, other=0).to(tl.int64)
    else:
        rows = offs_m.to(tl.int64)
    store = mrow
    idx_base = IDX + tile * KT
    cnt_base = CNT + tile * 2
    kt = KT
    nb_tail = NB
    if HAS_DENSE:
        if dense:  # ND dense rows (input positions), exact over every block, no tail
            mrow = offs_m < ND
            rows = tl.load(DROWS + offs_m, mask=mrow, other=0).to(tl.int64)
            store = mrow
            idx_base = DIDX + b64 * NB
            cnt_base = DCNT + b64 * 2
        else:  # a regular tile leaves its dense rows to their own programs
            store = mrow & (tl.load(DFLAG + offs_m, mask=mrow, other=1) == 0)
        kt = tl.where(dense, NB, KT)
        nb_tail = tl.where(dense, 0, NB)
    q = tl.load(Q + b64 * sqb + h64 * sqh + rows[:, None] * sqn + offs_d[None, :],
                mask=mrow[:, None] & dmask[None, :], other=0.0)
    # Finite "minus infinity" for the running max: a fully masked block then yields p = 0 and
    # alpha = 1 instead of NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    g_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if SPLIT:  # full blocks first, then the partial ones (routing.Selection.counts)
        n_full = tl.load(cnt_base)
        n_used = tl.load(cnt_base + 1)
    elif TILE_COUNTS:  # this tile's own count (every block full here: no key is masked)
        n_used = tl.load(cnt_base + 1)
        n_full = n_used
    else:
        n_full = kt
        n_used = kt
    m_i, l_i, acc = _exact_phase(q, m_i, l_i, acc, KD, VD, K, V, VALID, idx_base, n_full, n_used, b, h, N,
                                 skb, skh, skn, svb, svh, svn, s_valid_b, offs_d, dmask, qk_scale,
                                 BLOCK_N, BLOCK_D, SPLIT, KV_TMA)
    if ORDER >= 0:
        m_i, l_i, g_i, acc, total = _tail_phase(q, m_i, l_i, g_i, acc, SEL, KBAR, VMEAN, BLEN, Q2, KVAR, tile,
                                                bh, b64, nb_tail, NB, D, offs_d, dmask, qk_scale, sm_scale,
                                                BLOCK_D, GROUP, TAIL_STAGES, LOGNORMAL, TAIL_TMA)
        if LOGNORMAL:
            total = tl.load(TOTAL + b)

    den = l_i + g_i
    safe = tl.where(den > 0, den, 1.0)
    out = acc / safe[:, None]
    # Phase 3: hybrid first order, (g / den) * scale * q @ (HSUM / valid keys), added after the
    # normalisation so the row weight g / den (the tail's share, <= 1) keeps fp16 in range; it is
    # accumulated into ``out`` by the product itself (no D-wide temporary).  (g = 0 in a dense
    # program: it adds nothing.)
    if ORDER == 1:
        hm = tl.load(HSUM + bh.to(tl.int64) * D * D + offs_d[:, None] * D + offs_d[None, :],
                     mask=dmask[:, None] & dmask[None, :], other=0.0)
        hm = (hm * (sm_scale / tl.maximum(total, 1.0))).to(q.dtype)
        out = tl.dot((q.to(tl.float32) * (g_i / safe)[:, None]).to(q.dtype), hm, out)
    tl.store(O + b64 * sob + h64 * soh + rows[:, None] * son + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=store[:, None] & dmask[None, :])


#: Launch configurations that fit, found per (capability, dtype, block, head dim, ...): see _launch;
#: None where none does.
_FITTING: dict[tuple, dict | None] = {}


def _launch_config(block_n: int, block_d: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int]:
    """(num_warps, num_stages, tail_stages) to try first: 8 warps for 128-row tiles of D=128;
    software pipelines as deep as Hopper's shared memory allows for 64-token bf16 blocks (measured
    best, docs/kernels.md); shallower for larger tiles.  :func:`_launch` steps down from here when a
    GPU has less shared memory (sm80: 164 KB; sm86/89: 100 KB)."""
    warps = 8 if block_d >= 128 else 4
    if dtype == torch.float32:
        return warps, 1, 1
    if block_n > 64:
        return warps, 2, 2
    return warps, 3, TAIL_STAGES


def _fallbacks(cfg: tuple[int, int, int]) -> list[dict]:
    """The configuration and then shallower pipelines, tail first: shared memory shrinks each step."""
    warps, stages, tail = cfg
    out = [dict(num_warps=warps, num_stages=stages, TAIL_STAGES=tail)]
    while tail > 1 or stages > 1:
        if tail > 1:
            tail -= 1
        else:
            stages -= 1
        out.append(dict(num_warps=warps, num_stages=stages, TAIL_STAGES=tail))
    return out


def _launch(kernel, grid, key: tuple, configs: list[dict], *args, **meta):
    """Launch with the first of ``configs`` whose shared memory fits this GPU (cached per key);
    :class:`KernelDoesNotFit` when none does (cached too: later calls raise at once)."""
    key = (key, tuple(sorted(meta.items())))
    known = _FITTING.get(key, ())
    if known is not None:
        for cfg in ([known] if known else []) + configs:
            try:
                compiled = kernel[grid](*args, **meta, **cfg)
            except triton.runtime.errors.OutOfResources:
                continue
            _FITTING[key] = cfg
            return compiled
        _FITTING[key] = None
    raise KernelDoesNotFit(f"no launch configuration of {kernel.__name__} fits this GPU's shared memory "
                           f"(capability, dtype, block, head dim, ...: {key[0]})")


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _tma_ok(tensors, d: int) -> bool:
    """Whether ``tensors`` can be read through tensor descriptors: sm90+, 16-bit, a power-of-two
    head dim (a box is whole rows), 16-byte aligned bases and strides."""
    t0 = tensors[0]
    if t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    if d != _block_d(d) or TensorDescriptor is None:
        return False
    return all(t.dtype in (torch.float16, torch.bfloat16) and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s > 0 and (s * t.element_size()) % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


def _descriptors(tensors, box: list[int]):
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), box) for t in tensors)


@dataclass(frozen=True)
class DenseRows:
    """Query rows that attend every key exactly (``dense_q``), as the forward kernel takes them."""

    rows: torch.Tensor  # int64 [ND]: their positions in q and the output (the input order)
    flags: torch.Tensor  # int8 [N], processing order: 1 at those rows (their tiles do not write them)
    idx: torch.Tensor  # int32 [B, NB]: every block, full ones first (routing.exact_order)
    counts: torch.Tensor  # int32 [B, 2]: the full and the non-empty blocks of ``idx``


def pool_chunks(nb: int, bh: int, device: torch.device) -> tuple[int, int]:
    """(key blocks per program, programs per batch x head) of the pooling kernel's launch: about
    ``POOL_PROGRAMS_PER_SM`` programs an SM in all, at least ``POOL_MIN_BLOCKS`` blocks each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _DEFAULT_SMS
    want = -(-POOL_PROGRAMS_PER_SM * sms // bh)
    bpp = max(POOL_MIN_BLOCKS, -(-nb // want))
    return bpp, -(-nb // bpp)


def pool(q, k, v, *, valid, block: int, first_order: bool, cov: bool, lognormal: bool = False,
         perm: torch.Tensor | None = None, kv_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> PooledStats:
    """Pooled statistics with the Triton pre-scan.  q, k, v: ``[B, H, N, D]`` views (unit stride on D)
    in the processing order, or in the input order with ``perm`` (int64 ``[N]``: the input position
    of each processing position), which then also writes k and v in the processing order into
    ``kv_out`` (two contiguous ``[B, H, N, D]`` buffers, for :func:`attend`).  ``valid``: int8
    ``[B, N]`` in the processing order, or None.  For bf16 / fp16 inputs the value statistics come
    only as ``vmean_lp`` (``vsum`` is None): the forward kernel reads nothing else."""
    b, h, n, d = q.shape
    nb, nq = num_blocks(n, block), num_blocks(n, QUERY_TILE)
    dev = q.device
    bd = _block_d(d)
    lp = q.dtype in (torch.float16, torch.bfloat16)
    kbar = torch.empty(b * h, nb, d, dtype=torch.float32, device=dev)
    vsum = kbar if lp else torch.empty_like(kbar)  # (a placeholder where the kernel never writes it)
    # The key variances feed only the forward kernel's tail: stored in its (16-bit) input dtype.
    kvar = torch.empty(b * h, nb, d, dtype=q.dtype if lp else torch.float32, device=dev) if lognormal else kbar
    blen = torch.empty(b, nb, dtype=torch.float32, device=dev)
    bpp, chunks = pool_chunks(nb, b * h, dev)
    hsum = torch.zeros(b * h, d, d, dtype=torch.float32, device=dev) if first_order else kbar
    covn = torch.empty(b * h, nb, dtype=torch.float32, device=dev) if cov else kbar
    kbar_lp = torch.empty(b * h, nb, d, dtype=q.dtype, device=dev) if lp else kbar
    vmean_lp = torch.empty_like(kbar_lp) if lp else vsum
    valid_t = valid if valid is not None else blen
    if perm is not None:
        kp, vp = kv_out
        assert kp.shape == k.shape and vp.shape == v.shape and kp.is_contiguous() and vp.is_contiguous()
    perm_t, kp, vp = (perm, kp, vp) if perm is not None else (blen, kbar, kbar)  # (placeholders: never read)
    key = ("pool", torch.cuda.get_device_capability(dev) if dev.type == "cuda" else "cpu", k.dtype, block, d,
           first_order, cov, valid is not None, lognormal)
    dsplit = POOL_DSPLIT if first_order and not cov and not lognormal and bd >= 128 else 1
    _launch(_pool_k_kernel, (chunks * dsplit, b * h), key, POOL_CONFIGS,
            k, v, valid_t, perm_t, kp, vp, kbar, vsum, kbar_lp, vmean_lp, blen, hsum, covn, kvar,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            valid.stride(0) if valid is not None else 0,
            n, nb, h, d, bpp,
            BLOCK=block, BLOCK_D=bd, HAS_VALID=valid is not None, HAS_PERM=perm is not None, MOMENT=first_order,
            COV=cov, WRITE_LP=lp, SECOND=lognormal, KVAR_MAX=torch.finfo(kvar.dtype).max,
            EXACT_DOT=k.dtype == torch.float32, DSPLIT=dsplit)
    qbar = torch.empty(b * h, nq, d, dtype=torch.float32, device=dev)
    q2 = torch.empty_like(qbar) if lognormal else qbar
    _pool_q_kernel[(nq, b * h)](q, perm_t, qbar, q2, q.stride(0), q.stride(1), q.stride(2), n, nq, h, d,
                                BLOCK_M=QUERY_TILE, BLOCK_D=bd, SECOND=lognormal, HAS_PERM=perm is not None,
                                num_warps=4)
    return PooledStats(qbar=qbar, kbar=kbar, vsum=None if lp else vsum, blen=blen,
                       hsum=hsum if first_order else None, covnorm=covn if cov else None,
                       kbar_lp=kbar_lp if lp else None, vmean_lp=vmean_lp if lp else None,
                       q2=q2 if lognormal else None, kvar=kvar if lognormal else None)


def tile_order(sel: Selection, rows: slice = slice(None)) -> torch.Tensor:
    """int32 ``[BH * NQ]``: the tiles (``bh * NQ + qt``; ``rows``: of those batch x heads only,
    counted from their first) by descending count of visited exact blocks
    (``sel.counts[..., 1]``; ties in tile order), the order in which the forward launch takes them:
    a tile's cost is its exact blocks plus one tail scan the same for every tile, so the longest
    start first and the last wave holds the shortest (longest-processing-time-first)."""
    cost = sel.counts[rows, :, 1].reshape(-1)
    return torch.sort(cost, descending=True, stable=True).indices.to(torch.int32)


def attend(q, k, v, out, *, valid, stats: PooledStats, sel: Selection, scale: float, block: int,
           order: int, perm: torch.Tensor | None = None, dense: DenseRows | None = None,
           tma: bool = True, reorder: bool = True, return_kernel: bool = False):
    """Run the fused forward kernel, writing into ``out``.  ``k``, ``v``: ``[B, H, N, D]`` views in
    the processing order (with a token order: :func:`pool`'s copies); ``q`` and ``out`` the same,
    or, with ``perm``, in the input order (rows read and written through it).  ``valid``: int8
    ``[B, N]`` in the processing order, or None; with it ``sel.counts`` splits each tile's blocks
    into unmasked and masked ones.  ``dense``: query rows computed exactly over every key by
    programs of their own.  ``tma=False`` reads every tile through pointers even where tensor
    descriptors would do, and ``reorder=False`` launches an adaptive selection's tiles in tile order
    instead of heaviest first (:func:`tile_order`); both for A/B timing, the library keeps the
    defaults.  With ``return_kernel`` it returns Triton's compiled kernel (register
    and spill counts) instead.  ``stats.kvar`` (the log-normal tail) comes from :func:`pool` with
    ``lognormal=True``."""
    b, h, n, d = q.shape
    nb, nq = num_blocks(n, block), num_blocks(n, QUERY_TILE)
    dev = q.device
    lp = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    eff_order = order if not sel.all_blocks else -1
    kbar = stats.kbar_lp if stats.kbar_lp is not None else stats.kbar.to(lp)
    vmean = stats.vmean_lp if stats.vmean_lp is not None else \
        (stats.vsum / stats.blen.clamp_min(1.0).repeat_interleave(h, dim=0).unsqueeze(-1)).to(lp)
    hsum = stats.hsum if eff_order == 1 else stats.kbar
    split = valid is not None
    if split and sel.counts is None:
        raise ValueError("a call with kv_valid needs the selection's counts (route with block kinds)")
    valid_t = valid if valid is not None else stats.blen
    lognormal = stats.kvar is not None and eff_order >= 0
    q2, kvar = (stats.q2, stats.kvar) if lognormal else (stats.kbar, kbar)
    # Tensor descriptors (TMA) on sm90+: K / V of the exact blocks without invalid keys (the
    # masked ones read through pointers) and the tail's centroids, value means and key variances.
    kv_tma = tma and _tma_ok((k, v), d)
    tail_tma = tma and eff_order >= 0 and _tma_ok((kbar, vmean, kvar), d)
    kk, vv = _descriptors((k, v), [1, 1, block, d]) if kv_tma else (k, v)
    kbar_a, vmean_a, kvar_a = _descriptors((kbar, vmean, kvar), [1, TAIL_GROUP, d]) if tail_tma \
        else (kbar, vmean, kvar)
    cfg = _launch_config(block, _block_d(d), dev, q.dtype)
    key = (torch.cuda.get_device_capability(dev) if dev.type == "cuda" else "cpu", q.dtype, block, d, eff_order,
           lognormal, kv_tma, tail_tma, cfg)
    # valid keys per batch element (phase 3's mean moment); the plain tail sums them in its scan
    total = stats.blen.sum(-1) if lognormal and eff_order == 1 else stats.blen
    n_dense = dense.rows.numel() if dense is not None else 0
    grid = (nq + num_blocks(n_dense, QUERY_TILE), b * h)
    ph = stats.blen  # a placeholder for the pointers a configuration never reads
    tile_counts = sel.tile_count is not None
    tord = tile_order(sel) if tile_counts and reorder else None
    compiled = _launch(
        _pisa_fwd_kernel, grid, key, _fallbacks(cfg),
        q, kk, vv, k, v, out, valid_t, sel.idx, sel.counts if sel.counts is not None else sel.idx, sel.mask,
        kbar_a, vmean_a, stats.blen, hsum, q2, kvar_a, total,
        perm if perm is not None else ph, *((dense.rows, dense.flags, dense.idx, dense.counts) if dense else (ph,) * 4),
        tord if tord is not None else ph,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        valid.stride(0) if valid is not None else 0,
        n, nb, nq, h, d, sel.count, n_dense, scale * LOG2E, scale,
        BLOCK_M=QUERY_TILE, BLOCK_N=block, BLOCK_D=_block_d(d), GROUP=TAIL_GROUP, ORDER=eff_order,
        SPLIT=split, LOGNORMAL=lognormal, KV_TMA=kv_tma, TAIL_TMA=tail_tma, HAS_PERM=perm is not None,
        HAS_DENSE=dense is not None, TILE_COUNTS=tile_counts, REORDER=tord is not None)
    return compiled if return_kernel else out
