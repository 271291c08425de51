"""The main job on a built-in default: PISA against dense attention on a DiT-like workload.

    python -m pisa_lab.demo [--out out] [--set wan-video] [--size small|full]

One Wan-like video attention call (RoPE, smooth content, a mix of local / spatial / temporal /
global heads, from :mod:`pisa_lab.workloads`; no download), in the node's tiled token order.
For PISA orders 1 / 0 / drop at several sparsities it reports the relative L2 error and cosine
similarity against dense attention and, on a CUDA GPU, the speed-up over cuDNN.  Writes
``demo.json`` and ``demo.png`` (error vs sparsity; speed-up vs sparsity on the GPU) to ``--out``.

On a machine without a CUDA GPU it runs the PyTorch reference on a small set: the errors are the
same method's, but the times are not speed numbers (the reference is a correctness oracle).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from . import eval as pisa_eval
from pisa_kernels.backend import describe

SPARSITIES = (0.75, 0.875, 0.9, 0.95)
ORDERS = (1, 0, "drop")


def _timer(device: torch.device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def once(fn):
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)

    return once


def run(set_name: str, size: str, device: torch.device, sparsities=SPARSITIES) -> dict:
    case = pisa_eval.cases_from_sets([f"{set_name}:{size}"], seed=0, device=device)[0]
    ref = pisa_eval.dense_reference(case)
    timer = _timer(device)
    qh, kh, vh = (t.transpose(1, 2) for t in (case.q, case.k, case.v))
    dense_ms = timer(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh))
    backend = "triton" if device.type == "cuda" else "reference"
    rows = []
    for order in ORDERS:
        for sp in sparsities:
            def call():
                return pisa_eval.run_pisa(case, order=order, sparsity=sp, token_order="tiled",
                                          routing=pisa_eval.resolve_routing("auto", case),
                                          backend=backend)

            err, cos = pisa_eval.metrics(call(), ref)
            ms = timer(call)
            rows.append(dict(order=str(order), sparsity=sp, rel_l2=err, cosine=cos, ms=ms,
                             speedup=dense_ms / ms))
    return dict(case=case.describe, device=str(device), backend=backend, note=describe(device),
                dense_ms=dense_ms, rows=rows, timed=device.type == "cuda")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if result["timed"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    labels = {"1": "PISA (order 1)", "0": "zeroth order", "drop": "keep-or-drop"}
    for order in ("1", "0", "drop"):
        rows = [r for r in result["rows"] if r["order"] == order]
        xs = [r["sparsity"] for r in rows]
        axes[0][0].plot(xs, [r["rel_l2"] for r in rows], marker="o", label=labels[order])
        if result["timed"]:
            axes[0][1].plot(xs, [r["speedup"] for r in rows], marker="o", label=labels[order])
    axes[0][0].set(xlabel="sparsity", ylabel="relative L2 error vs dense", yscale="log",
                   title="fidelity (" + result["case"].split(",")[0] + ")")
    axes[0][0].legend()
    if result["timed"]:
        axes[0][1].set(xlabel="sparsity", ylabel="speed-up vs cuDNN", title="speed")
        axes[0][1].axhline(1.0, color="grey", lw=0.8)
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
    print(f"{'method':<10} {'sparsity':>8} {'rel L2':>8} {'cosine':>8} {'ms':>9} {'speed-up':>8}")
    for r in result["rows"]:
        speed = f"{r['speedup']:.2f}x" if result["timed"] else "-"
        print(f"{r['order']:<10} {r['sparsity']:>8.3f} {r['rel_l2']:>8.4f} {r['cosine']:>8.4f} {r['ms']:>9.2f} "
              f"{speed:>8}")
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
