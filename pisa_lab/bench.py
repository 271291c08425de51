"""Kernel benchmark: PISA against dense SDPA (cuDNN and flash backends) and, when importable,
ComfyUI's Sol-Attn kernel (``comfy_kitchen.sol_attn``), at DiT shapes, in one process.

    python -m pisa_lab.bench                      # all shapes, table on stdout
    python -m pisa_lab.bench --shapes wan720 --json out.json
    python -m pisa_lab.bench --tails plain lognormal   # also order 1 with the log-normal tail
    python -m pisa_lab.bench --node-calls             # the node's real calls (bench_node_calls)
    python -m pisa_lab.bench --head-dim 64 --extra-n 50000 200000   # head dim 64, other lengths

Times are medians of CUDA-event timings (``triton.testing.do_bench``) after warm-up.  The error
column is the relative L2 error against the cuDNN output on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from pisa_kernels import pisa_attention

from .measure import environment, make_inputs, peak_extra_mb, rel_l2, sdpa, time_ms

#: name -> (tokens N, heads H); B = 1, D = 128, bf16 (issue #2).
SHAPES = {
    "wan720": (75600, 40),
    "hunyuan720": (119056, 24),
    "wan480": (32760, 40),
    "flux1024": (4608, 24),
}
SPARSITIES = (0.75, 0.875, 0.9)
ORDERS = (1, 0, "drop")


def dense_flops(b: int, h: int, n: int, d: int) -> float:
    """Two GEMMs of N x N x D per head: 4 N^2 D."""
    return 4.0 * b * h * n * n * d


def _sol_attn():
    try:
        import comfy_kitchen

        if hasattr(comfy_kitchen, "sol_attn") and comfy_kitchen.sol_attn_is_available(torch.device("cuda")):
            return comfy_kitchen.sol_attn
    except Exception as exc:  # noqa: BLE001 - any import failure just means "no peer"
        print(f"[bench] comfy_kitchen.sol_attn unavailable: {exc}", file=sys.stderr)
    return None


def prescan_routing_ms(q, k, v, sparsity: float, block: int = 64, lognormal: bool = False,
                       routing: str = "topk") -> float:
    """Time of the pre-scan plus routing alone (as :func:`pisa_attention` runs them for bf16 inputs
    without a mask), the fixed overhead of a PISA call, for ``routing`` (``"cov"``: with the blocks'
    residual norms; ``"adaptive"``: the budget shared between tiles, its Triton selection, with the
    log-normal mass estimate where ``lognormal``)."""
    from pisa_kernels import triton_kernels as tk
    from pisa_kernels.routing import num_blocks, route, routing_chunk_bytes, topk_count

    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    h = qh.shape[1]
    nb = num_blocks(qh.shape[2], block)
    kk = topk_count(sparsity, nb)
    scale = qh.shape[-1] ** -0.5
    adaptive, cov = routing == "adaptive", routing == "cov"

    chunk = routing_chunk_bytes(3 * q.numel() * q.element_size())

    def run():
        st = tk.pool(qh, kh, vh, valid=None, block=block, first_order=True, cov=cov, lognormal=lognormal)
        return route(st, scale=scale, k=kk, heads=h, cov=cov, chunk_bytes=chunk, select=tk.top_blocks,
                     adaptive=adaptive, k_mean=(1.0 - sparsity) * nb, adaptive_select=tk.adaptive_blocks)

    return time_ms(run)


def bench_shape(name: str, n: int, h: int, *, data: str, b: int = 1, d: int = 128, seed: int = 0,
                sparsities=SPARSITIES, orders=ORDERS, block: int = 64, tails=("plain",),
                routings=("topk",), kernels=("triton",)) -> list[dict]:
    """Dense SDPA, PISA (every order with the plain tail; order 1 with each other tail in ``tails``)
    and Sol-Attn on one set of inputs.  Each routing of ``routings`` other than ``topk`` adds order 1
    with every tail (``pisa-o1@adaptive``).  Each PISA row runs with every forward kernel of
    ``kernels`` (``pisa_attention``'s backend ``triton`` or ``gluon``; rows of the Hopper kernel
    are labelled ``/gluon``); the pre-scan and the routing (the same code before either kernel) are
    timed once and their share given against every kernel's call; the memory is each kernel's."""
    from torch.nn.attention import SDPBackend

    dev = torch.device("cuda")
    q, k, v = make_inputs(data, b, h, n, d, seed, dev)
    flops = dense_flops(b, h, n, d)
    rows = []

    def add(method, sparsity, ms, out, ref, **extra):
        rows.append(dict(shape=name, N=n, H=h, data=data, method=method, sparsity=sparsity, ms=ms,
                         tflops=flops / ms / 1e9, err=rel_l2(out, ref) if ref is not None else 0.0, **extra))

    ref = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)
    add("dense-cudnn", 0.0, time_ms(lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)), ref, None)
    out = sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)
    add("dense-flash", 0.0, time_ms(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)), out, ref)
    qkv_mb = 3 * q.numel() * q.element_size() / 2**20
    runs = [(order, "plain") for order in orders] + [(1, t) for t in tails if t != "plain" and 1 in orders]
    for sp in sparsities:
        prescan = {}  # (routing, tail) -> ms, measured once per sparsity

        def bar_extras(fn, routing, tail, sp=sp):
            """The bars' figures of one PISA row: its extra memory and the (shared) pre-scan + routing."""
            if (routing, tail) not in prescan:
                prescan[routing, tail] = prescan_routing_ms(q, k, v, sp, block, tail == "lognormal", routing)
            return dict(extra_mem_mb=peak_extra_mb(fn), qkv_mb=qkv_mb, prescan_routing_ms=prescan[routing, tail])

        for kernel in kernels:
            suffix = "" if kernel == "triton" else f"/{kernel}"
            for order, tail in runs:
                fn = lambda sp=sp, order=order, tail=tail, kernel=kernel: pisa_attention(
                    q, k, v, sparsity=sp, order=order, layout="BNHD", block_size=block, tail=tail, backend=kernel)
                out = fn()
                extra = {}
                if order == 1 and sp == 0.875:  # (each kernel's memory: the Hopper one adds the tail's bias)
                    extra = bar_extras(fn, "topk", tail)
                add(f"pisa-o{order}" + ("+ln" if tail == "lognormal" else "") + suffix, sp, time_ms(fn), out, ref,
                    **extra)
            for routing in (r for r in routings if r != "topk"):
                for tail in dict.fromkeys(("plain",) + tuple(tails)):
                    fn = lambda sp=sp, tail=tail, routing=routing, kernel=kernel: pisa_attention(
                        q, k, v, sparsity=sp, order=1, layout="BNHD", block_size=block, tail=tail, routing=routing,
                        backend=kernel)
                    out = fn()
                    label = "pisa-o1" + ("+ln" if tail == "lognormal" else "") + f"@{routing}" + suffix
                    extra = {}
                    if sp == 0.875:
                        extra = bar_extras(fn, routing, tail)
                    add(label, sp, time_ms(fn), out, ref, **extra)
    sol = _sol_attn() if d == 128 else None  # (its fused kernels take head dim 128 only)
    if sol is not None:
        for sp in sparsities:
            fn = lambda: sol(q, k, v, topk_ratio=1.0 - sp)
            out = fn()
            add("sol-attn-topk", sp, time_ms(fn), out, ref)
        fn = lambda: sol(q, k, v, tau=1.3)
        out = fn()
        add("sol-attn-tau1.3", float("nan"), time_ms(fn), out, ref)
    return rows


def format_table(rows: list[dict]) -> str:
    base = {(r["shape"], r["data"]): r["ms"] for r in rows if r["method"] == "dense-cudnn"}
    lines = [f"{'shape':<11} {'data':<6} {'method':<16} {'sparsity':>8} {'ms':>9} {'vs cuDNN':>8} "
             f"{'TFLOP/s':>8} {'rel L2':>8}"]
    for r in rows:
        sp = "-" if (r["sparsity"] == 0.0 or math.isnan(r["sparsity"])) else f"{r['sparsity']:.3f}"
        lines.append(f"{r['shape']:<11} {r['data']:<6} {r['method']:<16} {sp:>8} {r['ms']:>9.3f} "
                     f"{base[(r['shape'], r['data'])] / r['ms']:>7.2f}x {r['tflops']:>8.1f} {r['err']:>8.4f}")
        if "qkv_mb" in r:
            lines.append(f"{'':<11} {'':<6} {'':<16} {_note(r)}")
    return "\n".join(lines)


def _note(r: dict) -> str:
    """A PISA row's pre-scan + routing share (where measured) and extra memory."""
    pre = (f"pre-scan + routing {r['prescan_routing_ms']:.2f} ms = {100 * r['prescan_routing_ms'] / r['ms']:.1f}% of "
           "the call; ") if "prescan_routing_ms" in r else ""
    return f"{pre}extra memory {r['extra_mem_mb']:.0f} MiB = {100 * r['extra_mem_mb'] / r['qkv_mb']:.1f}% of q+k+v"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--data", nargs="*", default=["random"], choices=["random", "dit"])
    ap.add_argument("--sparsities", nargs="*", type=float, default=list(SPARSITIES))
    ap.add_argument("--block-size", type=int, default=64, choices=[64, 128])
    ap.add_argument("--tails", nargs="*", default=["plain"], choices=["plain", "lognormal"],
                    help="tails of order 1 (plain: the paper's; lognormal: the node's in tiled order)")
    ap.add_argument("--routings", nargs="*", default=["topk"], choices=["topk", "cov", "adaptive"],
                    help="routings of order 1 besides topk (adaptive also times its tiles in launch order)")
    ap.add_argument("--kernels", nargs="*", default=["triton"], choices=["triton", "gluon"],
                    help="forward kernels of the PISA rows (gluon: the Hopper kernel, sm90)")
    ap.add_argument("--json", help="write rows and environment to this file")
    ap.add_argument("--md", help="write the table as markdown (with the environment) to this file")
    ap.add_argument("--head-dim", type=int, default=128, choices=[64, 128],
                    help="head dim of every shape (64: the shapes' tokens and heads at D = 64, no Sol-Attn rows)")
    ap.add_argument("--extra-n", nargs="*", type=int, default=[],
                    help="also time these sequence lengths (H=24, B=1): the dense/sparse crossover")
    ap.add_argument("--node-calls", action="store_true",
                    help="instead: the node's real calls next to the bare call (pisa_lab.bench_node_calls)")
    args = ap.parse_args(argv)
    if args.node_calls:
        from . import bench_node_calls

        return bench_node_calls.main(["--data", args.data[0]] + (["--json", args.json] if args.json else []))
    if not torch.cuda.is_available():
        print("pisa_lab.bench needs a CUDA GPU (the kernels are timed against cuDNN); "
              "run `python -m pisa_lab.demo` for the CPU demo.", file=sys.stderr)
        return 2
    env = environment()
    print(json.dumps(env))
    rows = []
    for data in args.data:
        for name in args.shapes:
            n, h = SHAPES[name]
            sps = tuple(args.sparsities) + ((0.85,) if name == "flux1024" and 0.85 not in args.sparsities else ())
            label = name + ("" if args.head_dim == 128 else f"/d{args.head_dim}")
            rows += bench_shape(label, n, h, data=data, d=args.head_dim, sparsities=sps, block=args.block_size,
                                tails=tuple(args.tails), routings=tuple(args.routings), kernels=tuple(args.kernels))
            print(format_table([r for r in rows if r["shape"] == label and r["data"] == data]), flush=True)
    for n in args.extra_n:
        for data in args.data:
            label = f"N{n}" + ("" if args.head_dim == 128 else f"/d{args.head_dim}")
            rows += bench_shape(label, n, 24, data=data, d=args.head_dim, sparsities=(0.75, 0.875), orders=(1,),
                                block=args.block_size, tails=tuple(args.tails), kernels=tuple(args.kernels))
            print(format_table([r for r in rows if r["shape"] == label and r["data"] == data]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown_table(rows, env, " ".join(sys.argv)))
    return 0


def markdown_table(rows: list[dict], env: dict, command: str) -> str:
    """The benchmark as a markdown section: environment, command, one row per measurement."""
    base = {(r["shape"], r["data"]): r["ms"] for r in rows if r["method"] == "dense-cudnn"}
    out = [f"Measured {env['date']} on {env['gpu']}; torch {env['torch']}, Triton {env['triton']}, "
           f"CUDA {env['cuda']}, cuDNN {env['cudnn']}.  Command: `{command}`", "",
           "| shape | data | method | sparsity | ms | vs cuDNN | eff. TFLOP/s | rel. L2 vs dense |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = "-" if (r["sparsity"] == 0.0 or math.isnan(r["sparsity"])) else f"{r['sparsity']:.3f}"
        out.append(f"| {r['shape']} | {r['data']} | {r['method']} | {sp} | {r['ms']:.3f} | "
                   f"{base[(r['shape'], r['data'])] / r['ms']:.2f}x | {r['tflops']:.0f} | {r['err']:.4f} |")
    notes = [r for r in rows if "qkv_mb" in r]
    if notes:
        out += ["", "Pre-scan + routing share and extra GPU memory (order 1, sparsity 0.875):", ""]
        out += [f"- {r['shape']} ({r['data']}) {r['method']}: {_note(r)}" for r in notes]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
