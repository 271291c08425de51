"""The PyTorch reference of PISA: the oracle for the kernels and the path on CPU / MPS / GPUs
without Triton.

It implements exactly the semantics of the Triton backend (same blocks, same routing, same tail),
written for clarity and bounded memory rather than speed: query tiles are processed in chunks so
that no ``N x N`` matrix exists at video lengths.

All arithmetic is float32 (float64 when the inputs are float64).  Inputs here are already in the
processing order, ``[B, H, N, D]``.
"""

from __future__ import annotations

import torch

from .routing import QUERY_TILE, PooledStats, Selection, num_blocks

#: Elements of the per-chunk logit matrix (heads x rows x keys); 2**24 floats = 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pad_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., N, D] -> [..., NB, block, D], zero padded."""
    n = x.shape[-2]
    nb = num_blocks(n, block)
    pad = nb * block - n
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(*x.shape[:-2], nb, block, x.shape[-1])


def pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, block: int,
         first_order: bool, cov: bool, lognormal: bool = False) -> PooledStats:
    """Block means of q and k, value sums, the mean first-order moment and (optionally) the
    per-block residual norms and the second moments of the log-normal tail, over the real (and
    valid) tokens of each block."""
    b, h, n, d = q.shape
    ct = _compute_dtype(q)
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=q.device)
    w = valid.to(ct)  # [B, N]
    wb = _pad_blocks(w.view(b, 1, n, 1), block)  # [B, 1, NB, blk, 1]
    blen = wb.sum(dim=(-2, -1))[:, 0]  # [B, NB]

    qt = _pad_blocks(q.to(ct), QUERY_TILE)  # [B, H, NQ, T, D]
    qlen = _pad_blocks(torch.ones(1, 1, n, 1, dtype=ct, device=q.device), QUERY_TILE).sum(dim=(-2, -1))
    qbar = qt.sum(dim=-2) / qlen[0, 0].unsqueeze(-1)

    keep = wb > 0
    # Invalid keys are selected away, not multiplied by 0: a padded key holding NaN or Inf must not
    # reach any statistic (0 * NaN is NaN).
    kb = torch.where(keep, _pad_blocks(k.to(ct), block), 0.0)
    vb = torch.where(keep, _pad_blocks(v.to(ct), block), 0.0)
    safe = blen.clamp_min(1.0).view(b, 1, -1, 1)
    kbar = kb.sum(dim=-2) / safe  # [B, H, NB, D]
    vsum = vb.sum(dim=-2)
    hsum = covnorm = q2 = kvar = None
    if lognormal or first_order or cov:
        kc = torch.where(keep, kb - kbar.unsqueeze(-2), 0.0)  # centred valid keys
    if lognormal:
        qsq = qt * qt
        # non-finite rows left out (as the Triton pre-scan): one NaN query must not spread to its tile
        q2 = torch.where(torch.isfinite(qsq), qsq, 0.0).sum(dim=-2) / qlen[0, 0].unsqueeze(-1)
        kvar = (kc * kc).sum(dim=-2) / safe  # two-pass
    if first_order or cov:
        htot = torch.einsum("bhjnd,bhjne->bhde", kc, vb)
        if cov:
            # ||H_j||_F per block, a few blocks at a time: never all [B,H,NB,D,D] at once.
            nb = kc.shape[2]
            step = max(1, _CHUNK_ELEMENTS // max(1, b * h * d * d))
            covnorm = torch.cat([torch.einsum("bhjnd,bhjne->bhjde", kc[:, :, s:s + step], vb[:, :, s:s + step])
                                 .flatten(-2).norm(dim=-1) for s in range(0, nb, step)], dim=2).reshape(b * h, -1)
        if first_order:
            hsum = htot.reshape(b * h, d, d)
    return PooledStats(qbar=qbar.reshape(b * h, -1, d), kbar=kbar.reshape(b * h, -1, d),
                       vsum=vsum.reshape(b * h, -1, d), blen=blen, hsum=hsum, covnorm=covnorm,
                       q2=q2.reshape(b * h, -1, d) if lognormal else None,
                       kvar=kvar.reshape(b * h, -1, d) if lognormal else None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
           stats: PooledStats, sel: Selection, *, scale: float, block: int, order: int) -> torch.Tensor:
    """Exact attention over the selected blocks plus the Taylor tail over all others, in one
    softmax (with ``sel.tail_bias``, every tail block's logit is raised by its log-normal mass
    correction).  Returns ``[B, H, N, D]`` in the compute dtype."""
    b, h, n, d = q.shape
    ct = _compute_dtype(q)
    nq = num_blocks(n, QUERY_TILE)
    out = torch.empty(b, h, n, d, dtype=ct, device=q.device)
    key_ok = torch.ones(b, n, dtype=torch.bool, device=q.device) if valid is None else valid
    key_block = torch.arange(n, device=q.device) // block  # [N]
    tiles_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, QUERY_TILE * n))
    tail = order >= 0 and not sel.all_blocks
    hmean = stats.hmean if order == 1 else None
    for bi in range(b):
        kf, vf = k[bi].to(ct), v[bi].to(ct)  # [H, N, D]
        if valid is not None:  # padded keys may hold anything: select them away (0 * NaN is NaN)
            kf = torch.where(key_ok[bi][None, :, None], kf, 0.0)
            vf = torch.where(key_ok[bi][None, :, None], vf, 0.0)
        for hi in range(h):
            row = bi * h + hi
            kk, vv = kf[hi], vf[hi]
            for t0 in range(0, nq, tiles_per_chunk):
                t1 = min(nq, t0 + tiles_per_chunk)
                r0, r1 = t0 * QUERY_TILE, min(n, t1 * QUERY_TILE)
                qq = q[bi, hi, r0:r1].to(ct)  # [R, D]
                tile_of_row = torch.arange(r0, r1, device=q.device) // QUERY_TILE - t0
                selected = sel.mask[row, t0:t1].bool()  # [T, NB]
                exact_keys = selected[:, key_block][tile_of_row] & key_ok[bi]  # [R, N]
                z = (qq @ kk.T) * scale
                z = z.masked_fill(~exact_keys, -torch.inf)
                m = z.amax(dim=-1)
                if tail:
                    zc = (qq @ stats.kbar[row].T) * scale  # [R, NB]
                    if sel.tail_bias is not None:
                        zc = zc + sel.tail_bias[row, t0:t1].to(ct)[tile_of_row]
                    tail_ok = ~selected[tile_of_row] & (stats.blen[bi] > 0)
                    zc = zc.masked_fill(~tail_ok, -torch.inf)
                    m = torch.maximum(m, zc.amax(dim=-1))
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                p = torch.exp(z - m[:, None])
                num = p @ vv
                den = p.sum(dim=-1)
                if tail:
                    wgt = torch.exp(zc - m[:, None])
                    num = num + wgt @ stats.vsum[row]
                    g = wgt @ stats.blen[bi]
                    if order == 1:
                        num = num + g[:, None] * scale * (qq @ hmean[row])
                    den = den + g
                # A row without any valid key gives 0; NaN inputs propagate as in dense attention.
                out[bi, hi, r0:r1] = torch.where(den[:, None] == 0, torch.zeros_like(num), num / den[:, None])
    return out


def reference_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                      *, scale: float, block: int, order: int, cov: bool, route_fn,
                      lognormal: bool = False, moments: bool | None = None) -> torch.Tensor:
    """Pool, route (``route_fn(stats) -> Selection``) and attend, all in PyTorch.  ``moments``: pool
    the log-normal second moments (default: for the log-normal tail, so with order 0 or 1)."""
    moments = lognormal and order >= 0 if moments is None else moments
    stats = pool(q, k, v, valid, block, first_order=order == 1, cov=cov, lognormal=moments)
    sel = route_fn(stats)
    return attend(q, k, v, valid, stats, sel, scale=scale, block=block, order=order)
