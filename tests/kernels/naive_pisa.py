"""A naive float64 implementation of PISA, written from docs (pisa-method.md §3-§6), not from
``pisa_kernels/reference.py``: the oracle of the kernel tests.

Why a second implementation: the reference is the oracle for the Triton kernels, so the reference
itself needs an oracle that shares none of its code paths (no online softmax, no chunking, no
shared pooling code).  This one works per query tile and per query token, with explicit per-block
statistics and a single max-shifted softmax over everything a token sees:

* exact terms ``exp(s q.k_n)`` / ``exp(s q.k_n) v_n`` over the valid keys of the selected blocks;
* for every unselected block ``j`` with ``n_j > 0`` valid keys: denominator ``n_j exp(zbar_j)``,
  numerator ``exp(zbar_j) Vhat_j`` with ``zbar_j = s q.kbar_j`` and ``Vhat_j`` the SUM of the values;
* order 1 (hybrid first order): numerator ``+ (sum_U n_j exp(zbar_j)) * s * q^T (H_tot / T_valid)``,
  ``H_tot = sum_j sum_n (k_n - kbar_j) v_n^T`` over all blocks (selected too), ``T_valid`` the
  number of valid keys of the batch element; no denominator part;
* order 0 drops the first-order term, order -1 ("drop") drops the whole tail;
* ``tail="lognormal"``: every tail logit ``zbar_j`` gains ``c_j = s^2/2 sum_d E_t[q_d^2] Var_j[k_d]``
  (``E_t`` the mean over the query tile's finite rows' squares, ``Var_j`` the population variance
  over the block's valid keys), capped at ``sqrt(2 c_j (n_j - 1))`` (no value lies further than
  ``sigma sqrt(n - 1)`` from the mean of ``n``), in the denominator, the numerator and the
  first-order mass alike;
* tokens are processed in ``token_perm`` order (blocks are runs of that order), invalid keys
  (``kv_valid``) are excluded from everything (exact part, means, sums, lengths, ``H``);
* routing: per 128-row query tile, top-``k`` blocks by ``s qbar.kbar_j`` (+ ``log(||H_j||_F + 1e-5)``
  for ``routing="cov"``), ``k = max(1, floor((1 - sparsity) NB))``, blocks without valid keys never
  preferred, sink blocks forced on top of ``k``;
* ``dense_q`` rows: exact softmax over all valid keys;
* a row with no valid key at all gets 0 (as dense SDPA with an all-False mask in torch >= 2.5).

The selection can also be supplied (``selection``: bool ``[B*H, NQ, NB]``), for inputs with tied
routing scores where any tie-break is correct.
"""

from __future__ import annotations

import math

import torch

QUERY_TILE = 128
COV_EPS = 1e-5


def norm_order(order) -> int:
    return {1: 1, "1": 1, 0: 0, "0": 0, -1: -1, "-1": -1, "drop": -1}[order]


def ranges_mask(ranges, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    if ranges is None:
        return mask
    if isinstance(ranges, torch.Tensor):
        return ranges.cpu().bool().clone()
    for s, e in ranges:
        mask[int(s):int(e)] = True
    return mask


def valid_mask(kv_valid, b: int, n: int) -> torch.Tensor:
    if kv_valid is None:
        return torch.ones(b, n, dtype=torch.bool)
    kv = torch.as_tensor(kv_valid).cpu()
    if kv.dtype == torch.bool:
        return kv.clone()
    lengths = kv.long()
    return torch.arange(n)[None, :] < lengths[:, None]


def topk_budget(sparsity: float, nb: int) -> int:
    """``max(1, floor(density * NB))``; the +1e-6 keeps ``density * NB`` that is an integer in exact
    decimal arithmetic (e.g. 0.125 * 1184) from flooring one below (documented in routing.py)."""
    return max(1, min(nb, int(math.floor((1.0 - float(sparsity)) * nb + 1e-6))))


def naive_pisa(q, k, v, *, sparsity=0.875, block_size=64, order=1, scale=None, layout="BHND",
               sink_kv=None, dense_q=None, kv_valid=None, token_perm=None, routing="topk", tail="plain",
               selection: torch.Tensor | None = None):
    """Returns ``(out, selection)``: ``out`` float64 in the caller's layout, ``selection`` bool
    ``[B*H, NQ, NB]`` (key blocks of the processing order chosen exactly per query tile)."""
    order = norm_order(order)
    if layout == "BNHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    b_, h_, n, d = q.shape
    s = d ** -0.5 if scale is None else float(scale)
    bs = int(block_size)
    valid = valid_mask(kv_valid, b_, n)
    perm = torch.arange(n) if token_perm is None else torch.as_tensor(token_perm).cpu().long()
    sink = ranges_mask(sink_kv, n)[perm]  # in processing order
    dense = ranges_mask(dense_q, n)  # input positions

    qp, kp, vp = (t[:, :, perm] for t in (q, k, v))
    validp = valid[:, perm]
    nb = -(-n // bs)
    nq = -(-n // QUERY_TILE)
    ktop = topk_budget(sparsity, nb)
    forced = torch.tensor([bool(sink[j * bs:(j + 1) * bs].any()) for j in range(nb)])
    kt = min(nb, ktop + int(forced.sum()))
    key_block = torch.arange(n) // bs

    out_p = torch.zeros(b_, h_, n, d, dtype=torch.float64)
    sel_all = torch.zeros(b_ * h_, nq, nb, dtype=torch.bool)
    for b in range(b_):
        # Block statistics of every head at once, by scatter-adding tokens into their blocks.
        w = validp[b]  # [N] valid keys
        nj = torch.zeros(nb, dtype=torch.float64).index_add_(0, key_block, w.double())  # valid keys per block
        t_valid = float(nj.sum())
        K, V, Q = kp[b], vp[b], qp[b]  # [H, N, D]
        Kw = torch.where(w[None, :, None], K, 0.0)
        Vw = torch.where(w[None, :, None], V, 0.0)
        ksum = torch.zeros(h_, nb, d, dtype=torch.float64).index_add_(1, key_block, Kw)
        kbar = torch.where(nj[None, :, None] > 0, ksum / nj.clamp_min(1.0)[None, :, None], 0.0)  # [H, NB, D]
        vhat = torch.zeros(h_, nb, d, dtype=torch.float64).index_add_(1, key_block, Vw)  # value SUMS
        dk = torch.where(w[None, :, None], K - kbar[:, key_block], 0.0)  # k - kbar_j, valid keys only
        htot = torch.einsum("hnd,hne->hde", dk, Vw)  # sum over all blocks of H_j
        hbar = htot / t_valid if t_valid > 0 else torch.zeros_like(htot)  # per valid key
        kvar = torch.zeros(h_, nb, d, dtype=torch.float64).index_add_(1, key_block, dk * dk) \
            / nj.clamp_min(1.0)[None, :, None]  # [H, NB, D]
        if routing == "cov" and selection is None:
            hnorm = torch.stack([torch.einsum("hnd,hne->hde", dk[:, j * bs:(j + 1) * bs], Vw[:, j * bs:(j + 1) * bs])
                                 .flatten(1).norm(dim=1) for j in range(nb)], dim=1)  # [H, NB] ||H_j||_F
        for t in range(nq):
            rows = slice(t * QUERY_TILE, min(n, (t + 1) * QUERY_TILE))
            qt = Q[:, rows]  # [H, R, D]
            if selection is not None:
                sel = selection[b * h_:(b + 1) * h_, t].cpu().bool()  # [H, NB]
            else:
                r = s * torch.einsum("hjd,hd->hj", kbar, qt.mean(dim=1))
                if routing == "cov":
                    r = r + torch.log(hnorm + COV_EPS)
                r[:, nj == 0] = -math.inf
                r[:, forced] = math.inf
                sel = torch.zeros(h_, nb, dtype=torch.bool)
                if kt >= nb:
                    sel[:] = True
                else:
                    sel.scatter_(1, torch.argsort(-r, dim=1, stable=True)[:, :kt], True)
            sel_all[b * h_:(b + 1) * h_, t] = sel
            exact = sel[:, key_block] & w[None, :]  # [H, N] keys computed exactly
            in_tail = (~sel) & (nj[None, :] > 0)  # [H, NB] unselected non-empty blocks
            if order < 0:
                in_tail = torch.zeros_like(in_tail)
            # Every token of the tile, each with its own max shift (rows are independent).
            z = (s * qt @ K.transpose(1, 2)).masked_fill(~exact[:, None, :], -math.inf)  # [H, R, N]
            zbar = s * qt @ kbar.transpose(1, 2)  # [H, R, NB]
            if tail == "lognormal":
                qsq = qt * qt
                q2 = torch.where(torch.isfinite(qsq), qsq, 0.0).mean(dim=1)  # finite rows only
                c = 0.5 * s * s * torch.einsum("hd,hjd->hj", q2, kvar)
                c = torch.minimum(c, torch.sqrt(2.0 * c * (nj - 1.0).clamp_min(0.0)))  # Samuelson's bound
                zbar = zbar + c[:, None, :]
            zbar = zbar.masked_fill(~in_tail[:, None, :], -math.inf)
            m = torch.maximum(z.amax(dim=-1, keepdim=True), zbar.amax(dim=-1, keepdim=True))
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            e = torch.exp(z - m)
            ec = torch.exp(zbar - m)
            mass = ec @ nj  # [H, R]  sum_U n_j exp(zbar_j)
            num = e @ V + ec @ vhat
            den = e.sum(dim=-1) + mass
            if order == 1:
                num = num + mass[..., None] * s * (qt @ hbar)
            out_p[b, :, rows] = torch.where(den[..., None] > 0, num / den.clamp_min(1e-300)[..., None],
                                            torch.zeros_like(num))  # no valid key at all: 0
    out = torch.empty_like(out_p)
    out[:, :, perm] = out_p
    # Dense query rows: exact attention over every valid key.
    for i in dense.nonzero().flatten().tolist():
        for b in range(b_):
            w = valid[b]
            if not bool(w.any()):
                out[b, :, i] = 0.0
                continue
            z = s * torch.einsum("hd,hnd->hn", q[b, :, i], k[b][:, w])
            p = torch.softmax(z, dim=-1)
            out[b, :, i] = torch.einsum("hn,hnd->hd", p, v[b][:, w])
    if layout == "BNHD":
        out = out.transpose(1, 2)
    return out, sel_all


def dense_attention(q, k, v, *, scale=None, layout="BHND", kv_valid=None):
    """Plain float64 softmax attention (the sparsity-0 oracle)."""
    if layout == "BNHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    b_, h_, n, d = q.shape
    s = d ** -0.5 if scale is None else float(scale)
    z = s * q @ k.transpose(-1, -2)
    valid = valid_mask(kv_valid, b_, n)
    z = z.masked_fill(~valid[:, None, None, :], -math.inf)
    p = torch.softmax(z, dim=-1).nan_to_num(0.0)
    out = p @ v
    return out.transpose(1, 2) if layout == "BNHD" else out
