"""Shared helpers of the kernel tests: input generators (random and structured, never zeros),
routing capture/replay, tolerances and error metrics."""

from __future__ import annotations

import contextlib
import math

import torch

from pisa_kernels import api as pisa_api
from pisa_kernels import graphs as pisa_graphs
from pisa_kernels import pisa_attention
from pisa_kernels.routing import Selection, mass_bias

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Max |a - b| / max(1, max |oracle|) allowed per compute dtype of the inputs (outputs are rounded
#: to the input dtype: fp16 has 11 significant bits, bf16 8).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def rand_qkv(b, h, n, d, *, dtype=torch.float32, layout="BHND", seed=0, q_scale=1.0, k_scale=1.0,
             v_shift=0.0, device="cpu"):
    """Gaussian q, k, v in the requested layout (contiguous in that layout).  ``v_shift`` gives the
    values a common offset so that mean-vs-sum bugs in the tail (pitfall 1) are visible."""
    g = gen(seed)
    shape = (b, h, n, d) if layout == "BHND" else (b, n, h, d)
    q = torch.randn(shape, generator=g, dtype=torch.float64) * q_scale
    k = torch.randn(shape, generator=g, dtype=torch.float64) * k_scale
    v = torch.randn(shape, generator=g, dtype=torch.float64) + v_shift
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def structured_qkv(b, h, grid, d, *, dtype=torch.float32, layout="BHND", seed=0, device="cpu",
                   n_extra=0):
    """DiT-like tokens: ``n_extra`` "text" tokens first (large-norm keys: they attract attention
    like real sinks), then a 2-D grid whose q/k/v are smooth functions of the position (random
    Fourier features) plus a little noise, so neighbouring tokens look alike and pooled scores
    are meaningful; the values carry a common offset."""
    g = gen(seed)
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    pos = torch.stack([yy.flatten() / max(1, gh), xx.flatten() / max(1, gw)], dim=-1)  # [G, 2]

    def field(amp):
        freqs = torch.randn(h, 2, d, generator=g, dtype=torch.float64) * 6.0
        phase = torch.rand(h, 1, d, generator=g, dtype=torch.float64) * 2 * math.pi
        f = torch.sin(pos @ freqs + phase) * amp  # [H, G, D]
        return f + 0.1 * torch.randn(b, h, gh * gw, d, generator=g, dtype=torch.float64)

    q, k, v = field(1.5), field(1.5), field(1.0) + 0.5
    if n_extra:
        tq = torch.randn(b, h, n_extra, d, generator=g, dtype=torch.float64)
        tk = torch.randn(b, h, n_extra, d, generator=g, dtype=torch.float64) * 3.0
        tv = torch.randn(b, h, n_extra, d, generator=g, dtype=torch.float64)
        q, k, v = torch.cat([tq, q], 2), torch.cat([tk, k], 2), torch.cat([tv, v], 2)
    out = []
    for t in (q, k, v):
        if layout == "BNHD":
            t = t.transpose(1, 2).contiguous()
        out.append(t.to(device=device, dtype=dtype))
    return tuple(out)


def block_constant_qkv(b, h, n, d, *, block, perm=None, dtype=torch.float64, seed=0):
    """Keys constant inside every key block of the processing order (BHND): then the zeroth-order
    tail is exact and ``H_j = 0``, so orders 1, 0 and dense attention coincide exactly."""
    g = gen(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, n, d, generator=g, dtype=torch.float64) + 0.3
    nb = -(-n // block)
    kb = torch.randn(b, h, nb, d, generator=g, dtype=torch.float64) * 1.5
    kp = kb.repeat_interleave(block, dim=2)[:, :, :n]  # processing order
    k = torch.empty_like(kp)
    p = torch.arange(n) if perm is None else perm
    k[:, :, p] = kp
    return tuple(t.to(dtype) for t in (q, k, v))


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A BHND tensor as a (contiguous) tensor of ``layout``."""
    return t if layout == "BHND" else t.transpose(1, 2).contiguous()


def strided_variant(t: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """The same values as ``t`` behind unusual strides (the kernels must honour strides, pitfall 8).

    * ``"d2"``: every other element of a twice-wider head dim (non-unit last stride);
    * ``"n2"``: every other token of a twice-longer sequence;
    * ``"transposed"``: a ``transpose(1, 2)`` view of the other layout;
    * ``"offset"``: a slice starting at a non-zero storage offset.
    """
    g = gen(seed)
    if kind == "d2":
        big = torch.randn(*t.shape[:-1], 2 * t.shape[-1], generator=g, dtype=torch.float64).to(t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "n2":
        shape = list(t.shape)
        shape[2] *= 2
        big = torch.randn(shape, generator=g, dtype=torch.float64).to(t.dtype)
        big[:, :, ::2] = t
        return big[:, :, ::2]
    if kind == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "offset":
        big = torch.randn(t.shape[0] + 1, *t.shape[1:], generator=g, dtype=torch.float64).to(t.dtype)
        big[1:] = t
        return big[1:]
    raise ValueError(kind)


def max_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    """max |out - oracle| / max(1, max |oracle|), in float64 (NaN if either has a NaN)."""
    a = out.detach().to("cpu", torch.float64)
    o = oracle.detach().to("cpu", torch.float64)
    assert a.shape == o.shape, (a.shape, o.shape)
    if not (torch.isfinite(a).all() and torch.isfinite(o).all()):
        return math.nan
    return float((a - o).abs().max()) / max(1.0, float(o.abs().max()))


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    a = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


def assert_close_to(out, oracle, tol, what=""):
    err = max_err(out, oracle)
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.1e}"


@contextlib.contextmanager
def capture_routing(replay: Selection | None = None):
    """Records every routing decision of :func:`pisa_attention` (``api.route`` is looked up at
    call time) as ``(stats, selection, kwargs)``.  With ``replay``, the routing returns that
    selection instead, so two backends can be compared on exactly the same blocks (inputs with
    tied scores, where either choice is correct).

    Inside, calls run eagerly, never as a CUDA graph (``graphs.wanted`` says no): a graph's first
    call routes twice (warm-up and capture) and its replays not at all, so the log would not hold
    one decision per call, and a replayed selection would be baked into a cached graph that later
    calls replay.  :func:`assert_graph_path_is_eager` checks the graph path against the eager one.
    """
    orig, orig_wanted = pisa_api.route, pisa_graphs.wanted
    log = []

    def wrapped(stats, **kw):
        sel = orig(stats, **kw)
        if replay is not None:
            dev = stats.qbar.device
            assert replay.mask.shape == sel.mask.shape, (replay.mask.shape, sel.mask.shape)
            chosen = replay.mask.to(dev)
            bias = None
            if sel.tail_bias is not None:  # this backend's own mass correction on the replayed blocks
                bias = mass_bias(stats.q2, stats.kvar, kw["scale"]).masked_fill(chosen.bool(), -torch.inf)
            sel = Selection(replay.idx.to(dev), chosen, replay.count, bias,
                            replay.counts.to(dev) if replay.counts is not None else None,
                            replay.tile_count.to(dev) if replay.tile_count is not None else None)
        log.append((stats, sel, kw))
        return sel

    pisa_api.route = wrapped
    pisa_graphs.wanted = lambda mode, plan, q: False
    try:
        yield log
    finally:
        pisa_api.route, pisa_graphs.wanted = orig, orig_wanted


def selection_of(log) -> Selection:
    assert len(log) == 1, f"expected one routing call, got {len(log)}"
    return log[0][1]


def assert_same_selection(a: Selection, b: Selection) -> None:
    """Two selections bit for bit: idx, mask, counts, tile counts, tail bias and width."""
    for name in ("idx", "mask", "counts", "tile_count", "tail_bias"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            x, y = x.cpu(), y.cpu()
            assert x.dtype == y.dtype and torch.equal(x, y), (name, (x != y).nonzero()[:8].tolist())
    assert a.count == b.count


def adaptive_selection_case(case: str, device):
    """The pooled statistics and ``routing.adaptive_route`` arguments of the full-size comparison of
    the Triton adaptive selection with the sorted one (test_gpu.py's
    ``test_adaptive_triton_selection_is_the_sorted_one``; also scripts/adaptive_select_gpu_check.py's
    stage-by-stage check): random statistics of Wan2.1 720p (``"wan720"``: BH=40, 591 tiles, 1,182
    blocks; ``"wan720_kinds_lognormal"``: with sinks, empty and partial blocks and the log-normal mass
    correction), FLUX 1024² with its text sinks (``"flux_joint"``, 72 blocks), and ``"small"``
    (47 blocks, the kinds case's features: the script's CPU self-test)."""
    from pisa_kernels import routing as R

    n, h = {"flux_joint": (4608, 24), "small": (3000, 2)}.get(case, (75600, 40))
    nb, nq, d = R.num_blocks(n, 64), R.num_blocks(n, 128), 128
    g = torch.Generator(device=device).manual_seed(3)
    blen = (n - 64 * torch.arange(nb, device=device)).clamp(max=64).float().unsqueeze(0)
    second = case != "wan720"
    st = R.PooledStats(qbar=3 * torch.randn(h, nq, d, device=device, generator=g),
                       kbar=torch.randn(h, nb, d, device=device, generator=g), vsum=None, blen=blen, hsum=None,
                       covnorm=None, q2=torch.rand(h, nq, d, device=device, generator=g) if second else None,
                       kvar=torch.rand(h, nb, d, device=device, generator=g) if second else None)
    kinds, n_forced = None, 0
    if case != "wan720":
        forced = torch.zeros(nb, dtype=torch.bool, device=device)
        forced[:8] = True  # 512 tokens of text
        if case in ("wan720_kinds_lognormal", "small"):
            blen[0, 3] = 17.0  # a partial sink
            blen[0, 600:640] = 0.0  # empty blocks
            blen[0, 700:705] = 40.0
            if case == "small":
                blen[0, 20:23] = 0.0
                blen[0, 30:32] = 40.0
        kinds, n_forced = R.block_kinds(blen, n, 64, forced), 8
    k = R.topk_count(0.875, nb)
    chunk = R.routing_chunk_bytes(3 * h * n * d * 2)
    return st, dict(scale=d ** -0.5, k=k, heads=h, kinds=kinds, n_forced=n_forced, chunk_bytes=chunk,
                    k_mean=0.125 * nb)


def assert_graph_path_is_eager(q, k, v, tol: float, **kw) -> None:
    """On CUDA: the call through a CUDA graph equals the eager call (backend ``"auto"``: the
    forward kernel the node gets, on sm90 the Hopper one where it covers the call), on these values (a
    capture, or a replay of an earlier case's graph) and on other values (``k, v, q`` in the roles
    of ``q, k, v``: the same shapes, strides and settings, so a replay of the same graph), which
    fails if a replay read anything stale.  Calls with ``kv_valid`` run eagerly either way
    (api._run).  The two paths can differ in the last bits (the first-order moments meet through
    fp32 atomics; the graph's input copies may take other load paths), hence a tolerance; a stale
    replay is off by O(1)."""
    if q.device.type != "cuda":
        return
    for args in ((q, k, v), (k, v, q)):
        graph = pisa_attention(*args, backend="auto", cuda_graph=True, **kw)
        eager = pisa_attention(*args, backend="auto", cuda_graph=False, **kw)
        err = max_err(graph, eager)
        assert err <= tol, f"CUDA-graph call vs eager call: max error {err:.3e} > {tol:.1e}"


def same_selection_on_nonempty(mask_a: torch.Tensor, mask_b: torch.Tensor, blen: torch.Tensor, heads: int):
    """Whether two ``[BH, NQ, NB]`` selections agree on every block that has a valid key (blocks
    without valid keys contribute nothing either way, so their tie-break is free)."""
    a, b = mask_a.cpu().bool(), mask_b.cpu().bool()
    nonempty = (blen.cpu() > 0).repeat_interleave(heads, dim=0)[:, None, :]  # [BH, 1, NB]
    return bool(((a == b) | ~nonempty).all())


def adaptive_forward(q, k, v, *, sparsity: float, reorder: bool, lognormal: bool = False):
    """The Triton path of an adaptive call by hand (pre-scan, adaptive routing at the widget's
    budget, forward), so that the forward's launch order can be chosen (``attend(reorder=...)``);
    ``[B, H, N, D]`` inputs, no mask, token order or sinks.  Returns ``(out, selection)``."""
    from pisa_kernels import triton_kernels as tk
    from pisa_kernels.routing import num_blocks, route, topk_count

    q, k, v = (t.contiguous() for t in (q, k, v))
    b, h, n, d = q.shape
    nb = num_blocks(n, 64)
    stats = tk.pool(q, k, v, valid=None, block=64, first_order=True, cov=False, lognormal=lognormal)
    sel = route(stats, scale=d ** -0.5, k=topk_count(sparsity, nb), heads=h, select=tk.top_blocks, adaptive=True,
                k_mean=(1.0 - sparsity) * nb)
    out = torch.empty_like(q)
    tk.attend(q, k, v, out, valid=None, stats=stats, sel=sel, scale=d ** -0.5, block=64, order=1, reorder=reorder)
    return out, sel


def joint_text_case(b: int, dtype, seed: int):
    """The node's HunyuanVideo-like call at test size: ``[text | grid]`` with 40 text tokens (the
    last 15 padding), a 13 x 20 grid, the text exact as keys and rows, the joint token order.
    Returns ``(q, k, v, keyword arguments)``."""
    from pisa_kernels.tiling import joint_permutation

    grid, n_text = (13, 20), 40
    n = n_text + grid[0] * grid[1]
    q, k, v = rand_qkv(b, 2, n, 64, dtype=dtype, seed=seed, v_shift=0.5)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[:, 25:n_text] = False
    return q, k, v, {"kv_valid": valid, "sink_kv": [(0, n_text)], "dense_q": [(0, n_text)],
                     "token_perm": joint_permutation(n, grid, n_text)}
