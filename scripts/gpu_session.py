"""One device call that checks and times the kernels (METHOD.md: few, full calls).

    python scripts/gpu_session.py [--skip-check | --ab-lognormal | --profile-short]

1. environment; 2. Triton vs reference (bf16/fp16, all orders, both tails, masks, token order)
at moderate shapes; CUDA-graph replay; 3. Wan 720p timing breakdown (pre-scan, routing, forward
with tensor-descriptor loads and with pointer loads, the node's tiled call).  Kernel variants are
arguments of the library's functions (``attend(tma=...)``), never module switches flipped here.
"""
import argparse
import json
import sys
import time

import torch

sys.path.insert(0, ".")
from pisa_kernels import pisa_attention, tiling  # noqa: E402
from pisa_kernels import triton_kernels as tk  # noqa: E402
from pisa_lab.bench import SHAPES  # noqa: E402
from pisa_lab.measure import environment, rel_l2, sdpa, time_ms  # noqa: E402
from pisa_kernels.routing import num_blocks, route, topk_count  # noqa: E402


def check_correctness():
    torch.manual_seed(0)
    worst = 0.0
    for (b, h, n, d, dt) in [(2, 4, 3000, 128, torch.bfloat16), (1, 3, 2100, 64, torch.float16),
                              (1, 2, 1000, 128, torch.float32)]:
        q, k, v = (torch.randn(b, n, h, d, device="cuda").to(dt) for _ in range(3))
        valid = torch.ones(b, n, dtype=torch.bool, device="cuda")
        valid[0, n - 300:] = False
        perm = tiling.tile_permutation((3, 10, n // 30), block_size=64, device="cuda") if n % 30 == 0 else None
        for order in (1, 0, "drop"):
            for kw in ({}, {"kv_valid": valid}, {"token_perm": perm}, {"routing": "cov", "sink_kv": [(0, 70)],
                                                                       "dense_q": [(10, 40)]},
                       {"tail": "lognormal"}, {"tail": "lognormal", "kv_valid": valid, "token_perm": perm}):
                if "token_perm" in kw and perm is None:
                    continue
                r = pisa_attention(q, k, v, sparsity=0.8, order=order, layout="BNHD", backend="reference", **kw)
                o = pisa_attention(q, k, v, sparsity=0.8, order=order, layout="BNHD", backend="triton", **kw)
                e = rel_l2(o, r)
                worst = max(worst, e)
                print(f"check {dt} n={n} d={d} order={order} {kw.get('tail', '')} {list(kw)} rel_l2={e:.2e}")
        o = pisa_attention(q, k, v, sparsity=0.0, layout="BNHD", backend="triton")
        ref = sdpa(q.float(), k.float(), v.float(), torch.nn.attention.SDPBackend.MATH)
        print(f"sparsity0 vs dense {dt}: {rel_l2(o, ref):.2e}")
    print(f"worst triton-vs-reference rel L2: {worst:.2e}")


def check_graphs():
    """CUDA-graph replay == eager, and its speed at the FLUX 1024² shape; fp32 / 128-token blocks."""
    for n, h in ((4608, 24), (4352, 24)):
        q, k, v = (torch.randn(1, n, h, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        perm = tiling.joint_permutation(n, (64, n // 64 - 4) if n == 4608 else (64, 64), 256, device="cuda") \
            if n == 4352 else None
        kw = dict(sparsity=0.85, layout="BNHD", token_perm=perm, sink_kv=[(0, 256)], dense_q=[(0, 256)])
        eager = pisa_attention(q, k, v, cuda_graph=False, **kw)
        graphed = pisa_attention(q, k, v, cuda_graph=True, **kw)
        graphed2 = pisa_attention(q * 1.5, k, v, cuda_graph=True, **kw)
        eager2 = pisa_attention(q * 1.5, k, v, cuda_graph=False, **kw)
        print(f"graph n={n}: rel L2 graph vs eager {rel_l2(graphed, eager):.1e}, new inputs {rel_l2(graphed2, eager2):.1e}; "
              f"eager {time_ms(lambda: pisa_attention(q, k, v, cuda_graph=False, **kw)):.3f} ms, "
              f"graph {time_ms(lambda: pisa_attention(q, k, v, cuda_graph=True, **kw)):.3f} ms, "
              f"cuDNN {time_ms(lambda: sdpa(q, k, v, torch.nn.attention.SDPBackend.CUDNN_ATTENTION)):.3f} ms")
    for dt in (torch.float32, torch.bfloat16):
        for bs in (64, 128):
            q, k, v = (torch.randn(1, 2000, 4, 128, device="cuda").to(dt) for _ in range(3))
            r = pisa_attention(q, k, v, sparsity=0.8, layout="BNHD", backend="reference", block_size=bs)
            o = pisa_attention(q, k, v, sparsity=0.8, layout="BNHD", backend="triton", block_size=bs)
            print(f"config check {dt} block {bs}: rel L2 vs reference {rel_l2(o, r):.2e}")


def breakdown(n=75600, h=40, d=128, sparsity=0.875):
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    nb = num_blocks(n, 64)
    kk = topk_count(sparsity, nb)
    st = tk.pool(qh, kh, vh, valid=None, block=64, first_order=True, cov=False)
    res = {}
    res["pool_ms"] = time_ms(lambda: tk.pool(qh, kh, vh, valid=None, block=64, first_order=True, cov=False))
    res["pool_nomoment_ms"] = time_ms(lambda: tk.pool(qh, kh, vh, valid=None, block=64, first_order=False, cov=False))
    res["route_ms"] = time_ms(lambda: route(st, scale=d ** -0.5, k=kk, heads=h, cov=False,
                                            select=tk.top_blocks))
    res["dense_cudnn_ms"] = time_ms(lambda: sdpa(q, k, v, torch.nn.attention.SDPBackend.CUDNN_ATTENTION))
    from pisa_kernels.routing import Selection
    sel = route(st, scale=d ** -0.5, k=kk, heads=h, cov=False)
    out = torch.empty_like(qh)
    tail_only = Selection(sel.idx, sel.mask, 0)
    res["attend_tail_only_ms"] = time_ms(lambda: tk.attend(qh, kh, vh, out, valid=None, stats=st, sel=tail_only,
                                                           scale=d ** -0.5, block=64, order=1))
    for order in (1, -1):
        for tma in (True, False):
            res[f"attend_o{order}{'' if tma else '_pointer_loads'}_ms"] = time_ms(
                lambda: tk.attend(qh, kh, vh, out, valid=None, stats=st, sel=sel, scale=d ** -0.5, block=64,
                                  order=order, tma=tma))
    perm = tiling.tile_permutation((21, 45, 80), block_size=64, device="cuda")
    res["pisa_default_tiled_ms"] = time_ms(lambda: pisa_attention(q, k, v, sparsity=sparsity, layout="BNHD",
                                                                  token_perm=perm))
    for order in (1, -1):
        compiled = tk.attend(qh, kh, vh, out, valid=None, stats=st, sel=sel, scale=d ** -0.5, block=64,
                             order=order, return_kernel=True)
        res[f"kernel_o{order}_regs_spills"] = (compiled.n_regs, compiled.n_spills)
    print(json.dumps(res, indent=1))
    return res


def ab_lognormal(shapes=((75600, 40), (32760, 40), (119056, 24)), d=128, sparsity=0.875):
    """Cost of the log-normal tail against the plain one, interleaved, per shape."""
    for n, h in shapes:
        q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        res = {}
        for rnd in range(2):
            for tail in ("plain", "lognormal"):
                fn = lambda: pisa_attention(q, k, v, sparsity=sparsity, layout="BNHD", tail=tail)
                res.setdefault(tail, []).append(round(time_ms(fn), 3))
        print(f"N={n} H={h}: {json.dumps(res)}")


def profile_short(name="flux1024", sparsity=0.85, d=128):
    """Kernel-by-kernel GPU time of one eager call at a short shape (which launches cost what),
    against the CUDA-graph replay of the same call."""
    from torch.profiler import ProfilerActivity, profile

    n, h = SHAPES[name]
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for tail in ("plain", "lognormal"):
        fn = lambda: pisa_attention(q, k, v, sparsity=sparsity, layout="BNHD", tail=tail, cuda_graph=False)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        print(f"profile {name} {tail} (20 eager calls):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
        g = lambda: pisa_attention(q, k, v, sparsity=sparsity, layout="BNHD", tail=tail, cuda_graph=True)
        print(f"{name} {tail}: eager {time_ms(fn):.4f} ms, graph {time_ms(g):.4f} ms, cuDNN "
              f"{time_ms(lambda: sdpa(q, k, v, torch.nn.attention.SDPBackend.CUDNN_ATTENTION)):.4f} ms", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--ab-lognormal", action="store_true", help="only the cost of the log-normal tail")
    ap.add_argument("--profile-short", action="store_true", help="kernel times of one FLUX 1024² call")
    args = ap.parse_args()
    if args.profile_short:
        print(json.dumps(environment()))
        profile_short()
        raise SystemExit(0)
    if args.ab_lognormal:
        print(json.dumps(environment()))
        ab_lognormal()
        raise SystemExit(0)
    print(json.dumps(environment()))
    t = time.time()
    if not args.skip_check:
        check_correctness()
    check_graphs()
    print(f"check took {time.time() - t:.1f}s")
    breakdown()
