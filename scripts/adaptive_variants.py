"""Adaptive routing's design choices on the CPU small sets (docs/fidelity.md, "Adaptive exact-block
budget"): scope, mass estimate, floor and cap, at the top-k routing's number of exact blocks.

    OMP_NUM_THREADS=1 python scripts/adaptive_variants.py                      # all sets, all variants
    OMP_NUM_THREADS=1 python scripts/adaptive_variants.py --sets wan-video:small --variants topk call

Prints one JSON line per (set, variant, order): relative L2 error vs dense (tiled order, the
log-normal tail, the reference backend) and the spread of the per-tile density.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pisa_kernels import routing as R  # noqa: E402
from pisa_lab import eval as E  # noqa: E402

_BLOCK_LOG_MASS = R.block_log_mass


def _without_lognormal(score, blen_rows, stats=None, scale=1.0, rows=None):
    return _BLOCK_LOG_MASS(score, blen_rows, None, scale, rows)


#: name -> (routing, floor divisor, cap multiple, log-normal mass estimate)
VARIANTS = {
    "topk": ("topk", 4, 4, True),
    "cov": ("cov", 4, 4, True),
    "call": ("adaptive:matched", 4, 4, True),  # the shipped rule
    "head": ("adaptive:head,matched", 4, 4, True),
    "call-no-ln-mass": ("adaptive:matched", 4, 4, False),
    "call-floor-k/2-cap-2k": ("adaptive:matched", 2, 2, True),
    "call-floor-1-cap-NB": ("adaptive:matched", 10 ** 6, 10 ** 6, True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="*", default=["wan-video:small", "hunyuan-joint:small", "flux-image:small"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--sparsity", type=float, default=0.875)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for token in args.sets:
        case = E.cases_from_sets([token], 0, torch.device("cpu"))[0]
        ref = E.dense_reference(case)
        for name in args.variants:
            routing, floor_div, cap_mul, ln_mass = VARIANTS[name]
            saved = R.ADAPTIVE_FLOOR_DIV, R.ADAPTIVE_CAP_MUL, R.block_log_mass
            R.ADAPTIVE_FLOOR_DIV, R.ADAPTIVE_CAP_MUL = floor_div, cap_mul
            R.block_log_mass = _BLOCK_LOG_MASS if ln_mass else _without_lognormal
            try:
                for order in (1, 0, "drop"):
                    out, st = E.run_pisa(case, order=order, sparsity=args.sparsity, token_order="tiled",
                                         routing=routing, backend="reference", tail="lognormal", with_stats=True)
                    spread = st.density_spread()
                    print(json.dumps({"set": token, "variant": name, "order": str(order),
                                      "rel_l2": round(E.metrics(out, ref)[0], 5), "density": round(st.density, 4),
                                      "density_std": None if spread is None else round(spread[1], 4)}), flush=True)
            finally:
                R.ADAPTIVE_FLOOR_DIV, R.ADAPTIVE_CAP_MUL, R.block_log_mass = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
