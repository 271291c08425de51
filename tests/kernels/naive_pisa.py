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
               sink_kv=None, dense_q=None, kv_valid=None, token_perm=None, routing="topk",
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
        w = validp[b]
        nj = torch.tensor([float(w[j * bs:(j + 1) * bs].sum()) for j in range(nb)], dtype=torch.float64)
        t_valid = float(nj.sum())
        for h in range(h_):
            Q, K, V = qp[b, h], kp[b, h], vp[b, h]
            kbar = torch.zeros(nb, d, dtype=torch.float64)
            vhat = torch.zeros(nb, d, dtype=torch.float64)
            hj = torch.zeros(nb, d, d, dtype=torch.float64)
            for j in range(nb):
                sl = slice(j * bs, min(n, (j + 1) * bs))
                kj, vj = K[sl][w[sl]], V[sl][w[sl]]
                if kj.shape[0] == 0:
                    continue
                kbar[j] = kj.mean(dim=0)
                vhat[j] = vj.sum(dim=0)
                hj[j] = (kj - kbar[j]).T @ vj
            htot = hj.sum(dim=0)
            hbar = htot / t_valid if t_valid > 0 else torch.zeros_like(htot)
            for t in range(nq):
                rows = slice(t * QUERY_TILE, min(n, (t + 1) * QUERY_TILE))
                qt = Q[rows]
                if selection is not None:
                    sel = selection[b * h_ + h, t].cpu().bool()
                else:
                    r = s * (kbar @ qt.mean(dim=0))
                    if routing == "cov":
                        r = r + torch.log(hj.flatten(1).norm(dim=1) + COV_EPS)
                    r[nj == 0] = -math.inf
                    r[forced] = math.inf
                    sel = torch.zeros(nb, dtype=torch.bool)
                    if kt >= nb:
                        sel[:] = True
                    else:
                        sel[torch.argsort(-r, stable=True)[:kt]] = True
                sel_all[b * h_ + h, t] = sel
                exact = sel[key_block] & w  # [N] keys computed exactly
                tail = (~sel) & (nj > 0)  # unselected non-empty blocks
                # Every token of the tile, each with its own max shift (rows are independent).
                z = s * (qt @ K[exact].T)  # [R, E] exact logits
                if order >= 0:
                    zbar = s * (qt @ kbar[tail].T)  # [R, U] centroid logits
                else:
                    zbar = torch.zeros(qt.shape[0], 0, dtype=torch.float64)
                allz = torch.cat([z, zbar], dim=1)
                if allz.shape[1] == 0:
                    continue  # no valid key: output 0
                m = allz.max(dim=1, keepdim=True).values
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                e = torch.exp(z - m)
                num = e @ V[exact]
                den = e.sum(dim=1)
                if order >= 0:
                    ec = torch.exp(zbar - m)
                    mass = ec @ nj[tail]  # [R]  sum_U n_j exp(zbar_j)
                    num = num + ec @ vhat[tail]
                    den = den + mass
                    if order == 1:
                        num = num + mass[:, None] * s * (qt @ hbar)
                out_p[b, h, rows] = torch.where(den[:, None] > 0, num / den.clamp_min(1e-300)[:, None],
                                                torch.zeros_like(num))
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
