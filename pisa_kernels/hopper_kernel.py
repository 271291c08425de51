"""The PISA forward kernel for Hopper (sm90), written in Gluon with FlashAttention-3's structure.

Why a second kernel: the Triton kernel's exact loop runs at about 440 TFLOP/s on an H200 where
cuDNN's dense attention runs at 569 (docs/kernels.md): Triton's software pipeline puts CTA-wide
barriers in the loop, so the two warpgroups of a program cannot overlap one's softmax with the
other's tensor-core work, and Triton's automatic warp specialization does not apply to it on sm90.
Gluon (``triton.experimental.gluon``, shipped inside Triton) lets the kernel say who does what:

* **one loader warp** issues the TMA copies: per step one 64-key block of K and of V, by index
  (each selected block is a contiguous tile, so a plain box at row ``j * BLOCK_N`` is the gather),
  then the tail's centroid, value-mean and key-variance tiles (contiguous too), into a ring of
  ``STAGES`` shared-memory stages, each with a *ready* mbarrier (the copy's bytes arrived) and an
  *empty* one (both consumers are done with it);
* **two consumer warpgroups**, each owning 64 of the query tile's 128 rows, run the same online
  softmax as the Triton kernel over the same steps: exact blocks (``QK^T`` and ``PV`` as async
  ``wgmma``), then the zeroth-order tail over every unselected block's centroid (with the log-normal
  correction where asked), then the first-order term ``(g / den) * q @ Hmean``.  The warp
  scheduler interleaves the two warpgroups: while one runs its softmax, the other's wgmma uses the
  tensor cores; registers are rebalanced towards them (the loader keeps 24).

What it covers (:func:`unsupported_reason`): 16-bit inputs, head dim 64 or 128, key blocks of 64 or
128 tokens, K and V addressable as ``[B*H, N, D]`` with 16-byte aligned strides (the node's tiled
token order always gives contiguous copies), every routing (top-k, covariance, adaptive with its
per-tile counts and heaviest-first order), tails plain and log-normal, orders -1/0/1, token orders.
Key padding (``kv_valid``) and dense query rows take the Triton kernel, as does every GPU other than
sm90: the caller (:mod:`pisa_kernels.api`) falls back, once with a warning, if this kernel cannot
compile or launch.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .routing import QUERY_TILE, PooledStats, Selection, num_blocks

LOG2E = 1.4426950408889634
_TWO_LOG2E = gl.constexpr(2.0 * LOG2E)

#: Rows of the query tile each consumer warpgroup owns (wgmma's M per warpgroup).
HALF_TILE = QUERY_TILE // 2
#: Shared memory of one program on sm90 (227 KB), and what the compiler adds to the buffers below
#: for its layout conversions and reductions (measured: 16.1 KB at head dim 128, Triton 3.6).
SMEM_BYTES = 232448
SMEM_SCRATCH = 17 << 10
#: The ring's depth: as deep as the shared memory allows, at most this (the loader runs ahead).
MAX_STAGES = 6
#: Registers per thread: the kernel's cap (12 warps: 168 x 384 fills the register file of one SM),
#: the loader warp's (the minimum) and the second consumer's; the first consumer gets the rest.
MAX_REGS = 168
LOADER_REGS = 24
CONSUMER_REGS = 240
#: Head dims and key block sizes this kernel is built for.
HEAD_DIMS = (64, 128)
BLOCKS = (64,)
_QUERY_TILE = gl.constexpr(QUERY_TILE)
_CONSUMER_REGS, _LOADER_REGS = gl.constexpr(CONSUMER_REGS), gl.constexpr(LOADER_REGS)


@gluon.constexpr_function
def _io_layout(d):
    """Rows x head dim in 16-byte vectors, for one warpgroup: q in, the output out, the tail's key
    variances."""
    return gl.BlockedLayout([1, 8], [32 // (d // 8), d // 8], [4, 1], [1, 0])


@gluon.jit
def _tile_of(TORD, NQ, REORDER: gl.constexpr):
    """(query tile, batch x head) of this program: the grid's own, or, for an adaptive selection,
    the launch's heaviest-first order (``TORD``)."""
    if REORDER:
        t = gl.load(TORD + gl.program_id(1) * NQ + gl.program_id(0))
        return t % NQ, t // NQ
    return gl.program_id(0), gl.program_id(1)


@gluon.jit
def _exact_count(CNT, tile, KT, TILE_COUNTS: gl.constexpr):
    if TILE_COUNTS:
        return gl.load(CNT + tile * 2 + 1)
    return KT


@gluon.jit
def _box(buf, BLOCK_N: gl.constexpr, D: gl.constexpr, desc_layout: gl.constexpr):
    """A ``[BLOCK_N, D]`` stage seen as the descriptors' ``[1, BLOCK_N, D]`` box (same bytes, same
    swizzle)."""
    return buf._reinterpret(buf.dtype, [1, BLOCK_N, D], desc_layout)


@gluon.jit
def _load_first_order(hm_desc, hbuf, hm_bar, bh, D: gl.constexpr):
    mbarrier.expect(hm_bar, hm_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(hm_desc, [bh * D, 0], hm_bar, hbuf)


@gluon.jit
def _loader(k_desc, v_desc, kb_desc, vm_desc, kv_desc, hm_desc, IDX, CNT, TORD, kbuf, vbuf, cbuf, hbuf,
            ready, empty, hm_bar, tail_done, NQ, NB, KT,
            BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, ORDER: gl.constexpr,
            LOGNORMAL: gl.constexpr, TILE_COUNTS: gl.constexpr, REORDER: gl.constexpr):
    """The producer warp: every stage's TMA copies, in the consumers' order."""
    qt, bh = _tile_of(TORD, NQ, REORDER)
    tile = bh.to(gl.int64) * NQ + qt
    n_exact = _exact_count(CNT, tile, KT, TILE_COUNTS)
    box: gl.constexpr = k_desc.layout
    if ORDER == 1 and not LOGNORMAL:
        _load_first_order(hm_desc, hbuf, hm_bar, bh, D)
    for i in range(n_exact):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # (a new barrier passes phase 1)
        j = gl.load(IDX + tile * KT + i)
        bar = ready.index(s)
        mbarrier.expect(bar, 2 * k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [bh, j * BLOCK_N, 0], bar, _box(kbuf.index(s), BLOCK_N, D, box))
        tma.async_copy_global_to_shared(v_desc, [bh, j * BLOCK_N, 0], bar, _box(vbuf.index(s), BLOCK_N, D, box))
    if ORDER >= 0:
        for g in range(gl.cdiv(NB, BLOCK_N)):
            i = n_exact + g
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            if LOGNORMAL:
                mbarrier.expect(bar, 3 * kb_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(kv_desc, [bh, g * BLOCK_N, 0], bar,
                                                _box(cbuf.index(s), BLOCK_N, D, box))
            else:
                mbarrier.expect(bar, 2 * kb_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(kb_desc, [bh, g * BLOCK_N, 0], bar, _box(kbuf.index(s), BLOCK_N, D, box))
            tma.async_copy_global_to_shared(vm_desc, [bh, g * BLOCK_N, 0], bar, _box(vbuf.index(s), BLOCK_N, D, box))
        if ORDER == 1 and LOGNORMAL:  # its buffer held the tail's E[q^2] rows until both consumers are done
            mbarrier.wait(tail_done, 0)
            _load_first_order(hm_desc, hbuf, hm_bar, bh, D)


@gluon.jit
def _exact_softmax(sc, j, cols, N, m_i, l_i, qk_scale, BLOCK_N: gl.constexpr, dtype: gl.constexpr,
                   p_layout: gl.constexpr, row_o: gl.constexpr):
    """Exact block ``j``'s logits ``sc`` into the online softmax (keys past N, in the last block,
    read as zeros: masked): the new max and sum, the weights as the PV product's A operand, and the
    accumulator's rescale factor (in its row layout)."""
    sc = gl.where((j * BLOCK_N + cols < N)[None, :], sc, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(sc, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(sc * qk_scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return m_new, l_i, gl.convert_layout(p.to(dtype), p_layout), gl.convert_layout(alpha, row_o)


@gluon.jit
def _consumer(WG: gl.constexpr, Q, O, PERM, IDX, CNT, SEL, BLEN, Q2, TORD, qbuf, kbuf, vbuf, cbuf, hbuf,
              ready, empty, hm_bar, tail_done, sqb, sqh, sqn, sob, soh, son, N, NB, NQ, H, KT, qk_scale,
              c_scale,
              BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, ORDER: gl.constexpr,
              LOGNORMAL: gl.constexpr, HAS_PERM: gl.constexpr, TILE_COUNTS: gl.constexpr,
              REORDER: gl.constexpr):
    """One consumer warpgroup: rows ``WG * 64 .. WG * 64 + 63`` of the query tile, through every
    stage the loader fills (the Triton kernel's phases 1-3, base-2 units)."""
    HALF: gl.constexpr = 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    io_layout: gl.constexpr = _io_layout(D)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = kbuf.dtype

    qt, bh = _tile_of(TORD, NQ, REORDER)
    b = bh // H
    h = bh % H
    tile = bh.to(gl.int64) * NQ + qt
    n_exact = _exact_count(CNT, tile, KT, TILE_COUNTS)

    rows = qt * _QUERY_TILE + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, io_layout))
    dcol = gl.arange(0, D, layout=gl.SliceLayout(0, io_layout))
    rmask = rows < N
    if HAS_PERM:
        src = gl.load(PERM + rows, mask=rmask, other=0)
    else:
        src = rows.to(gl.int64)
    q = gl.load(Q + b.to(gl.int64) * sqb + h.to(gl.int64) * sqh + src[:, None] * sqn + dcol[None, :],
                mask=rmask[:, None], other=0.0)
    qs = qbuf.index(WG)
    qs.store(q)
    fence_async_shared()

    m_i = gl.full([HALF], -1.0e30, gl.float32, layout=row_s)
    l_i = gl.zeros([HALF], gl.float32, layout=row_s)
    g_i = gl.zeros([HALF], gl.float32, layout=row_s)
    acc = gl.zeros([HALF, D], gl.float32, layout=o_layout)
    zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
    cols = gl.arange(0, BLOCK_N, layout=col_s)

    # Phase 1: the exact blocks.  Each wgmma is waited for at once: the two warpgroups interleave
    # on their own (one's softmax while the other's products run).  Pipelining inside the
    # warpgroup as FlashAttention-3 does (block i+1's QK^T during block i's softmax) measured
    # slower here (Wan 720p keep-or-drop 35.2 vs 33.5 ms, H200, docs/kernels.md): it holds a stage
    # longer, so the loader runs one block less ahead.
    for i in range(n_exact):
        s = i % STAGES
        j = gl.load(IDX + tile * KT + i)
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        sc = warpgroup_mma(qs, kbuf.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc, ))
        m_i, l_i, p, alpha = _exact_softmax(sc, j, cols, N, m_i, l_i, qk_scale, BLOCK_N, dtype, p_layout, row_o)
        acc = warpgroup_mma(p, vbuf.index(s), acc * alpha[:, None], is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index(s), count=1)

    # Phase 2: the tail, every unselected block with a valid key, in the same online softmax.
    if ORDER >= 0:
        if LOGNORMAL:
            # The log-normal correction c_ij = s^2/2 E_i[q^2] . Var_j[k] is the same for every row
            # of the tile: one more product per group, (rows of s^2/2 log2(e) E[q^2]) @ Var^T, gives
            # it in the logits' own layout, instead of a reduction and a layout conversion.
            q2 = gl.load(Q2 + tile * D + dcol) * c_scale
            q2s = hbuf.slice(0, HALF)
            q2s.store(gl.zeros([HALF, D], dtype, layout=io_layout) + q2[None, :].to(dtype))
            fence_async_shared()
        for g in range(gl.cdiv(NB, BLOCK_N)):
            i = n_exact + g
            s = i % STAGES
            # (the group's lengths and selection bytes load while its tiles arrive)
            offs_j = g * BLOCK_N + cols
            jm = offs_j < NB
            nj = gl.load(BLEN + b.to(gl.int64) * NB + offs_j, mask=jm, other=0.0)
            ok = (gl.load(SEL + tile * NB + offs_j, mask=jm, other=1) == 0) & (nj > 0)
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            z = warpgroup_mma(qs, kbuf.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            if LOGNORMAL:
                c = warpgroup_mma(q2s, cbuf.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                z, c = warpgroup_mma_wait(num_outstanding=0, deps=(z, c))
                # Samuelson's bound (routing.cap_mass_bias), base-2 units: c <= sqrt(2 c (n - 1))
                c = gl.minimum(c, gl.sqrt(c * gl.maximum(nj - 1.0, 0.0)[None, :] * _TWO_LOG2E))
                bias = gl.where(ok, gl.log2(gl.maximum(nj, 1.0)), float("-inf"))
                zc = z * qk_scale + c + bias[None, :]
            else:
                z = warpgroup_mma_wait(num_outstanding=0, deps=(z, ))
                zc = gl.where(ok[None, :], z * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(zc, axis=1))
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha
            g_i = g_i * alpha
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            wn = gl.exp2(zc - m_i[:, None])
            if not LOGNORMAL:
                wn = wn * nj[None, :]
            acc = warpgroup_mma(gl.convert_layout(wn.to(dtype), p_layout), vbuf.index(s), acc, is_async=True)
            g_i = g_i + gl.sum(wn, axis=1)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(s), count=1)
        if ORDER == 1 and LOGNORMAL:
            mbarrier.arrive(tail_done, count=1)  # the loader may now fill the first-order matrix

    den = l_i + g_i
    safe = gl.where(den > 0, den, 1.0)
    out = acc / gl.convert_layout(safe, row_o)[:, None]
    # Phase 3: the hybrid first order, (g / den) * q @ (s * HSUM / valid keys) (the host scaled it).
    if ORDER == 1:
        w = gl.convert_layout(g_i / safe, gl.SliceLayout(1, io_layout))
        qw = (qs.load(io_layout).to(gl.float32) * w[:, None]).to(dtype)
        mbarrier.wait(hm_bar, 0)
        out = warpgroup_mma(gl.convert_layout(qw, p_layout), hbuf, out, is_async=True)
        out = warpgroup_mma_wait(num_outstanding=0, deps=(out, ))
    out = gl.convert_layout(out.to(O.dtype.element_ty), io_layout)
    gl.store(O + b.to(gl.int64) * sob + h.to(gl.int64) * soh + src[:, None] * son + dcol[None, :], out,
             mask=rmask[:, None])


# The two consumers as two wrappers of _consumer.  Passing the warpgroup index in the partitions'
# argument tuples instead (one function, specialised twice) compiles too, but ptxas then schedules
# the log-normal configurations differently (SASS compared offline): that build has not run on a
# GPU, so the validated one stays until a GPU session checks the simpler form.
@gluon.jit
def _consumer0(Q, O, PERM, IDX, CNT, SEL, BLEN, Q2, TORD, qbuf, kbuf, vbuf, cbuf, hbuf, ready, empty, hm_bar,
               tail_done,
               sqb, sqh, sqn, sob, soh, son, N, NB, NQ, H, KT, qk_scale, c_scale,
               BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, ORDER: gl.constexpr,
               LOGNORMAL: gl.constexpr, HAS_PERM: gl.constexpr, TILE_COUNTS: gl.constexpr, REORDER: gl.constexpr):
    _consumer(0, Q, O, PERM, IDX, CNT, SEL, BLEN, Q2, TORD, qbuf, kbuf, vbuf, cbuf, hbuf, ready, empty, hm_bar,
              tail_done,
              sqb, sqh, sqn, sob, soh, son, N, NB, NQ, H, KT, qk_scale, c_scale,
              BLOCK_N, D, STAGES, ORDER, LOGNORMAL, HAS_PERM, TILE_COUNTS, REORDER)


@gluon.jit
def _consumer1(Q, O, PERM, IDX, CNT, SEL, BLEN, Q2, TORD, qbuf, kbuf, vbuf, cbuf, hbuf, ready, empty, hm_bar,
               tail_done,
               sqb, sqh, sqn, sob, soh, son, N, NB, NQ, H, KT, qk_scale, c_scale,
               BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, ORDER: gl.constexpr,
               LOGNORMAL: gl.constexpr, HAS_PERM: gl.constexpr, TILE_COUNTS: gl.constexpr, REORDER: gl.constexpr):
    _consumer(1, Q, O, PERM, IDX, CNT, SEL, BLEN, Q2, TORD, qbuf, kbuf, vbuf, cbuf, hbuf, ready, empty, hm_bar,
              tail_done,
              sqb, sqh, sqn, sob, soh, son, N, NB, NQ, H, KT, qk_scale, c_scale,
              BLOCK_N, D, STAGES, ORDER, LOGNORMAL, HAS_PERM, TILE_COUNTS, REORDER)


@gluon.jit(do_not_specialize=["N", "NB", "NQ", "KT"])
def _pisa_fwd_hopper(Q, O, PERM, IDX, CNT, SEL, BLEN, Q2, TORD, k_desc, v_desc, kb_desc, vm_desc, kv_desc, hm_desc,
                     sqb, sqh, sqn, sob, soh, son, N, NB, NQ, H, KT, qk_scale, c_scale,
                     BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, ORDER: gl.constexpr,
                     LOGNORMAL: gl.constexpr, HAS_PERM: gl.constexpr, TILE_COUNTS: gl.constexpr,
                     REORDER: gl.constexpr):
    dtype: gl.constexpr = k_desc.dtype
    tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
    qbuf = gl.allocate_shared_memory(dtype, [2, 64, D], gl.NVMMASharedLayout.get_default_for([64, D], dtype))
    kbuf = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], tile_layout)
    vbuf = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], tile_layout)
    if LOGNORMAL:
        cbuf = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], tile_layout)
    else:
        cbuf = kbuf
    # the first-order matrix; with the log-normal tail it first holds the tail's E[q^2] rows
    if ORDER == 1:
        hbuf = gl.allocate_shared_memory(dtype, [D, D], gl.NVMMASharedLayout.get_default_for([D, D], dtype))
    elif LOGNORMAL:
        hbuf = gl.allocate_shared_memory(dtype, [64, D], gl.NVMMASharedLayout.get_default_for([64, D], dtype))
    else:
        hbuf = qbuf.index(0)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    hm_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers release a stage
    mbarrier.init(hm_bar, count=1)
    tail_done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(tail_done, count=2)
    # (the argument tuples are written out in the call: a tuple assigned to a name first turns its
    # constexprs into tensors)
    gl.warp_specialize([
        (_consumer0, (Q, O, PERM, IDX, CNT, SEL, BLEN, Q2, TORD, qbuf, kbuf, vbuf, cbuf, hbuf, ready, empty, hm_bar,
                      tail_done,
                      sqb, sqh, sqn, sob, soh, son, N, NB, NQ, H, KT, qk_scale, c_scale,
                      BLOCK_N, D, STAGES, ORDER, LOGNORMAL, HAS_PERM, TILE_COUNTS, REORDER)),
        (_consumer1, (Q, O, PERM, IDX, CNT, SEL, BLEN, Q2, TORD, qbuf, kbuf, vbuf, cbuf, hbuf, ready, empty, hm_bar,
                      tail_done,
                      sqb, sqh, sqn, sob, soh, son, N, NB, NQ, H, KT, qk_scale, c_scale,
                      BLOCK_N, D, STAGES, ORDER, LOGNORMAL, HAS_PERM, TILE_COUNTS, REORDER)),
        (_loader, (k_desc, v_desc, kb_desc, vm_desc, kv_desc, hm_desc, IDX, CNT, TORD, kbuf, vbuf, cbuf, hbuf,
                   ready, empty, hm_bar, tail_done, NQ, NB, KT, BLOCK_N, D, STAGES, ORDER, LOGNORMAL, TILE_COUNTS,
                   REORDER)),
    ], [4, 1], [_CONSUMER_REGS, _LOADER_REGS])


def stages(d: int, block: int, order: int, lognormal: bool) -> int:
    """Ring stages that fit: the two query halves, per stage a K and a V tile (the tail: centroids
    and value means) and with the log-normal tail a key-variance tile, the first-order matrix (or,
    without it, the log-normal tail's E[q^2] rows)."""
    fixed = 2 * HALF_TILE * d * 2 + SMEM_SCRATCH
    fixed += d * d * 2 if order == 1 else (HALF_TILE * d * 2 if lognormal else 0)
    per_stage = (3 if lognormal else 2) * block * d * 2
    return max(1, min(MAX_STAGES, (SMEM_BYTES - fixed) // per_stage))


def _kv_3d(t: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """``[B, H, N, D]`` as ``[B*H, N, D]`` (shape, strides) without a copy, or None where its batch
    and head strides do not merge."""
    b, h, n, d = t.shape
    if b > 1 and t.stride(0) != h * t.stride(1):
        return None
    return [b * h, n, d], [t.stride(1), t.stride(2), 1]


def _aligned(t: torch.Tensor, strides) -> bool:
    return t.data_ptr() % 16 == 0 and all(s > 0 and (s * t.element_size()) % 16 == 0 for s in strides[:-1])


def unsupported_reason(q, k, v, *, valid, dense, block: int, stats: PooledStats) -> str | None:
    """Why this kernel does not take the call (one phrase), or None where it does.  Checks only
    what the call is; whether this GPU and this Triton can run it is the caller's business."""
    d = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (16-bit only)"
    if d not in HEAD_DIMS or block not in BLOCKS:
        return f"head dim {d} / block {block}"
    if valid is not None or dense is not None:
        return "key padding or dense query rows"
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


def attend(q, k, v, out, *, stats: PooledStats, sel: Selection, scale: float, block: int, order: int,
           perm: torch.Tensor | None = None, reorder: bool = True, tile_order=None):
    """:func:`pisa_kernels.triton_kernels.attend` for the calls :func:`unsupported_reason` accepts
    (no ``valid``, no dense rows), on sm90.  ``tile_order``: the adaptive selection's launch order
    (``triton_kernels.tile_order``)."""
    b, h, n, d = q.shape
    nb, nq = num_blocks(n, block), num_blocks(n, QUERY_TILE)
    eff_order = order if not sel.all_blocks else -1
    lognormal = stats.kvar is not None and eff_order >= 0
    box = [1, block, d]
    (ks, kst), (vs, vst) = _kv_3d(k), _kv_3d(v)
    k_desc, v_desc = _desc(k, ks, kst, box), _desc(v, vs, vst, box)
    cshape, cstride = [b * h, nb, d], [nb * d, d, 1]
    kb_desc = _desc(stats.kbar_lp, cshape, cstride, box)
    vm_desc = _desc(stats.vmean_lp, cshape, cstride, box)
    kv_desc = _desc(stats.kvar, cshape, cstride, box) if lognormal else kb_desc
    ph = stats.blen  # a placeholder for the pointers a configuration never reads
    if eff_order == 1:
        total = stats.blen.sum(-1).clamp_min(1.0).repeat_interleave(h)  # valid keys of each row's batch element
        hm = (stats.hsum * (scale / total).view(-1, 1, 1)).to(q.dtype).reshape(b * h * d, d)
        hm_desc = _desc(hm, [b * h * d, d], [d, 1], [d, d])
    else:
        hm_desc = kb_desc
    tile_counts = sel.tile_count is not None
    tord = tile_order if tile_counts and reorder else None
    _pisa_fwd_hopper[(nq, b * h)](
        q, out, perm if perm is not None else ph, sel.idx, sel.counts if sel.counts is not None else sel.idx,
        sel.mask, stats.blen, stats.q2 if lognormal else ph, tord if tord is not None else ph,
        k_desc, v_desc, kb_desc, vm_desc, kv_desc, hm_desc,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        n, nb, nq, h, sel.count, scale * LOG2E, 0.5 * scale * scale * LOG2E,
        BLOCK_N=block, D=d, STAGES=stages(d, block, eff_order, lognormal), ORDER=eff_order, LOGNORMAL=lognormal,
        HAS_PERM=perm is not None, TILE_COUNTS=tile_counts, REORDER=tord is not None,
        num_warps=4, maxnreg=MAX_REGS)
    return out
