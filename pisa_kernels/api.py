"""Public entry point: :func:`pisa_attention`.

It validates and normalises the arguments once (layouts, token order, masks, ranges), routes, and
dispatches to the Triton kernels or to the PyTorch reference.  Both backends share the routing and
the block geometry, so they compute the same function.
"""

from __future__ import annotations

import math
import operator
import warnings
import weakref
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from . import reference
from .backend import hopper_unavailable_reason, resolve_backend
from .errors import KernelDoesNotFit
from .limits import BLOCK_SIZES, ROUTINGS, SUPPORTED_DTYPES, TAILS, TRITON_MAX_HEAD_DIM, check_sparsity
from .lru import lookup, remember
from .routing import (QUERY_TILE, adaptive_budget, block_kinds, exact_order, forced_blocks_from_tokens, num_blocks,
                      route, routing_chunk_bytes, top_blocks, topk_count)

Ranges = Union[Sequence[Sequence[int]], torch.Tensor, None]


@dataclass(frozen=True)
class PisaStats:
    """What one call did (cheap: no device synchronisation)."""

    backend: str
    blocks: int  # key blocks per head
    exact_blocks: int  # key blocks computed exactly per query tile (top-k + forced; adaptive: see exact_mean)
    density: float  # exact blocks / blocks (adaptive routing: exact_mean / blocks, the call's mean, exactly)
    order: int
    dense_rows: int  # query rows that attended every key exactly (dense_q)
    #: Adaptive routing, eager calls: the exact blocks of every query tile, ``[B*H, NQ]`` int32 on the
    #: call's device (its spread costs the caller a synchronisation: see :meth:`density_spread`).
    tile_counts: torch.Tensor | None = None
    #: Exact blocks per query tile, the mean over the call (forced included; host-side, exact).
    exact_mean: float = 0.0

    def density_spread(self) -> tuple[float, float, float, float] | None:
        """``(mean, std, min, max)`` of the per-tile density (adaptive routing; synchronises), or None."""
        if self.tile_counts is None:
            return None
        d = self.tile_counts.double() / self.blocks
        return float(d.mean()), float(d.std(unbiased=False)), float(d.min()), float(d.max())


def _norm_order(order) -> int:
    if order in (1, "1"):
        return 1
    if order in (0, "0"):
        return 0
    if order in (-1, "-1", "drop"):
        return -1
    raise ValueError(f"order must be 1, 0, 'drop' or -1, got {order!r}")


def _token_mask(arg: Ranges, n: int, name: str) -> torch.Tensor | None:
    """Ranges ``[(start, end), ...]`` (or a bool tensor ``[N]``) -> CPU bool ``[N]``, or None if empty.

    Kept on the CPU: block counts derived from it are host integers, so no device sync is needed.
    """
    if arg is None:
        return None
    if isinstance(arg, torch.Tensor):
        if arg.dtype != torch.bool or arg.shape != (n,):
            raise ValueError(f"{name} as a tensor must be bool of shape ({n},), got {arg.dtype} {tuple(arg.shape)}")
        mask = arg.cpu()
    else:
        mask = torch.zeros(n, dtype=torch.bool)
        try:
            pairs = [tuple(r) for r in arg]
        except TypeError:
            raise ValueError(f"{name} must be a list of (start, end) pairs, got {arg!r}") from None
        for r in pairs:
            try:
                s, e = (operator.index(x) for x in r)
            except (TypeError, ValueError):
                raise ValueError(f"{name} entries must be (start, end) pairs of integers, got {r!r}") from None
            if not 0 <= s <= e <= n:
                raise ValueError(f"{name} range ({s}, {e}) is outside [0, {n}]")
            mask[s:e] = True
    return mask if bool(mask.any()) else None


def _valid_mask(kv_valid, b: int, n: int, device: torch.device) -> torch.Tensor | None:
    """``kv_valid`` (bool ``[B, N]`` or int lengths ``[B]``) -> bool ``[B, N]`` on ``device``."""
    if kv_valid is None:
        return None
    if not isinstance(kv_valid, torch.Tensor):
        kv_valid = torch.as_tensor(kv_valid)
    if kv_valid.dtype == torch.bool:
        if kv_valid.shape != (b, n):
            raise ValueError(f"kv_valid mask must have shape ({b}, {n}), got {tuple(kv_valid.shape)}")
        return kv_valid.to(device)
    if not kv_valid.is_floating_point() and kv_valid.shape == (b,):
        lengths = kv_valid.cpu()
        if bool((lengths < 0).any()) or bool((lengths > n).any()):
            raise ValueError(f"kv_valid lengths must be in [0, {n}]")
        return torch.arange(n, device=device).unsqueeze(0) < lengths.to(device).unsqueeze(1)
    raise ValueError("kv_valid must be a bool mask [B, N] or integer lengths [B]")


#: Permutations already checked: id -> (weak reference, version, CPU copy).  Callers such as the
#: ComfyUI node pass the same permutation tensor on every call; checking it once avoids a device
#: synchronisation per call.
_PERM_CACHE: dict[int, tuple] = {}
_PERM_CACHE_SIZE = 32


def _version_of(t: torch.Tensor) -> int | None:
    """In-place version counter; None for inference tensors, which have none.  ComfyUI runs every
    node under ``torch.inference_mode()``, so permutations made during sampling are inference tensors
    (reading ``_version`` raises); the cache then relies on identity alone."""
    return None if t.is_inference() else t._version


def _unchanged(perm: torch.Tensor, checked: torch.Tensor) -> bool:
    """Whether an inference tensor (no version counter) still holds the checked values.  Compared
    only on the CPU, where it costs no device synchronisation; a CUDA inference tensor is trusted
    after its first check (an in-place edit of it is not detected: docs/fallbacks.md)."""
    if _version_of(perm) is not None or perm.device.type != "cpu":
        return True
    return torch.equal(perm.to(torch.int64), checked)


def _check_perm(perm, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate ``token_perm``; return it on ``device`` (int64) and on the CPU."""
    if perm is None:
        return None
    if not isinstance(perm, torch.Tensor) or perm.dim() != 1 or perm.numel() != n or perm.is_floating_point() \
            or perm.dtype == torch.bool:
        raise ValueError(f"token_perm must be an integer tensor of {n} entries")
    hit = lookup(_PERM_CACHE, id(perm))
    if hit is not None and hit[0]() is perm and hit[1] == _version_of(perm) and _unchanged(perm, hit[2]):
        perm_cpu = hit[2]
    else:
        perm_cpu = perm.detach().to("cpu", torch.int64, copy=True)  # a private copy: see _unchanged
        if bool((perm_cpu < 0).any()) or bool((perm_cpu >= n).any()) or \
                not bool((torch.bincount(perm_cpu, minlength=n) == 1).all()):
            raise ValueError("token_perm must be a permutation of range(N)")
        remember(_PERM_CACHE, id(perm), (weakref.ref(perm), _version_of(perm), perm_cpu), _PERM_CACHE_SIZE)
    perm_dev = perm if (perm.device == device and perm.dtype == torch.int64) else perm.to(device, torch.int64)
    return perm_dev, perm_cpu


def _validate_qkv(q, k, v, layout: str):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions ({layout}), got shape {tuple(t.shape)}")
    if layout not in ("BHND", "BNHD"):
        raise ValueError(f"layout must be 'BHND' or 'BNHD', got {layout!r}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape (self-attention), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported (use bf16, fp16, fp32 or fp64)")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if q.numel() == 0:
        raise ValueError(f"q, k, v must not be empty, got shape {tuple(q.shape)}")


@dataclass(frozen=True)
class _Plan:
    """Everything about a call that does not depend on the values of q, k, v and kv_valid: host
    integers and small device constants.  Cached per (shape, settings, ranges, permutation), so a
    model's repeated calls skip the host-side preparation and never synchronise."""

    layout: str
    heads: int
    tokens: int
    backend: str
    #: the Triton backend's forward kernel: "gluon" (pisa_kernels.hopper_kernel, sm90; raises where it
    #: cannot run), "triton" (the portable one) or "auto" (gluon where it can run the call, else triton)
    forward: str
    block: int
    order: int
    cov: bool
    adaptive: bool  # routing "adaptive": the budget shared between tiles (routing.adaptive_route)
    lognormal: bool  # the log-normal tail (only with a tail: order 0 or 1)
    #: the pre-scan's second moments (q2, kvar): for the log-normal tail, and for adaptive routing's
    #: mass estimate with tail="lognormal" whatever the order (drop then selects order 1's blocks)
    moments: bool
    scale: float
    blocks: int
    k_top: int
    k_mean: float  # (1 - sparsity) * blocks: adaptive routing's mean budget per tile (routing.adaptive_budget)
    n_forced: int
    forced: torch.Tensor | None  # [NB] bool on the device, processing order
    perm: torch.Tensor | None  # [N] int64 on the device
    dense_idx: torch.Tensor | None  # query rows that attend everything exactly (input positions, int64)
    dense_flags: torch.Tensor | None  # int8 [N] on the device, processing order: 1 at those rows

    @property
    def exact_blocks(self) -> int:
        return min(self.blocks, self.k_top + self.n_forced)


_PLAN_CACHE: dict[tuple, tuple] = {}
_PLAN_CACHE_SIZE = 64


def _ranges_key(arg):
    """A hashable form of the ranges (pairs, or a bool mask by its values: a plan per call would also
    mean a CUDA graph captured per call); None when malformed (the uncached path raises)."""
    if arg is None:
        return ()
    if isinstance(arg, torch.Tensor):
        if arg.dtype != torch.bool or arg.dim() != 1:
            return None
        return "mask", arg.detach().cpu().numpy().tobytes()
    try:
        return tuple((operator.index(r[0]), operator.index(r[1])) for r in arg)
    except (TypeError, ValueError, IndexError):
        return None  # malformed: the uncached path raises the proper ValueError


def _plan(q, *, sparsity, block_size, order, scale, layout, sink_kv, dense_q, token_perm, routing, tail,
          backend) -> _Plan:
    """Validate the settings and build (or fetch) the call's plan."""
    sparsity = check_sparsity(sparsity)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} (an int), got {block_size!r}")
    order_i = _norm_order(order)
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    sink_key, dense_key = _ranges_key(sink_kv), _ranges_key(dense_q)
    perm_key = None
    if token_perm is not None:
        if not isinstance(token_perm, torch.Tensor):
            raise ValueError("token_perm must be an integer tensor")
        perm_key = (id(token_perm), _version_of(token_perm))
    key = None
    if sink_key is not None and dense_key is not None:
        key = (tuple(q.shape), q.dtype, q.device, layout, float(sparsity), block_size, order_i, scale, routing,
               tail, backend, sink_key, dense_key, perm_key)
        hit = lookup(_PLAN_CACHE, key)
        if hit is not None and (token_perm is None or (hit[1]() is token_perm
                                                       and _unchanged(token_perm, hit[2]))):
            return hit[0]
    plan = _build_plan(q, sparsity=float(sparsity), block_size=block_size, order=order_i, scale=scale,
                       layout=layout, sink_kv=sink_kv, dense_q=dense_q, token_perm=token_perm,
                       routing=routing, tail=tail, backend=backend)
    if key is not None:
        remember(_PLAN_CACHE, key, (plan, weakref.ref(token_perm), _PERM_CACHE[id(token_perm)][2])
                  if token_perm is not None else (plan, None, None), _PLAN_CACHE_SIZE)
    return plan


def _build_plan(q, *, sparsity, block_size, order, scale, layout, sink_kv, dense_q, token_perm, routing, tail,
                backend) -> _Plan:
    seq_dim = 2 if layout == "BHND" else 1
    n, d = q.shape[seq_dim], q.shape[3]
    h = q.shape[1] if layout == "BHND" else q.shape[2]
    scale = float(d ** -0.5 if scale is None else scale)
    dev = q.device
    sink = _token_mask(sink_kv, n, "sink_kv")
    dense_rows = _token_mask(dense_q, n, "dense_q")
    perms = _check_perm(token_perm, n, dev)
    be = resolve_backend(backend, dev)
    forward = backend if backend in ("triton", "gluon") else "auto"
    if be == "triton" and (d > TRITON_MAX_HEAD_DIM or q.dtype == torch.float64):
        if backend in ("triton", "gluon"):
            raise ValueError(f"backend={backend!r} supports head dim <= {TRITON_MAX_HEAD_DIM} and "
                             f"bf16/fp16/fp32; got D={d}, {q.dtype}")
        be = "reference"
    nb = num_blocks(n, block_size)
    if perms is not None and sink is not None:
        sink = sink[perms[1]]
    forced = forced_blocks_from_tokens(sink, block_size)  # CPU
    dense_idx = dense_flags = None
    if dense_rows is not None:
        dense_idx = dense_rows.nonzero().squeeze(1).to(dev)
        dense_flags = (dense_rows[perms[1]] if perms is not None else dense_rows).to(dev, torch.int8)
    return _Plan(layout=layout, heads=h, tokens=n, backend=be, forward=forward, block=block_size, order=order,
                 cov=routing == "cov", adaptive=routing == "adaptive",
                 lognormal=tail == "lognormal" and order >= 0,
                 moments=tail == "lognormal" and (order >= 0 or routing == "adaptive"), scale=scale, blocks=nb,
                 k_top=topk_count(sparsity, nb), k_mean=(1.0 - sparsity) * nb,
                 n_forced=int(forced.sum()) if forced is not None else 0,
                 forced=forced.to(dev) if forced is not None else None,
                 perm=perms[0] if perms is not None else None, dense_idx=dense_idx, dense_flags=dense_flags)


def pisa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sparsity: float = 0.875,
                   block_size: int = 64, order: Union[int, str] = 1, scale: float | None = None,
                   layout: str = "BHND", sink_kv: Ranges = None, dense_q: Ranges = None, kv_valid=None,
                   token_perm: torch.Tensor | None = None, routing: str = "topk", tail: str = "plain",
                   backend: str = "auto",
                   cuda_graph: Union[bool, str] = "auto", return_stats: bool = False):
    """Piecewise sparse attention (self-attention).

    Args:
        q, k, v: ``[B, H, N, D]`` (``layout="BHND"``) or ``[B, N, H, D]`` (``layout="BNHD"``), bf16,
            fp16, fp32 (or fp64 on the reference backend).  Any strides; any ``N``.
        sparsity: fraction of key blocks per query tile that are *not* computed exactly, in
            ``[0, 1)``.  The exact count is ``max(1, floor((1 - sparsity) * NB))``; ``0`` is dense.
        block_size: key block size, 64 or 128 tokens.  Query tiles are always 128 tokens.
        order: ``1`` PISA (exact + zeroth-order + hybrid first-order tail), ``0`` zeroth order only,
            ``"drop"`` / ``-1`` plain block-sparse (the tail is dropped).
        scale: softmax scale, default ``D ** -0.5``.
        sink_kv: key-token ranges ``[(start, end), ...]`` (input positions) whose blocks every query
            tile computes exactly, on top of the top-k budget (e.g. the text of joint attention).
        dense_q: query-token ranges that attend every key exactly (e.g. text queries).
        kv_valid: bool ``[B, N]`` (True = valid) or int lengths ``[B]``.  Invalid keys get exactly zero
            weight in the exact part, the tail and the statistics.
        token_perm: processing order: ``token_perm[i]`` is the input position of the i-th token.  Blocks
            are runs of this order (see :mod:`pisa_kernels.tiling`); the output is in input order.
        routing: ``"topk"`` (pooled score) or ``"cov"`` (pooled score + ``log ||H_j||_F``: blocks whose
            first-order residual is large are computed exactly): the same count in every tile; or
            ``"adaptive"``: ``(1 - sparsity) x NB`` exact blocks per tile *on average* over the call,
            shared between tiles and heads by their estimated mass (pooled logit, block length and,
            with ``tail="lognormal"``, its mass correction), each tile between ``k // 4`` and ``4 k``
            (``k`` = the top-k count); the stats give the per-tile counts (routing.adaptive_route).
        tail: ``"plain"`` (the paper's tail: block ``j`` weighs ``n_j exp(s q . kbar_j)``) or
            ``"lognormal"`` (times ``exp(c_ij)``, ``c_ij = s^2/2 E_i[q^2] . Var_j[k]``: the mass the
            spread of the logits inside a block adds, which RoPE makes large in compact 2-D / 3-D
            tiles).  The node's choice: 32-47 % less error at real sizes, 5-10 % more kernel time at
            a fixed sparsity (docs/fidelity.md).
        backend: ``"triton"``, ``"gluon"``, ``"reference"`` or ``"auto"`` (Triton where it runs, else
            reference, and on sm90 the Gluon forward kernel (:mod:`pisa_kernels.hopper_kernel`) for the
            calls it covers, the Triton one for the rest or where it fails, with a warning;
            ``"triton"`` always the portable Triton kernel, ``"gluon"`` always the Hopper one;
            also the reference, with a warning, where no kernel configuration fits the GPU's shared
            memory for this call, e.g. fp32 of head dim 128 on sm86/89; ``"triton"`` then raises
            :class:`pisa_kernels.backend.KernelDoesNotFit`).
        cuda_graph: ``"auto"`` replays short Triton calls (see :mod:`pisa_kernels.graphs`) as one CUDA
            graph, where a dozen small launches would otherwise cost more CPU time than GPU time;
            ``True`` forces it where possible, ``False`` never.
        return_stats: also return a :class:`PisaStats`.

    Returns:
        The attention output, same shape, layout and dtype as ``q`` (and the stats if asked).
    """
    _validate_qkv(q, k, v, layout)
    settings = dict(sparsity=sparsity, block_size=block_size, order=order, scale=scale, layout=layout,
                    sink_kv=sink_kv, dense_q=dense_q, token_perm=token_perm, routing=routing, tail=tail)
    plan = _plan(q, backend=backend, **settings)
    valid = _valid_mask(kv_valid, q.shape[0], plan.tokens, q.device)
    tiles = [] if return_stats else None
    try:
        out = _run(plan, q, k, v, valid, cuda_graph, tiles)
    except KernelDoesNotFit as exc:
        if backend != "auto":
            raise
        warnings.warn(f"{exc}; PISA uses the PyTorch reference for such calls", RuntimeWarning, stacklevel=2)
        plan = _plan(q, backend="reference", **settings)
        tiles = [] if return_stats else None
        out = _run(plan, q, k, v, valid, cuda_graph, tiles)
    if not return_stats:
        return out
    tile_counts = None
    if tiles:  # [B*H', NQ] per head group -> [B*H, NQ] (batch-major)
        b = q.shape[0]
        tile_counts = torch.cat([t.view(b, -1, t.shape[-1]) for t in tiles], dim=1).view(-1, tiles[0].shape[-1])
    mean = _exact_mean(plan, q)
    stats = PisaStats(backend=plan.backend, blocks=plan.blocks, exact_blocks=plan.exact_blocks,
                      density=mean / plan.blocks, order=plan.order,
                      dense_rows=int(plan.dense_idx.numel()) if plan.dense_idx is not None else 0,
                      tile_counts=tile_counts, exact_mean=mean)
    return out, stats


def _exact_mean(plan: _Plan, q) -> float:
    """Exact blocks per query tile, the call's mean, from host integers: the top-k routing's count,
    or adaptive routing's budget over each routing scope (routing.adaptive_budget)."""
    if not plan.adaptive or plan.exact_blocks == plan.blocks:
        return float(plan.exact_blocks)
    b, nq = q.shape[0], num_blocks(plan.tokens, QUERY_TILE)
    step = _head_step(plan, q)
    chosen = tiles = 0
    for h0 in range(0, plan.heads, step):
        rows = b * min(step, plan.heads - h0)
        chosen += adaptive_budget(plan.k_top, plan.k_mean, rows * nq, plan.blocks, plan.n_forced)
        tiles += rows * nq
    return chosen / tiles + plan.n_forced


def _run(plan: _Plan, q, k, v, valid, cuda_graph, tiles: list | None = None) -> torch.Tensor:
    """The call on its plan's backend, as a CUDA-graph replay where that pays (short Triton calls).
    ``tiles``: where eager adaptive calls append each head group's per-tile counts."""
    from . import graphs

    if valid is None and graphs.wanted(cuda_graph, plan, q):
        return graphs.replay(_execute, plan, q, k, v)
    return _execute(plan, q, k, v, valid, tiles)


#: With a token order, the Triton backend writes k and v in the processing order during its
#: pre-scan (q is read and the output written through the permutation, no copies); the reference
#: gathers q, k, v and scatters its output.  Where q + k + v take at least
#: ``PERM_GROUP_MIN_BYTES``, a call does so for ``PERM_HEAD_GROUPS`` groups of heads one after the
#: other, so the copies take a sixth (Triton: k and v) or a third (reference: q, k, v and the
#: output) of the bytes of q + k + v; each group still fills the GPU at such lengths, smaller calls
#: keep one group and fewer launches.
PERM_HEAD_GROUPS = 4
PERM_GROUP_MIN_BYTES = 256 << 20


def _head_step(plan: _Plan, q) -> int:
    """Heads per group of :func:`_execute` (all, or a ``PERM_HEAD_GROUPS``-th with a long token order)."""
    groups = PERM_HEAD_GROUPS if plan.perm is not None and 3 * q.numel() * q.element_size() >= PERM_GROUP_MIN_BYTES \
        else 1
    return -(-plan.heads // groups)


def _execute(plan: _Plan, q, k, v, valid, tiles: list | None = None) -> torch.Tensor:
    """The device work of one call: pure tensor operations, no host synchronisation (capturable)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # caller's layout and order

    def views():  # [B, H, N, D]; made afresh for each in-place write (autograd tracks out's versions)
        return [t if plan.layout == "BHND" else t.transpose(1, 2) for t in (q, k, v, out)]

    valid_p = valid.index_select(1, plan.perm) if valid is not None and plan.perm is not None else valid
    step = _head_step(plan, q)
    attend_heads = _attend_heads_triton if plan.backend == "triton" else _attend_heads_reference
    for h0 in range(0, plan.heads, step):
        sel = attend_heads(plan, *(t.narrow(1, h0, min(step, plan.heads - h0)) for t in views()), valid_p)
        if tiles is not None and sel.tile_count is not None:
            tiles.append(sel.tile_count)
    if plan.dense_idx is not None and plan.backend != "triton":  # (the Triton kernel computes them itself)
        _dense_rows_inplace(*views(), plan.dense_idx, valid, plan.scale)
    return out


def _kinds(plan: _Plan, stats, valid):
    """The blocks' kinds (routing.block_kinds), or None where every block is full and none forced."""
    if valid is None and plan.forced is None:
        return None
    return block_kinds(stats.blen, plan.tokens, plan.block, plan.forced)


def _call_bytes(plan: _Plan, qh) -> int:
    """The bytes of the whole call's q, k, v, from one head group's q (``qh``: ``[B, H', N, D]``).
    Scratch is sized by the call, not by the group a long token order splits it into: the groups
    run one after another, so the call's budget is free for each, and a group's share (one head's
    scores at Wan 720p) made the routing 40 small launches a call (docs/kernels.md, item 11)."""
    return 3 * qh.numel() // qh.shape[1] * plan.heads * qh.element_size()


def _route(plan: _Plan, stats, kinds, heads: int, chunk: int, select, adaptive_select=None):
    # The reference reads the log-normal mass correction from the routing; the Triton kernel
    # computes it per tile from the pooled second moments.
    return route(stats, scale=plan.scale, k=plan.k_top, heads=heads, kinds=kinds, n_forced=plan.n_forced,
                 cov=plan.cov, tail_bias=plan.lognormal and plan.backend != "triton", chunk_bytes=chunk,
                 select=select, adaptive=plan.adaptive, k_mean=plan.k_mean, adaptive_select=adaptive_select)


def _attend_heads_triton(plan: _Plan, qh, kh, vh, out_h, valid):
    """PISA on ``[B, H', N, D]`` views in the input order (all heads or a group), into ``out_h``;
    ``valid`` in the processing order.  The token order is applied inside the kernels: the
    pre-scan reads k and v through it and writes their processing-order copies (the exact loop's
    tiles must be contiguous rows), q is read and the output written through it.  Returns the
    selection."""
    from . import triton_kernels as tk

    qh, kh, vh = (t if t.stride(-1) == 1 else t.contiguous() for t in (qh, kh, vh))
    valid8 = valid.to(torch.int8).contiguous() if valid is not None else None
    kv = (torch.empty(kh.shape, dtype=kh.dtype, device=kh.device),
          torch.empty(vh.shape, dtype=vh.dtype, device=vh.device)) if plan.perm is not None else (kh, vh)
    stats = tk.pool(qh, kh, vh, valid=valid8, block=plan.block, first_order=plan.order == 1, cov=plan.cov,
                    lognormal=plan.moments, perm=plan.perm, kv_out=kv if plan.perm is not None else None)
    kinds = _kinds(plan, stats, valid)
    sel = _route(plan, stats, kinds, qh.shape[1], routing_chunk_bytes(_call_bytes(plan, qh)),
                 tk.top_blocks, tk.adaptive_blocks)
    dense = None
    if plan.dense_idx is not None:
        every = kinds if kinds is not None else torch.zeros_like(stats.blen, dtype=torch.int8)
        dense = tk.DenseRows(plan.dense_idx, plan.dense_flags, *exact_order(every))
    if not _hopper_attend(plan, qh, kv, out_h, valid8, stats, sel, dense):
        tk.attend(qh, *kv, out_h, valid=valid8, stats=stats, sel=sel, scale=plan.scale, block=plan.block,
                  order=plan.order, perm=plan.perm, dense=dense)
    return sel


#: (device, dtype, head dim, order) of calls whose Hopper kernel failed to compile or launch:
#: they keep the Triton kernel for the rest of the process (warned once).
_HOPPER_FAILED: set = set()


def _hopper_attend(plan: _Plan, qh, kv, out_h, valid8, stats, sel, dense) -> bool:
    """The forward pass with the Gluon Hopper kernel where the plan and the call allow it; False
    where the Triton kernel must run instead (another GPU, a call it does not cover, or a failure,
    warned once; ``backend="gluon"`` raises instead)."""
    if plan.forward == "triton" or (plan.forward == "auto" and hopper_unavailable_reason(qh.device) is not None):
        return False
    from . import hopper_kernel as hk

    why = hk.unsupported_reason(qh, *kv, valid=valid8, block=plan.block, stats=stats, perm=plan.perm)
    if why is not None:
        if plan.forward == "gluon":
            raise ValueError(f"backend='gluon' does not cover this call: {why}")
        return False
    key = (qh.device, qh.dtype, qh.shape[-1], plan.order)
    if key in _HOPPER_FAILED and plan.forward == "auto":
        return False
    try:
        hk.attend(qh, *kv, out_h, valid=valid8, stats=stats, sel=sel, scale=plan.scale, block=plan.block,
                  order=plan.order, perm=plan.perm, dense=dense,
                  call_bytes=_call_bytes(plan, qh))
    except Exception as exc:  # a Gluon that compiles this kernel differently: the portable kernel runs
        if plan.forward == "gluon":
            raise
        _HOPPER_FAILED.add(key)
        warnings.warn(f"PISA's Hopper kernel failed ({type(exc).__name__}: {exc}); the Triton kernel runs such "
                      "calls instead", RuntimeWarning, stacklevel=3)
        return False
    return True


def _attend_heads_reference(plan: _Plan, qh, kh, vh, out_h, valid):
    """The reference on ``[B, H', N, D]`` views: gathered into the processing order, the output
    scattered back; ``valid`` in the processing order.  Returns the selection."""
    perm = plan.perm
    qp, kp, vp = (t if perm is None else t.index_select(2, perm) for t in (qh, kh, vh))
    chunk = routing_chunk_bytes(_call_bytes(plan, qh))

    chosen = []

    def route_fn(stats):
        chosen.append(_route(plan, stats, _kinds(plan, stats, valid), qh.shape[1], chunk, top_blocks))
        return chosen[-1]

    res = reference.reference_forward(qp, kp, vp, valid, scale=plan.scale, block=plan.block, order=plan.order,
                                      cov=plan.cov, route_fn=route_fn, lognormal=plan.lognormal,
                                      moments=plan.moments)
    if perm is None:
        out_h.copy_(res)
    else:
        out_h.index_copy_(2, perm, res.to(out_h.dtype))
    return chosen[0]


def _dense_rows_inplace(qh, kh, vh, out_h, idx: torch.Tensor, valid, scale: float) -> None:
    """Overwrite the output of the query rows ``idx`` with exact attention over all (valid) keys."""
    qr = qh.index_select(2, idx)
    if qh.device.type != "cuda" and qh.dtype in (torch.float16, torch.bfloat16):
        # Off CUDA, SDPA on 16-bit (strided) inputs takes the math path, which reduces in 16 bits
        # once ComfyUI has called allow_fp16_bf16_reduction_math_sdp(True) (it does at import):
        # 30x the error in a fuzz case.  The fused CUDA kernels accumulate in fp32 anyway.
        qr, kh, vh = (t.float() for t in (qr, kh, vh))
    mask = None if valid is None else valid[:, None, None, :]
    # A batch element without any valid key attends nothing: zero, as in the kernels.  SDPA's answer
    # for a fully masked row depends on its backend (0 from the CPU math path; a non-zero value from
    # a fused CUDA kernel, seen in the GPU fuzz on an H200).
    has_key = None if mask is None else mask.any(-1, keepdim=True)
    # Chunk the rows so the math fallback of SDPA never builds a huge [rows, N] matrix per head.
    step = max(1, (1 << 26) // max(1, qh.shape[0] * qh.shape[1] * kh.shape[2]))
    for s in range(0, idx.numel(), step):
        o = torch.nn.functional.scaled_dot_product_attention(qr[:, :, s:s + step], kh, vh, attn_mask=mask,
                                                             scale=scale)
        if has_key is not None:
            o = torch.where(has_key, o, 0.0)
        out_h.index_copy_(2, idx[s:s + step], o.to(out_h.dtype))


__all__ = ["pisa_attention", "PisaStats", "QUERY_TILE"]
