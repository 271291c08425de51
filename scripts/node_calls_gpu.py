"""One device call for issue 13: the node's real calls checked against the reference and timed.

    python scripts/node_calls_gpu.py [--skip-check] [--families wan720 hunyuan720] [--json out.json]

1. Fidelity: the node's calls for Wan and HunyuanVideo (pisa_lab.bench_node_calls: ComfyUI's
   q/k/v views and mask, the node's own keyword arguments) at a moderate size (4 heads, grid
   5 x 16 x 40, HunyuanVideo's full 256 text tokens of which 128 padded, D = 128), bf16 and fp16:
   Triton vs the reference (own routing and, where routing broke a near-tie differently, on the
   reference's replayed selection), and padded keys set to NaN without influence.
2. Timing (do_bench medians) at Wan 720p (B = 2) and HunyuanVideo 720p (B = 1): dense SDPA, the
   bare call, each extra the node adds alone, the node's configuration, peak extra memory.
3. The token order's parts: the previous implementation's gathers / scatter against the bytes
   they move, the pre-scan without and with the order; the node's call in 1 vs 4 head groups.

Every case catches and prints its own exception; the script prints its progress and finishes in
well under five minutes on an H200 (most of it Triton compiling the kernels' variants).
"""

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import replace

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))  # pisa_test_utils: routing capture / replay
from pisa_kernels import pisa_attention  # noqa: E402
from pisa_lab import bench_node_calls as nc  # noqa: E402
from pisa_lab.measure import environment, make_inputs, rel_l2  # noqa: E402

T0 = time.time()
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}  # as tests/kernels/test_gpu.py


def say(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def guarded(what, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - report and go on with the next case
        say(f"FAILED {what}:\n{traceback.format_exc()}")
        return None


def check(name, dtype):
    from pisa_test_utils import capture_routing, max_err, selection_of

    fam = replace(nc.FAMILIES[name], heads=4, grid=(5, 16, 40))
    q, k, v = make_inputs("random", fam.batch, fam.heads, fam.tokens, fam.head_dim, 7, "cuda")
    call = nc.node_call(fam, *(t.to(dtype) for t in (q, k, v)))
    kw = dict(call.kwargs, cuda_graph=False)
    with capture_routing() as log_r:
        ref = pisa_attention(call.q, call.k, call.v, **dict(kw, backend="reference"))
    with capture_routing() as log_t:
        tri = pisa_attention(call.q, call.k, call.v, **kw)
    sel_r, sel_t = selection_of(log_r), selection_of(log_t)
    differs = float((sel_r.mask != sel_t.mask).any(-1).float().mean())
    err_own = max_err(tri, ref)
    with capture_routing(replay=sel_r):
        replayed = pisa_attention(call.q, call.k, call.v, **kw)
    err = max_err(replayed, ref)
    line = (f"check {name} {str(dtype)[6:]} N={fam.tokens} extras={[e for e in nc.EXTRAS if kw.get(e) is not None]}: "
            f"max err {err:.2e} on the reference's selection (own routing {err_own:.2e}, rel L2 "
            f"{rel_l2(tri, ref):.2e}; tiles routed differently {differs:.2%})")
    ok = err <= TOL[dtype] and differs <= 0.01
    if kw.get("kv_valid") is not None:
        pad = ~kw["kv_valid"]
        k2, v2 = call.k.clone(), call.v.clone()
        (k2 if kw["layout"] == "BNHD" else k2.transpose(1, 2))[pad] = float("nan")
        (v2 if kw["layout"] == "BNHD" else v2.transpose(1, 2))[pad] = float("nan")
        garbage = pisa_attention(call.q, k2, v2, **kw)
        # A NaN that reached any product would make its rows NaN, so finiteness is the test; the
        # output itself may differ from ``tri`` by a rounding (the pre-scan's fp32 atomics add in
        # any order on a GPU), so it is held to the reference's tolerance.
        g_err = max_err(garbage, ref)
        line += f"; NaN in padded keys: finite={bool(torch.isfinite(garbage).all())}, err {g_err:.1e}"
        ok = ok and bool(torch.isfinite(garbage).all()) and g_err <= TOL[dtype]
    say(("OK   " if ok else "FAIL ") + line)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--families", nargs="*", default=list(nc.FAMILIES), choices=list(nc.FAMILIES))
    ap.add_argument("--json", help="write the timing rows and part costs here")
    args = ap.parse_args()
    say(json.dumps(environment()))
    if not args.skip_check:
        results = [guarded(f"check {name} {dt}", check, name, dt)
                   for name in args.families for dt in (torch.bfloat16, torch.float16)]
        say(f"fidelity: {sum(r is True for r in results)} of {len(results)} checks passed")
    rows, parts = [], {}
    for name in args.families:
        say(f"timing {name} (each case compiles its kernel variants first)")
        rows += guarded(f"timing {name}", nc.bench_family, name, log=say) or []
        fam = nc.FAMILIES[name]
        call = guarded(f"inputs {name}", lambda: nc.node_call(
            fam, *make_inputs("random", fam.batch, fam.heads, fam.tokens, fam.head_dim, 0, "cuda")))
        if call is None:
            continue
        cost = guarded(f"order parts {name}", nc.order_copy_costs, call)
        if cost is not None:
            parts[name] = cost
            say(f"{name} token order: previous copies {cost['old_copies']:.2f} ms for "
                f"{cost['old_copies_bytes'] / 1e9:.2f} GB ({cost['old_copies_gbs']:.0f} GB/s); pre-scan "
                f"{cost['prescan']:.2f} ms, with the order and the k/v copies {cost['prescan_ordered']:.2f} ms "
                f"(+{cost['prescan_copy_bytes'] / 1e9:.2f} GB written)")
        del call
        torch.cuda.empty_cache()
    print(nc.format_table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=environment(), rows=rows, parts=parts), f, indent=1)
    say("done")


if __name__ == "__main__":
    main()
