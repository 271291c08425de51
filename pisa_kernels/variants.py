"""Prototypes of PISA changes, to measure before anything goes into the kernels.

Three places could limit PISA's fidelity; docs/fidelity.md has the numbers.  Of everything here
only the log-normal tail (``ln``) measurably helps; the library runs it as ``tail="lognormal"``.

* **Routing.**  The pooled score ``s qbar_i . kbar_j`` is the *mean* logit over the 128 x 64
  (query, key) pairs of a tile and a block, but the mass a block holds is a log-sum-exp.  RoPE
  makes the two differ: the fast-rotating pairs average out of a block mean (more so for compact
  2-D/3-D tiles than for raster stripes), so a block that holds a sharp positional peak can score
  no higher than its neighbours.  Prototypes:

  - ``sub``: log-mean-exp of the pooled scores of sub-tiles (32 queries) and sub-blocks (16 keys):
    16 finer means per (tile, block), 16x the routing GEMM (still ~0.1 % of dense attention);
  - ``err``: error-aware: the mass the tail would get wrong, ``|M_ij - n_j exp(zbar_ij)|``, with
    the block mass ``M_ij`` estimated as in ``sub`` (a block the centroid already represents well
    stays in the tail even when it is heavy);
  - ``lognormal``: ``zbar + s^2/2 E[q^2] . Var_j[k]`` (the log-normal mass, diagonal covariance);
  - ``oracle``: the exact block mass from dense attention (an upper bound, not a method).

* **The tail's mass.**  The zeroth order counts block ``j`` as ``n_j exp(zbar_ij)``, but the mean of
  ``exp`` exceeds ``exp`` of the mean by the spread of the logits inside the block, which RoPE
  makes large in compact tiles.  Prototypes (``tails``, see :data:`TAILS`): the second-order term
  ``c_ij = s^2/2 E_i[q^2] . Var_j[k]`` (diagonal key covariance per block, mean ``q^2`` of the
  query tile: one ``NQ x NB`` GEMM like the routing score, and one scalar per centroid in the
  tail scan) as a log-normal factor ``exp(c_ij)`` or a Taylor factor ``1 + c_ij``.

* **The first-order moment.**  PISA's hybrid term uses one global ``Hbar`` for every unselected
  block.  Prototypes (``moment``):

  - ``global``: the paper's (and the kernels') ``H_tot / T``;
  - ``unselected``: the mean over the tile's unselected blocks only;
  - ``near``: the mean over the unselected blocks within ``NEAR_BLOCKS`` of the tile (processing
    order) for those blocks, and the mean of all others for the rest;
  - ``block``: every block its own ``H_j`` (PISA-1st: exact first order, an upper bound).

:func:`variant_outputs` runs one selection and returns every order / moment / tail from one pass,
so all of them use the same blocks.  It works in float32, one query tile at a time, on the inputs'
device (small inputs: it holds ``[128, N]`` logits and ``[NB, D, D]`` moments per head) and does
not take ``kv_valid``.
With ``routing`` ``topk`` / ``cov``, ``moment="global"`` and the plain tail it computes what
:func:`pisa_kernels.pisa_attention` computes (tests/fidelity checks this).
"""

from __future__ import annotations

import torch

from . import reference
from .routing import (
    QUERY_TILE,
    Selection,
    block_kinds,
    forced_blocks_from_tokens,
    mass_bias,
    num_blocks,
    route,
    top_blocks,
    topk_count,
)

ROUTINGS = ("topk", "cov", "sub", "err", "lognormal", "oracle")
MOMENTS = ("global", "unselected", "near", "block")
#: Tail weights (value: the output name suffix), with ``c_ij = s^2/2 E_i[q^2] . Var_j[k]`` the
#: second-order term of the block's mass under a diagonal key covariance and the tile's mean ``q^2``:
#: ``plain`` ``n_j exp(zbar)`` (PISA); ``ln`` times ``exp(c_ij)`` (log-normal mass); ``t2`` times
#: ``1 + c_ij`` (the second-order Taylor term, exact to second order for any logit distribution).
TAILS = {"plain": "", "ln": "+ln", "t2": "+t2"}
#: Sub-tile / sub-block sizes of the ``sub`` and ``err`` routings.
SUB_QUERY, SUB_KEY = 32, 16
#: Half-width (in key blocks of the processing order) of the ``near`` moment's window.
NEAR_BLOCKS = 4


def _pad_rows(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [BH, N, D]`` -> (``[BH, N/size, size, D]`` zero padded, real lengths ``[N/size]``)."""
    bh, n, d = x.shape
    m = num_blocks(n, size)
    out = torch.nn.functional.pad(x, (0, 0, 0, m * size - n)).view(bh, m, size, d)
    lengths = torch.full((m,), float(size), dtype=x.dtype, device=x.device)
    lengths[-1] = n - (m - 1) * size
    return out, lengths


def _sub_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-mean-exp of sub-tile x sub-block pooled scores, the plain pooled score), ``[BH, NQ, NB]``."""
    bh, n, _ = q.shape
    qs, ql = _pad_rows(q, SUB_QUERY)
    ks, kl = _pad_rows(k, SUB_KEY)
    qm = qs.sum(2) / ql.view(1, -1, 1)  # [BH, NSQ, D]
    km = ks.sum(2) / kl.view(1, -1, 1)
    z = torch.bmm(qm, km.transpose(1, 2)) * scale  # [BH, NSQ, NSK]
    # Weight each sub-pair by its token count, then group into (tile, block).
    logw = (ql.log().view(1, -1, 1) + kl.log().view(1, 1, -1))
    zq = QUERY_TILE // SUB_QUERY
    zk = block // SUB_KEY
    nq, nb = num_blocks(n, QUERY_TILE), num_blocks(n, block)
    pad_q, pad_k = nq * zq - z.shape[1], nb * zk - z.shape[2]
    zz = torch.nn.functional.pad(z + logw, (0, pad_k, 0, pad_q), value=-torch.inf)
    ww = torch.nn.functional.pad(z * logw.exp(), (0, pad_k, 0, pad_q))
    cnt = torch.nn.functional.pad(logw.exp().expand_as(z), (0, pad_k, 0, pad_q))
    zz = zz.view(bh, nq, zq, nb, zk)
    tokens = cnt.view(bh, nq, zq, nb, zk).sum((2, 4))
    lme = torch.logsumexp(zz, dim=(2, 4)) - tokens.log()
    mean = ww.view(bh, nq, zq, nb, zk).sum((2, 4)) / tokens
    return lme, mean


def _oracle_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block: int) -> torch.Tensor:
    """log of the exact (unnormalised) mass of every (tile, block), per token pair: ``[BH, NQ, NB]``."""
    bh, n, _ = q.shape
    nq, nb = num_blocks(n, QUERY_TILE), num_blocks(n, block)
    out = torch.empty(bh, nq, nb, dtype=q.dtype, device=q.device)
    pos = torch.arange(n, device=q.device)
    for r in range(bh):
        z = (q[r] @ k[r].T) * scale  # [N, N]
        m = z.amax()
        mass = torch.zeros(n, nb, dtype=q.dtype, device=q.device).index_add_(1, pos // block, torch.exp(z - m))
        tile = torch.zeros(nq, nb, dtype=q.dtype, device=q.device).index_add_(0, pos // QUERY_TILE, mass)
        out[r] = tile.clamp_min(1e-38).log() + m
    return out


def select(q: torch.Tensor, k: torch.Tensor, stats, *, routing: str, scale: float, k_top: int,
           heads: int, block: int, forced: torch.Tensor | None, bias: torch.Tensor) -> Selection:
    """The exact blocks of every query tile (``q, k``: ``[BH, N, D]`` float, processing order;
    ``bias``: :func:`mass_bias`)."""
    n_forced = int(forced.sum()) if forced is not None else 0
    if routing in ("topk", "cov"):
        kinds = block_kinds(stats.blen, q.shape[1], block, forced) if forced is not None else None
        return route(stats, scale=scale, k=k_top, heads=heads, kinds=kinds, n_forced=n_forced, cov=routing == "cov")
    if routing == "sub":
        score = _sub_scores(q, k, scale, block)[0]
    elif routing == "err":
        lme, zbar = _sub_scores(q, k, scale, block)
        score = lme + torch.log(-torch.expm1(zbar - lme).clamp_max(-1e-12))  # log(exp(lme) - exp(zbar))
    elif routing == "lognormal":
        score = torch.bmm(stats.qbar, stats.kbar.transpose(1, 2)) * scale + bias
    elif routing == "oracle":
        score = _oracle_scores(q, k, scale, block)
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    nb = score.shape[-1]
    kt = min(nb, k_top + n_forced)
    if forced is not None:
        score = score.masked_fill(forced.view(1, 1, nb), torch.inf)
    idx = torch.empty(*score.shape[:-1], kt, dtype=torch.int32, device=score.device)
    mask = torch.empty(score.shape, dtype=torch.int8, device=score.device)
    top_blocks(score, kt, idx, mask)
    return Selection(idx, mask, kt)


def _block_moments(k: torch.Tensor, v: torch.Tensor, kbar: torch.Tensor, block: int) -> torch.Tensor:
    """``H_j = sum_n (k_n - kbar_j) v_n^T`` of every block of one head: ``[NB, D, D]``."""
    kb, _ = _pad_rows(k.unsqueeze(0), block)
    vb, lengths = _pad_rows(v.unsqueeze(0), block)
    real = (torch.arange(block, device=k.device).view(1, -1) < lengths.view(-1, 1)).to(k.dtype).unsqueeze(-1)  # [NB, blk, 1]
    kc = (kb[0] - kbar.unsqueeze(1)) * real
    return torch.einsum("jnd,jne->jde", kc, vb[0])


def _attend_variants(q, k, v, stats, sel: Selection, bias: torch.Tensor, *, scale: float, block: int, moments,
                     tails) -> dict:
    """Every order / moment / tail for one selection; ``q, k, v``: ``[BH, N, D]`` float, processing
    order; ``bias``: :func:`mass_bias`."""
    bh, n, d = q.shape
    nq = num_blocks(n, QUERY_TILE)
    blen = stats.blen[0]  # no kv_valid: the same for every batch element
    key_block = torch.arange(n, device=q.device) // block
    names = ["drop"] + [f"{o}{TAILS[t]}" for t in tails for o in ["o0"] + [f"o1-{m}" for m in moments]]
    outs = {name: torch.empty(bh, n, d, dtype=q.dtype, device=q.device) for name in names}
    for r in range(bh):
        hj = _block_moments(k[r], v[r], stats.kbar[r], block)  # [NB, D, D]
        htot = hj.sum(0)
        for t in range(nq):
            r0, r1 = t * QUERY_TILE, min(n, (t + 1) * QUERY_TILE)
            qq = q[r, r0:r1]
            chosen = sel.mask[r, t].bool()
            exact = chosen[key_block]
            z = ((qq @ k[r].T) * scale).masked_fill(~exact, -torch.inf)
            zbar = (qq @ stats.kbar[r].T) * scale
            c = bias[r, t]  # [NB]: second-order mass term of every block for this tile
            tail_logits = {name: (zbar if name == "plain" else zbar + (c if name == "ln" else torch.log1p(c)))
                           .masked_fill(chosen, -torch.inf) for name in tails}
            m = torch.stack([z.amax(-1)] + [zc.amax(-1) for zc in tail_logits.values()]).amax(0)
            p = torch.exp(z - m[:, None])
            num_e, den_e = p @ v[r], p.sum(-1)
            outs["drop"][r, r0:r1] = num_e / den_e[:, None]
            for tail, zc in tail_logits.items():
                w = torch.exp(zc - m[:, None])  # per unselected block
                gb = w * blen  # tail mass per block, in tokens
                num0, den = num_e + w @ stats.vsum[r], den_e + gb.sum(-1)
                outs[f"o0{TAILS[tail]}"][r, r0:r1] = num0 / den[:, None]
                for mom in moments:
                    first = _first_order(mom, qq, w, gb, hj, htot, blen, chosen, t, block)
                    outs[f"o1-{mom}{TAILS[tail]}"][r, r0:r1] = (num0 + scale * first) / den[:, None]
    return outs


def _first_order(moment: str, qq, w, gb, hj, htot, blen, chosen, tile: int, block: int) -> torch.Tensor:
    """``sum_{j in U} exp(zbar_j) q^T Hhat_j`` for one query tile under ``moment``."""
    total = blen.sum()
    if moment == "global":
        return gb.sum(-1, keepdim=True) * (qq @ (htot / total))
    if moment == "block":
        return torch.einsum("rj,rje->re", w, torch.einsum("rd,jde->rje", qq, hj))
    if moment == "unselected":
        un = ~chosen
        mean = hj[un].sum(0) / blen[un].sum().clamp_min(1)
        return gb.sum(-1, keepdim=True) * (qq @ mean)
    if moment == "near":
        centre = (tile * QUERY_TILE + QUERY_TILE // 2) // block
        idx = torch.arange(hj.shape[0], device=hj.device)
        window = (idx - centre).abs() <= NEAR_BLOCKS
        near, far = window & ~chosen, ~window
        h_near = hj[near].sum(0) / blen[near].sum().clamp_min(1)
        h_far = hj[far].sum(0) / blen[far].sum().clamp_min(1)
        return gb[:, near].sum(-1, keepdim=True) * (qq @ h_near) + gb[:, far].sum(-1, keepdim=True) * (qq @ h_far)
    raise ValueError(f"moment must be one of {MOMENTS}, got {moment!r}")


def variant_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sparsity: float, routing: str = "topk",
                    moments=MOMENTS, tails=tuple(TAILS), block: int = 64, scale: float | None = None,
                    sink: torch.Tensor | None = None, dense_rows: torch.Tensor | None = None,
                    token_perm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Outputs of ``drop``, ``o0<tail>`` and ``o1-<moment><tail>`` for one routing, float32 ``[B, N, H, D]``
    in input order.

    ``q, k, v``: ``[B, N, H, D]``; ``sink`` / ``dense_rows``: bool ``[N]`` (input order) of keys
    forced exact and of query rows computed densely (text in joint attention, as the node does);
    ``token_perm``: the processing order (see :mod:`pisa_kernels.tiling`).
    """
    b, n, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    dev = q.device
    perm = token_perm.to(dev) if token_perm is not None else torch.arange(n, device=dev)
    qh, kh, vh = (t.detach().float().index_select(1, perm).transpose(1, 2).contiguous() for t in (q, k, v))
    stats = reference.pool(qh, kh, vh, None, block, first_order=True, cov=routing == "cov", lognormal=True)
    forced = forced_blocks_from_tokens(sink.cpu()[perm.cpu()] if sink is not None else None, block)
    forced = forced.to(dev) if forced is not None else None
    flat = [t.reshape(b * h, n, d) for t in (qh, kh, vh)]
    bias = mass_bias(stats.q2, stats.kvar, scale)
    sel = select(flat[0], flat[1], stats, routing=routing, scale=scale, k_top=topk_count(sparsity, num_blocks(n, block)),
                 heads=h, block=block, forced=forced, bias=bias)
    outs = _attend_variants(*flat, stats, sel, bias, scale=scale, block=block, moments=tuple(moments),
                            tails=tuple(tails))
    rows = exact = None
    if dense_rows is not None and bool(dense_rows.any()):
        rows = dense_rows.nonzero().squeeze(1).to(dev)
        exact = torch.nn.functional.scaled_dot_product_attention(
            *(t.detach().float().transpose(1, 2) for t in (q[:, rows], k, v)), scale=scale).transpose(1, 2)
    result = {}
    for name, o in outs.items():
        o = o.view(b, h, n, d).transpose(1, 2)
        o = torch.empty_like(o).index_copy_(1, perm, o)
        if rows is not None:
            o[:, rows] = exact
        result[name] = o
    return result


__all__ = ["MOMENTS", "ROUTINGS", "TAILS", "select", "variant_outputs"]
