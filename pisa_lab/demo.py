"""The main job on a built-in default: PISA against dense attention on a DiT-like workload.

    python -m pisa_lab.demo [--out out] [--set wan-video] [--size small|full]

One Wan-like video attention call (RoPE, smooth content, a mix of local / spatial / temporal /
global heads, from :mod:`pisa_lab.workloads`; no download), in the node's tiled token order.
The node's configuration (order 1, log-normal tail, tiled order) comes first, then the paper's
tail, zeroth order, keep-or-drop with the same blocks, the node in raster order and, on a CUDA GPU
where comfy_kitchen is importable, ComfyUI's Sol-Attn at the same density.  At several sparsities
it reports the relative L2 error and cosine similarity against dense attention and, on a CUDA GPU,
the speed-up over cuDNN.  Writes
``demo.json`` and ``demo.png`` (error vs sparsity; speed-up vs sparsity on the GPU) to ``--out``.

On a machine without a CUDA GPU it runs the PyTorch reference on a small set: the errors are the
same method's, but the times are not speed numbers (the reference is a correctness oracle).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch

from . import eval as pisa_eval
from pisa_kernels.backend import describe

SPARSITIES = (0.75, 0.875, 0.9, 0.95)


@dataclass(frozen=True)
class Method:
    """One line of the table and the plot: what it is, in words, and how it is called."""

    label: str
    order: object = 1  # 1, 0 or "drop"; None: Sol-Attn
    tail: str = "lognormal"
    token_order: str = "tiled"


#: The node's configuration first, then what it is compared with (same exact blocks per tile for
#: every PISA line; Sol-Attn at the same density).
METHODS = (
    Method("PISA, the node (order 1, log-normal tail, tiled order)"),
    Method("PISA, paper's tail (order 1, plain tail, tiled)", tail="plain"),
    Method("zeroth order only (log-normal tail, tiled)", order=0),
    Method("keep-or-drop block-sparse (same blocks, tiled)", order="drop", tail="plain"),
    Method("PISA, the node in raster order (no tiling)", token_order="raster"),
)
SOL = Method("Sol-Attn (ComfyUI core, INT8 top-k), same density", order=None, tail="-")


def _timer(device: torch.device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def once(fn):
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)

    return once


def run(set_name: str, size: str, device: torch.device, sparsities=SPARSITIES, sol=None) -> dict:
    """The table's rows on one workload.  ``sol``: ``(fn, description)`` of the Sol-Attn peer; by
    default the compiled kernel where comfy_kitchen has one for this GPU, none on the CPU."""
    case = pisa_eval.cases_from_sets([f"{set_name}:{size}"], seed=0, device=device)[0]
    ref = pisa_eval.dense_reference(case)
    timer = _timer(device)
    qh, kh, vh = (t.transpose(1, 2) for t in (case.q, case.k, case.v))
    dense_ms = timer(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh))
    backend = "triton" if device.type == "cuda" else "reference"
    # Sol-Attn only where its compiled kernel runs (its CPU fallback is another method: eager, fp32)
    if sol is None:
        sol = pisa_eval.sol_peer(device) if device.type == "cuda" else (None, "GPU only")
    sol, sol_note = sol
    methods = [m for m in METHODS if case.has_order(m.token_order)] + ([SOL] if sol is not None else [])
    rows = []
    for m in methods:
        for sp in sparsities:
            if m.order is None:
                def call(sp=sp):
                    return pisa_eval.run_sol(sol, case, token_order="tiled", sparsity=sp)
            else:
                def call(m=m, sp=sp):
                    return pisa_eval.run_pisa(case, order=m.order, sparsity=sp, token_order=m.token_order,
                                              routing=pisa_eval.resolve_routing("auto", case), backend=backend,
                                              tail=m.tail)

            err, cos = pisa_eval.metrics(call(), ref)
            ms = timer(call)
            rows.append({"method": m.label, "order": str(m.order), "tail": m.tail, "token_order": m.token_order,
                         "sparsity": sp, "rel_l2": err, "cosine": cos, "ms": ms, "speedup": dense_ms / ms})
    return {"case": case.describe, "device": str(device), "backend": backend, "note": describe(device),
            "sol": sol_note, "dense_ms": dense_ms, "rows": rows, "timed": device.type == "cuda"}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if result["timed"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.6), squeeze=False)
    for i, label in enumerate(dict.fromkeys(r["method"] for r in result["rows"])):
        rows = [r for r in result["rows"] if r["method"] == label]
        xs = [r["sparsity"] for r in rows]
        style = {"marker": "o", "lw": 2.6 if i == 0 else 1.3, "zorder": 3 if i == 0 else 2}
        axes[0][0].plot(xs, [r["rel_l2"] for r in rows], label=label, **style)
        if result["timed"]:
            axes[0][1].plot(xs, [r["speedup"] for r in rows], label=label, **style)
    device = "GPU, Triton kernels" if result["timed"] else "CPU, PyTorch reference"
    axes[0][0].set(xlabel="sparsity (share of key blocks not computed exactly)",
                   ylabel="relative L2 error vs dense attention", yscale="log", title="error (lower is better)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    if result["timed"]:
        axes[0][1].set(xlabel="sparsity", ylabel=f"speed-up vs cuDNN ({result['dense_ms']:.1f} ms)",
                       title="speed (higher is better)")
        axes[0][1].axhline(1.0, color="grey", lw=0.8)
    fig.suptitle(f"PISA vs dense attention: {result['case']} ({device})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    ap.add_argument("--set", default="wan-video", dest="set_name")
    ap.add_argument("--size", choices=["tiny", "small", "full"], default=None,
                    help="default: full on a CUDA GPU, small on the CPU")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("full" if device.type == "cuda" else "small")
    print(describe(device))
    result = run(args.set_name, size, device)
    print(f"{result['case']}; dense {'cuDNN/SDPA' if result['timed'] else 'SDPA (CPU)'} "
          f"{result['dense_ms']:.2f} ms")
    width = max(len(r["method"]) for r in result["rows"])
    print(f"{'method':<{width}} {'sparsity':>8} {'rel L2':>8} {'cosine':>8} {'ms':>9} {'speed-up':>8}")
    for r in result["rows"]:
        speed = f"{r['speedup']:.2f}x" if result["timed"] else "-"
        print(f"{r['method']:<{width}} {r['sparsity']:>8.3f} {r['rel_l2']:>8.4f} {r['cosine']:>8.4f} "
              f"{r['ms']:>9.2f} {speed:>8}")
    if result["timed"]:
        print(f"Sol-Attn: {result['sol']}")
    if not result["timed"]:
        print("(CPU: the PyTorch reference ran; its times are not speed numbers.)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "demo.png"))
    print(f"wrote {os.path.join(args.out, 'demo.json')} and {os.path.join(args.out, 'demo.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
