"""The PISA forward kernel for Hopper (sm90), written in Gluon with FlashAttention-3's structure.

Why a second kernel: the Triton kernel's exact loop runs at about 440 TFLOP/s on an H200 where
cuDNN's dense attention runs at 569 (docs/kernels.md): Triton's software pipeline puts CTA-wide
barriers in the loop, so the two warpgroups of a program cannot overlap one's softmax with the
other's tensor-core work, and Triton's automatic warp specialization does not apply to it on sm90.
Gluon (``triton.experimental.gluon``, shipped inside Triton) lets the kernel say who does what:

* **one loader warp** issues the TMA copies into a ring of ``SLOTS`` shared-memory slots of 64
  rows of K and of V, each with a *ready* mbarrier (the copy's bytes arrived) and an *empty* one
  (both consumers are done with it): the exact blocks by index (each selected block is a contiguous
  tile, so a plain box at row ``j * BLOCK_N`` is the gather; a block of 128 takes two slots), then
  the tail's centroid and value-mean tiles (contiguous too), 64 per slot.  Two slots make one
  ``[128, D]`` tile (a step of the ring: the slots are its row halves), so a step's ``QK^T`` is
  one N = 128 wgmma;
* **two consumer warpgroups**, each owning 64 of the query tile's 128 rows, run the same online
  softmax as the Triton kernel, 128 keys (two slots) per step: the softmax's fixed cost per step
  (barrier waits, the row max and sum, rescaling the accumulator, waiting for the tensor cores) is
  paid once per 128 keys, as cuDNN's and FlashAttention-3's 128-key steps do, while the routing keeps
  its 64-key blocks (an odd count: the last step's second slot repeats the last block, masked).
  Exact blocks (``QK^T`` and ``PV`` as async ``wgmma``), then the zeroth-order tail over every
  unselected block's centroid (each logit plus its
  tile's bias, :func:`pisa_kernels.triton_kernels.tail_bias`: the block's length and, with the
  log-normal tail, its mass correction), then the first-order term ``(g / den) * q @ Hmean``.  The warp
  scheduler interleaves the two warpgroups: while one runs its softmax, the other's wgmma uses the
  tensor cores; registers are rebalanced towards them (the loader keeps 24).

What it covers (:func:`unsupported_reason`): 16-bit inputs, head dim 64 or 128, key blocks of 64
or 128 tokens (at most the head dim), K and V addressable as ``[B*H, N, D]`` with 16-byte aligned
strides (the node's tiled token order always gives contiguous copies), every routing (top-k,
covariance, adaptive with its per-tile counts and heaviest-first order), tails plain and log-normal, orders -1/0/1, token orders,
dense query rows (programs of their own, numbered first) and key padding with a token order.  Every
GPU other than sm90 takes the Triton kernel: the caller (:mod:`pisa_kernels.api`) falls back, once
with a warning, if this kernel cannot compile or launch.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .routing import QUERY_TILE, PooledStats, Selection, num_blocks, routing_chunk_bytes
from .triton_kernels import tail_bias, tile_order

LOG2E = 1.4426950408889634

#: Rows of the query tile each consumer warpgroup owns (wgmma's M per warpgroup).
HALF_TILE = QUERY_TILE // 2
#: Shared memory of one program on sm90 (227 KB), and what the compiler adds to the buffers below
#: for its layout conversions and reductions (measured: 16.1 KB at head dim 128, Triton 3.6).
SMEM_BYTES = 232448
SMEM_SCRATCH = 17 << 10
#: Rows of K and of V in one ring slot (one TMA box each), and the ring's depth: as many slots as
#: the shared memory allows, at most this (the loader runs up to four steps ahead).
SLOT = 64
MAX_SLOTS = 8
#: Registers per thread: the kernel's cap (12 warps: 168 x 384 fills the register file of one SM),
#: the loader warp's (the minimum) and the second consumer's; the first consumer gets the rest.
MAX_REGS = 168
LOADER_REGS = 24
CONSUMER_REGS = 240
#: The tail's bias of one launch takes at most this share of the bytes of the *whole* call's q, k, v
#: (more heads: more launches), so it grows with the length no faster than q, k, v do.  The API
#: passes the whole call's bytes (``call_bytes``): its token-ordered calls come a quarter of the
#: heads at a time, and a share of a quarter split them into launches of one head.  Measured (H200,
#: 2026-12-04, whole call's extra memory without a token order): HunyuanVideo 720p 11.8 / 10.9 /
#: 9.9 % of q+k+v at 32 / 64 / 96 (issue 16's bar: 10 %), Wan 720p 9.8 / 9.8 / 9.4 %, times within
#: the run's spread.  HunyuanVideo's node call (tiled order): 57.1 / 58.6 ms at 1/96 of the call,
#: 57.9 / 59.1 at 1/128 (what 1/32 of a group was), 61.2-61.3 at 1/96 of a group (H200, 2026-12-04).
TAIL_BIAS_SHARE = 96
#: Head dims and key block sizes this kernel is built for.
HEAD_DIMS = (64, 128)
BLOCKS = (64, 128)
_QUERY_TILE, _SLOT = gl.constexpr(QUERY_TILE), gl.constexpr(SLOT)
_CONSUMER_REGS, _LOADER_REGS = gl.constexpr(CONSUMER_REGS), gl.constexpr(LOADER_REGS)


@gluon.constexpr_function
def _io_layout(d):
    """Rows x head dim in 16-byte vectors, for one warpgroup: q in, the output out."""
    return gl.BlockedLayout([1, 8], [32 // (d // 8), d // 8], [4, 1], [1, 0])


@gluon.jit
def _work(IDX, CNT, TORD, DIDX, DCNT, BH0, NQ, NB, KT, ND, H, TILE_COUNTS: gl.constexpr, REORDER: gl.constexpr,
          HAS_VALID: gl.constexpr, HAS_DENSE: gl.constexpr):
    """What this program computes, the same in every partition: ``(qt, bh, its row in the launch's
    heads, dense, exact list, full blocks, visited blocks, the tail's slots)``.  A launch takes
    the heads ``BH0 ..`` (batch x head).  A regular program takes a query tile (the grid's, or for an
    adaptive selection the launch's heaviest-first order ``TORD``) with its routed list (``CNT``:
    the full and the non-empty blocks, with key padding or per-tile counts); with dense query rows
    (``HAS_DENSE``) the first programs each take 128 of them (``qt`` counts those tiles) over every
    block of their batch element (``DIDX``, ``DCNT``), without a tail."""
    if HAS_DENSE:
        n_dt = gl.cdiv(ND, _QUERY_TILE)
        lin = gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)
        n_dense = n_dt * gl.num_programs(1)
        dense = lin < n_dense
        r = gl.maximum(lin - n_dense, 0)
        if REORDER:
            r = gl.load(TORD + r)
        lbh = gl.where(dense, lin // n_dt, r // NQ)
        qt = gl.where(dense, lin % n_dt, r % NQ)
    elif REORDER:
        dense = False
        t = gl.load(TORD + gl.program_id(1) * NQ + gl.program_id(0))
        lbh = t // NQ
        qt = t % NQ
    else:
        dense = False
        lbh = gl.program_id(1)
        qt = gl.program_id(0)
    bh = BH0 + lbh
    tile = bh.to(gl.int64) * NQ + qt
    exact = IDX + tile * KT
    if TILE_COUNTS or HAS_VALID:
        n_used = gl.load(CNT + tile * 2 + 1)
    else:
        n_used = KT
    if HAS_VALID:
        n_full = gl.load(CNT + tile * 2)
    else:
        n_full = n_used
    n_groups = gl.cdiv(NB, 2 * _SLOT) * 2  # 64 centroids a slot, two slots a step (read where ORDER >= 0)
    if HAS_DENSE:
        b = bh // H
        exact = gl.where(dense, DIDX + b.to(gl.int64) * NB, exact)
        d_used = gl.load(DCNT + b * 2 + 1)
        n_used = gl.where(dense, d_used, n_used)
        n_full = gl.where(dense, gl.load(DCNT + b * 2) if HAS_VALID else d_used, n_full)
        n_groups = gl.where(dense, 0, n_groups)
    return qt, bh, lbh, dense, exact, n_full, n_used, n_groups


@gluon.jit
def _exact_slots(n_used, BLOCK_N: gl.constexpr):
    """Ring slots of the exact list: ``BLOCK_N / 64`` per block, rounded up to whole steps."""
    return gl.cdiv(n_used * (BLOCK_N // _SLOT), 2) * 2


@gluon.jit
def _slot_rows(exact, t, n_used, BLOCK_N: gl.constexpr):
    """Exact slot ``t``: the first key row of its 64 and whether they belong to the list (the
    padding slot of an odd count repeats the last block)."""
    SPB: gl.constexpr = BLOCK_N // _SLOT
    blk = t // SPB
    j = gl.load(exact + gl.minimum(blk, n_used - 1))
    return j * BLOCK_N + (t % SPB) * _SLOT, blk < n_used


@gluon.jit
def _loader(k_desc, v_desc, kb_desc, vm_desc, hm_desc, IDX, CNT, TORD, DIDX, DCNT, kring, vring, kbuf, vbuf, ready,
            empty,
            BH0, NQ, NB, KT, ND, H, BLOCK_N: gl.constexpr, D: gl.constexpr, SLOTS: gl.constexpr,
            ORDER: gl.constexpr, TILE_COUNTS: gl.constexpr, REORDER: gl.constexpr, HAS_VALID: gl.constexpr,
            HAS_DENSE: gl.constexpr):
    """The producer warp: every slot's TMA copies, in the consumers' order: the exact blocks' K and
    V, the tail's centroids and value means, then (order 1) the first-order matrix's rows.  The
    ring holds ``SLOTS / 2`` steps of two 64-row slots, each slot with its barriers; the boxes land
    in a step's halves seen as ``[1, 64, D]`` (``kring``, ``vring``), the matrix's 2-D boxes in the
    first half of ``kbuf`` / ``vbuf``'s step, the same bytes as ``[128, D]`` tiles."""
    qt, bh, lbh, dense, exact, n_full, n_used, n_groups = _work(IDX, CNT, TORD, DIDX, DCNT, BH0, NQ, NB, KT, ND, H,
                                                                TILE_COUNTS, REORDER, HAS_VALID, HAS_DENSE)
    STEPS: gl.constexpr = SLOTS // 2
    n_exact = _exact_slots(n_used, BLOCK_N)
    for p in range(n_exact // 2):
        st = p % STEPS
        for u in gl.static_range(2):
            s = 2 * st + u
            mbarrier.wait(empty.index(s), ((p // STEPS) & 1) ^ 1)  # (a new barrier passes phase 1)
            row, _ = _slot_rows(exact, 2 * p + u, n_used, BLOCK_N)
            bar = ready.index(s)
            mbarrier.expect(bar, 2 * k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [bh, row, 0], bar, kring.index(st).slice(u * _SLOT, _SLOT, dim=1))
            tma.async_copy_global_to_shared(v_desc, [bh, row, 0], bar, vring.index(st).slice(u * _SLOT, _SLOT, dim=1))
    if ORDER >= 0:
        for p in range(n_groups // 2):  # (past NB the boxes read as zeros)
            r = n_exact // 2 + p
            st = r % STEPS
            for u in gl.static_range(2):
                s = 2 * st + u
                mbarrier.wait(empty.index(s), ((r // STEPS) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, 2 * kb_desc.block_type.nbytes)
                g = 2 * p + u
                tma.async_copy_global_to_shared(kb_desc, [bh, g * _SLOT, 0], bar,
                                                kring.index(st).slice(u * _SLOT, _SLOT, dim=1))
                tma.async_copy_global_to_shared(vm_desc, [bh, g * _SLOT, 0], bar,
                                                vring.index(st).slice(u * _SLOT, _SLOT, dim=1))
    if ORDER == 1:  # the matrix's D rows as D / 64 tiles of the next step's first slot: its K tile (and V's)
        r = (n_exact + n_groups) // 2
        st = r % STEPS
        s = 2 * st
        mbarrier.wait(empty.index(s), ((r // STEPS) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, (D // _SLOT) * hm_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(hm_desc, [bh * D, 0], bar, kbuf.index(st).slice(0, _SLOT))
        if D > _SLOT:
            tma.async_copy_global_to_shared(hm_desc, [bh * D + _SLOT, 0], bar, vbuf.index(st).slice(0, _SLOT))


@gluon.jit
def _step(r, qs, kbuf, vbuf, ready, empty, add, m_i, acc, zero_s, qk_scale, SLOTS: gl.constexpr,
          TAIL: gl.constexpr, p_layout: gl.constexpr, row_o: gl.constexpr):
    """The ring's step ``r`` (its two slots, one ``[128, D]`` tile of K and of V) into the online
    softmax: ``QK^T`` and ``PV`` of 128 keys, one wgmma each; then both slots go back to the
    loader.  Exact steps: ``add`` says which keys count; the tail (``TAIL``): it is the centroids'
    biases, added to the scaled logits.  Returns ``(max, rescale factor, row sum, acc)``."""
    STEPS: gl.constexpr = SLOTS // 2
    st = r % STEPS
    phase = (r // STEPS) & 1
    mbarrier.wait(ready.index(2 * st), phase)
    mbarrier.wait(ready.index(2 * st + 1), phase)
    z = warpgroup_mma(qs, kbuf.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    z = warpgroup_mma_wait(num_outstanding=0, deps=(z, ))
    if TAIL:
        z = z * qk_scale + add[None, :]
        m_new = gl.maximum(m_i, gl.max(z, axis=1))
        p = gl.exp2(z - m_new[:, None])
    else:
        z = gl.where(add[None, :], z, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(z, axis=1) * qk_scale)
        p = gl.exp2(z * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    acc = warpgroup_mma(gl.convert_layout(p.to(kbuf.dtype), p_layout), vbuf.index(st),
                        acc * gl.convert_layout(alpha, row_o)[:, None], is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    mbarrier.arrive(empty.index(2 * st), count=1)
    mbarrier.arrive(empty.index(2 * st + 1), count=1)
    return m_new, alpha, gl.sum(p, axis=1), acc


@gluon.jit
def _exact_step(p, exact, n_used, valid_row, qs, kbuf, vbuf, ready, empty, m_i, l_i, acc, zero_s, cols, N, qk_scale,
                BLOCK_N: gl.constexpr, SLOTS: gl.constexpr, MASKED: gl.constexpr, p_layout: gl.constexpr,
                row_o: gl.constexpr):
    """Step ``p`` of the exact list (its slots ``2p``, ``2p + 1``).  A key counts where it is in the
    list, before N (the last block's keys past N read as zeros) and, with ``MASKED``, not padding
    (``valid_row``)."""
    row_a, in_a = _slot_rows(exact, 2 * p, n_used, BLOCK_N)
    row_b, in_b = _slot_rows(exact, 2 * p + 1, n_used, BLOCK_N)
    first = cols < _SLOT
    keys = gl.where(first, row_a + cols, row_b + cols - _SLOT)
    ok = (keys < N) & gl.where(first, in_a, in_b)
    if MASKED:
        ok = ok & (gl.load(valid_row + keys, mask=ok, other=0) != 0)
    m_i, alpha, rsum, acc = _step(p, qs, kbuf, vbuf, ready, empty, ok, m_i, acc, zero_s, qk_scale, SLOTS, False,
                                  p_layout, row_o)
    return m_i, l_i * alpha + rsum, acc


@gluon.jit
def _first_order(qs, col0, hm, w, out, p_layout: gl.constexpr):
    """``out + (w * q[:, col0 : col0 + 64]) @ hm`` (async; ``hm``: those rows of the matrix)."""
    layout: gl.constexpr = _io_layout(_SLOT)
    wq = qs.slice(col0, _SLOT, dim=1).load(layout).to(gl.float32)
    wq = wq * gl.convert_layout(w, gl.SliceLayout(1, layout))[:, None]
    return warpgroup_mma(gl.convert_layout(wq.to(qs.dtype), p_layout), hm, out, is_async=True)


@gluon.jit
def _consumer(WG: gl.constexpr, Q, O, PERM, IDX, CNT, TB, TORD, VALID, DROWS, DFLAG, DIDX, DCNT, qbuf, kbuf, vbuf,
              ready, empty, sqb, sqh, sqn, sob, soh, son, svb, BH0, N, NB, NQ, H, KT, ND, qk_scale,
              BLOCK_N: gl.constexpr, D: gl.constexpr, SLOTS: gl.constexpr, ORDER: gl.constexpr,
              HAS_PERM: gl.constexpr, TILE_COUNTS: gl.constexpr, REORDER: gl.constexpr, HAS_VALID: gl.constexpr,
              HAS_DENSE: gl.constexpr):
    """One consumer warpgroup: rows ``WG * 64 .. WG * 64 + 63`` of the query tile, through every
    stage the loader fills (the Triton kernel's phases 1-3, base-2 units)."""
    HALF: gl.constexpr = 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 2 * _SLOT, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    io_layout: gl.constexpr = _io_layout(D)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    qt, bh, lbh, dense, exact, n_full, n_used, n_groups = _work(IDX, CNT, TORD, DIDX, DCNT, BH0, NQ, NB, KT, ND, H,
                                                                TILE_COUNTS, REORDER, HAS_VALID, HAS_DENSE)
    b = bh // H
    h = bh % H

    # This warpgroup's rows: their positions in q and the output (the input order: a token order
    # reads and writes through PERM), and which it writes (a regular tile leaves its dense rows to
    # their own programs).
    rows = qt * _QUERY_TILE + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, io_layout))
    dcol = gl.arange(0, D, layout=gl.SliceLayout(0, io_layout))
    rmask = rows < N
    if HAS_PERM:
        src = gl.load(PERM + rows, mask=rmask, other=0)
    else:
        src = rows.to(gl.int64)
    store = rmask
    if HAS_DENSE:
        dmask = rows < ND
        store = gl.where(dense, dmask, rmask & (gl.load(DFLAG + rows, mask=rmask, other=1) == 0))
        src = gl.where(dense, gl.load(DROWS + rows, mask=dmask & dense, other=0), src)
        rmask = gl.where(dense, dmask, rmask)
    q = gl.load(Q + b.to(gl.int64) * sqb + h.to(gl.int64) * sqh + src[:, None] * sqn + dcol[None, :],
                mask=rmask[:, None], other=0.0)
    qs = qbuf.index(WG)
    qs.store(q)
    fence_async_shared()

    m_i = gl.full([HALF], -1.0e30, gl.float32, layout=row_s)
    l_i = gl.zeros([HALF], gl.float32, layout=row_s)
    g_i = gl.zeros([HALF], gl.float32, layout=row_s)
    acc = gl.zeros([HALF, D], gl.float32, layout=o_layout)
    zero_s = gl.zeros([HALF, 2 * _SLOT], gl.float32, layout=s_layout)
    cols = gl.arange(0, 2 * _SLOT, layout=col_s)

    # Phase 1: the exact blocks, 128 keys a step.  Each wgmma is waited for at once: the two
    # warpgroups interleave on their own (one's softmax while the other's products run).  Pipelining
    # inside the warpgroup as FlashAttention-3 does (the next QK^T during this softmax), and ordering
    # the two warpgroups with mbarriers (ping-pong), measured no faster here (H200, docs/kernels.md).
    # With key padding the list's full blocks come first; the steps from the first partial block on
    # read their keys' validity (their padded rows hold zeros: the token order's copies,
    # unsupported_reason).
    valid_row = VALID + b.to(gl.int64) * svb
    n_exact = _exact_slots(n_used, BLOCK_N)
    n_plain = n_full * (BLOCK_N // _SLOT) // 2
    for p in range(n_plain):
        m_i, l_i, acc = _exact_step(p, exact, n_used, valid_row, qs, kbuf, vbuf, ready, empty, m_i, l_i, acc, zero_s,
                                    cols, N, qk_scale, BLOCK_N, SLOTS, False, p_layout, row_o)
    for p in range(n_plain, n_exact // 2):
        m_i, l_i, acc = _exact_step(p, exact, n_used, valid_row, qs, kbuf, vbuf, ready, empty, m_i, l_i, acc, zero_s,
                                    cols, N, qk_scale, BLOCK_N, SLOTS, HAS_VALID, p_layout, row_o)

    # Phase 2: the tail, every unselected block with a valid key, in the same online softmax: each
    # centroid's logit plus its tile's bias (triton_kernels.tail_bias: log2 n_j, the log-normal
    # correction, -inf at the selected and empty blocks and past NB).  The bias is loaded as the
    # step starts, in flight while it waits for its slots and its QK^T (loaded a step ahead, four
    # bias vectors of 16 registers each were live through the step: a spill at order 1 with text).
    if ORDER >= 0:
        tb = TB + (lbh.to(gl.int64) * NQ + qt) * NB  # (the launch's rows of the bias)
        for p in range(n_groups // 2):
            offs = 2 * p * _SLOT + cols
            bias = gl.load(tb + offs, mask=offs < NB, other=float("-inf")).to(gl.float32)
            m_i, alpha, rsum, acc = _step(n_exact // 2 + p, qs, kbuf, vbuf, ready, empty, bias, m_i, acc, zero_s,
                                          qk_scale, SLOTS, True, p_layout, row_o)
            l_i = l_i * alpha
            g_i = g_i * alpha + rsum

    den = l_i + g_i
    safe = gl.where(den > 0, den, 1.0)
    out = acc / gl.convert_layout(safe, row_o)[:, None]
    # Phase 3: the hybrid first order, (g / den) * q @ (s * HSUM / valid keys) (the host scaled it;
    # g = 0 in a dense program: it adds nothing), from the ring's next slot: the matrix's rows
    # 0..63 in its K tile, 64..127 in its V tile, each against the matching 64 columns of q.
    if ORDER == 1:
        r = (n_exact + n_groups) // 2
        st = r % (SLOTS // 2)
        mbarrier.wait(ready.index(2 * st), (r // (SLOTS // 2)) & 1)
        out = _first_order(qs, 0, kbuf.index(st).slice(0, _SLOT), g_i / safe, out, p_layout)
        if D > _SLOT:
            out = _first_order(qs, _SLOT, vbuf.index(st).slice(0, _SLOT), g_i / safe, out, p_layout)
        out = warpgroup_mma_wait(num_outstanding=0, deps=(out, ))
    out = gl.convert_layout(out.to(O.dtype.element_ty), io_layout)
    gl.store(O + b.to(gl.int64) * sob + h.to(gl.int64) * soh + src[:, None] * son + dcol[None, :], out,
             mask=store[:, None])


# The two consumers as two wrappers of _consumer.  Passing the warpgroup index in the partitions'
# argument tuples instead (one function, specialised twice) compiles too, but ptxas then schedules
# some configurations differently (SASS compared offline): that build has not run on a
# GPU, so the validated one stays until a GPU session checks the simpler form.
@gluon.jit
def _consumer0(Q, O, PERM, IDX, CNT, TB, TORD, VALID, DROWS, DFLAG, DIDX, DCNT, qbuf, kbuf, vbuf, ready,
               empty, sqb, sqh, sqn, sob, soh, son, svb, BH0, N, NB, NQ, H, KT, ND, qk_scale,
               BLOCK_N: gl.constexpr, D: gl.constexpr, SLOTS: gl.constexpr, ORDER: gl.constexpr,
               HAS_PERM: gl.constexpr, TILE_COUNTS: gl.constexpr, REORDER: gl.constexpr, HAS_VALID: gl.constexpr,
               HAS_DENSE: gl.constexpr):
    _consumer(0, Q, O, PERM, IDX, CNT, TB, TORD, VALID, DROWS, DFLAG, DIDX, DCNT, qbuf, kbuf, vbuf, ready,
              empty, sqb, sqh, sqn, sob, soh, son, svb, BH0, N, NB, NQ, H, KT, ND, qk_scale,
              BLOCK_N, D, SLOTS, ORDER, HAS_PERM, TILE_COUNTS, REORDER, HAS_VALID, HAS_DENSE)


@gluon.jit
def _consumer1(Q, O, PERM, IDX, CNT, TB, TORD, VALID, DROWS, DFLAG, DIDX, DCNT, qbuf, kbuf, vbuf, ready,
               empty, sqb, sqh, sqn, sob, soh, son, svb, BH0, N, NB, NQ, H, KT, ND, qk_scale,
               BLOCK_N: gl.constexpr, D: gl.constexpr, SLOTS: gl.constexpr, ORDER: gl.constexpr,
               HAS_PERM: gl.constexpr, TILE_COUNTS: gl.constexpr, REORDER: gl.constexpr, HAS_VALID: gl.constexpr,
               HAS_DENSE: gl.constexpr):
    _consumer(1, Q, O, PERM, IDX, CNT, TB, TORD, VALID, DROWS, DFLAG, DIDX, DCNT, qbuf, kbuf, vbuf, ready,
              empty, sqb, sqh, sqn, sob, soh, son, svb, BH0, N, NB, NQ, H, KT, ND, qk_scale,
              BLOCK_N, D, SLOTS, ORDER, HAS_PERM, TILE_COUNTS, REORDER, HAS_VALID, HAS_DENSE)


@gluon.jit(do_not_specialize=["BH0", "N", "NB", "NQ", "KT", "ND"])
def _pisa_fwd_hopper(Q, O, PERM, IDX, CNT, TB, TORD, VALID, DROWS, DFLAG, DIDX, DCNT,
                     k_desc, v_desc, kb_desc, vm_desc, hm_desc,
                     sqb, sqh, sqn, sob, soh, son, svb, BH0, N, NB, NQ, H, KT, ND, qk_scale,
                     BLOCK_N: gl.constexpr, D: gl.constexpr, SLOTS: gl.constexpr, ORDER: gl.constexpr,
                     HAS_PERM: gl.constexpr, TILE_COUNTS: gl.constexpr, REORDER: gl.constexpr,
                     HAS_VALID: gl.constexpr, HAS_DENSE: gl.constexpr):
    dtype: gl.constexpr = k_desc.dtype
    tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_SLOT, D], dtype)
    qbuf = gl.allocate_shared_memory(dtype, [2, 64, D], tile_layout)
    # The rings: SLOTS / 2 steps of [1, 128, D] in the boxes' layout for the copies (a slot is a
    # row slice of its step: the 128-byte swizzle's column chunks run the step's whole height), the
    # same bytes as [128, D] tiles for the products.
    kring = gl.allocate_shared_memory(dtype, [SLOTS // 2, 1, 2 * _SLOT, D], k_desc.layout)
    vring = gl.allocate_shared_memory(dtype, [SLOTS // 2, 1, 2 * _SLOT, D], k_desc.layout)
    gl.static_assert(k_desc.layout.swizzle_byte_width == tile_layout.swizzle_byte_width)
    kbuf = kring._reinterpret(dtype, [SLOTS // 2, 2 * _SLOT, D], tile_layout)
    vbuf = vring._reinterpret(dtype, [SLOTS // 2, 2 * _SLOT, D], tile_layout)
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers release a stage
    # (the argument tuples are written out in the call: a tuple assigned to a name first turns its
    # constexprs into tensors)
    gl.warp_specialize([
        (_consumer0, (Q, O, PERM, IDX, CNT, TB, TORD, VALID, DROWS, DFLAG, DIDX, DCNT, qbuf, kbuf, vbuf, ready,
                      empty, sqb, sqh, sqn, sob, soh, son, svb, BH0, N, NB, NQ, H, KT, ND, qk_scale,
                      BLOCK_N, D, SLOTS, ORDER, HAS_PERM, TILE_COUNTS, REORDER, HAS_VALID, HAS_DENSE)),
        (_consumer1, (Q, O, PERM, IDX, CNT, TB, TORD, VALID, DROWS, DFLAG, DIDX, DCNT, qbuf, kbuf, vbuf, ready,
                      empty, sqb, sqh, sqn, sob, soh, son, svb, BH0, N, NB, NQ, H, KT, ND, qk_scale,
                      BLOCK_N, D, SLOTS, ORDER, HAS_PERM, TILE_COUNTS, REORDER, HAS_VALID, HAS_DENSE)),
        (_loader, (k_desc, v_desc, kb_desc, vm_desc, hm_desc, IDX, CNT, TORD, DIDX, DCNT, kring, vring, kbuf, vbuf,
                   ready, empty, BH0, NQ, NB, KT, ND, H, BLOCK_N, D, SLOTS, ORDER, TILE_COUNTS, REORDER, HAS_VALID,
                   HAS_DENSE)),
    ], [4, 1], [_CONSUMER_REGS, _LOADER_REGS])


def ring_slots(d: int) -> int:
    """Ring slots that fit: the two query halves, per slot 64 rows of K and of V (the tail:
    centroids and value means; at the end the first-order matrix, which so takes no buffer of its
    own).  Even (a step reads two, never wrapping), at least four (the next step's copies run while
    the consumers compute)."""
    fixed = 2 * HALF_TILE * d * 2 + SMEM_SCRATCH
    return max(4, min(MAX_SLOTS, (SMEM_BYTES - fixed) // (2 * SLOT * d * 2)) // 2 * 2)


def _kv_3d(t: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """``[B, H, N, D]`` as ``[B*H, N, D]`` (shape, strides) without a copy, or None where its batch
    and head strides do not merge."""
    b, h, n, d = t.shape
    if b > 1 and t.stride(0) != h * t.stride(1):
        return None
    return [b * h, n, d], [t.stride(1), t.stride(2), 1]


def _aligned(t: torch.Tensor, strides) -> bool:
    return t.data_ptr() % 16 == 0 and all(s > 0 and (s * t.element_size()) % 16 == 0 for s in strides[:-1])


def unsupported_reason(q, k, v, *, valid, block: int, stats: PooledStats, perm) -> str | None:
    """Why this kernel does not take the call (one phrase), or None where it does.  Checks only
    what the call is; whether this GPU and this Triton can run it is the caller's business.  Key
    padding needs a token order (``perm``): its K / V are then the pre-scan's copies, whose padded
    rows are zeros, so a partial block can be copied whole (the Triton kernel never reads a padded
    key: it may hold NaN)."""
    d = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (16-bit only)"
    if d not in HEAD_DIMS or block not in BLOCKS or block > d:  # (the first-order matrix: D / block tiles)
        return f"head dim {d} / block {block}"
    if valid is not None and perm is None:
        return "key padding without a token order"
    if stats.kbar_lp is None or stats.vmean_lp is None:
        return "no 16-bit centroids"
    for t in (k, v):
        view = _kv_3d(t)
        if view is None or t.stride(-1) != 1 or not _aligned(t, view[1]):
            return "K / V strides"
    return None


def _desc(t: torch.Tensor, shape, strides, box) -> TensorDescriptor:
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for(box, dtype)
    return TensorDescriptor(t, list(shape), list(strides), list(box), layout)


def bias_heads_per_launch(call_bytes: int, n: int, block: int) -> int:
    """Batch x heads per launch whose fp16 tail bias ``[NQ, NB]`` each fits in ``1 / TAIL_BIAS_SHARE``
    of ``call_bytes`` (at least one)."""
    return max(1, call_bytes // TAIL_BIAS_SHARE // (num_blocks(n, QUERY_TILE) * num_blocks(n, block) * 2))


def attend(q, k, v, out, *, valid, stats: PooledStats, sel: Selection, scale: float, block: int, order: int,
           perm: torch.Tensor | None = None, dense=None, reorder: bool = True, call_bytes: int | None = None):
    """:func:`pisa_kernels.triton_kernels.attend` (the same arguments) for the calls
    :func:`unsupported_reason` accepts, on sm90.  The tail's bias (``triton_kernels.tail_bias``)
    takes at most ``1 / TAIL_BIAS_SHARE`` of ``call_bytes`` (the bytes of the whole call's q, k, v
    when this is a group of its heads; default: these q, k, v): where it would take more, the heads
    run in several launches, each with its own."""
    b, h, n, d = q.shape
    nb, nq = num_blocks(n, block), num_blocks(n, QUERY_TILE)
    eff_order = order if not sel.all_blocks else -1
    if valid is not None and sel.counts is None:
        raise ValueError("a call with kv_valid needs the selection's counts (route with block kinds)")
    box = [1, SLOT, d]
    (ks, kst), (vs, vst) = _kv_3d(k), _kv_3d(v)
    k_desc, v_desc = _desc(k, ks, kst, box), _desc(v, vs, vst, box)
    cshape, cstride = [b * h, nb, d], [nb * d, d, 1]
    kb_desc = _desc(stats.kbar_lp, cshape, cstride, box)
    vm_desc = _desc(stats.vmean_lp, cshape, cstride, box)
    ph = stats.blen  # a placeholder for the pointers a configuration never reads
    if eff_order == 1:
        total = stats.blen.sum(-1).clamp_min(1.0).repeat_interleave(h)  # valid keys of each row's batch element
        hm = (stats.hsum * (scale / total).view(-1, 1, 1)).to(q.dtype).reshape(b * h * d, d)
        hm_desc = _desc(hm, [b * h * d, d], [d, 1], [SLOT, d])
    else:
        hm_desc = kb_desc
    qkv_bytes = 3 * q.numel() * q.element_size()
    step = bias_heads_per_launch(call_bytes or qkv_bytes, n, block) if eff_order >= 0 else b * h
    reorder = reorder and sel.tile_count is not None
    n_dense = dense.rows.numel() if dense is not None else 0
    text = (dense.rows, dense.flags, dense.idx, dense.counts) if dense is not None else (ph,) * 4
    for s in range(0, b * h, step):
        e = min(b * h, s + step)
        bias = tail_bias(stats, sel, scale, h, routing_chunk_bytes(qkv_bytes), (s, e)) if eff_order >= 0 else ph
        tord = tile_order(sel, slice(s, e)) if reorder else ph
        _pisa_fwd_hopper[(nq + num_blocks(n_dense, QUERY_TILE), e - s)](
            q, out, perm if perm is not None else ph, sel.idx, sel.counts if sel.counts is not None else sel.idx,
            bias, tord, valid if valid is not None else ph, *text, k_desc, v_desc, kb_desc, vm_desc, hm_desc,
            q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
            valid.stride(0) if valid is not None else 0, s, n, nb, nq, h, sel.count, n_dense, scale * LOG2E,
            BLOCK_N=block, D=d, SLOTS=ring_slots(d), ORDER=eff_order, HAS_PERM=perm is not None,
            TILE_COUNTS=sel.tile_count is not None, REORDER=reorder, HAS_VALID=valid is not None,
            HAS_DENSE=dense is not None, num_warps=4, maxnreg=MAX_REGS)
    return out
