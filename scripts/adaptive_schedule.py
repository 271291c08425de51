"""Adaptive routing at real sizes on the CPU: the per-tile exact counts it gives the DiT-like sets,
and what they would cost the forward launch under a list schedule (issue 17's load balance).

    python scripts/adaptive_schedule.py                       # wan-video and flux-image at full size
    python scripts/adaptive_schedule.py --sets hunyuan-joint:full --slots 132

Only the pre-scan and the routing run (the reference's, in PyTorch): no attention, so real sizes
take seconds.  A tile's cost, in units of one exact 64-key block, is its exact count plus the tail
scan (``NB / 64`` groups of 64 centroids, about one exact block's work each); programs start in
launch order on ``--slots`` free slots (SMs x resident programs) as they free up.  Printed: the
spread of the counts, and the makespan of the launch in tile order and heaviest first, both against
the top-k routing's (every tile the same count; at most one wave of imbalance) and the ideal
``total / slots``.  A model of the schedule, not a GPU measurement: ``pisa_lab.bench --routings
adaptive`` times it.
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pisa_kernels import reference, routing  # noqa: E402
from pisa_kernels.routing import QUERY_TILE, num_blocks, topk_count  # noqa: E402
from pisa_lab import workloads  # noqa: E402


def makespan(costs: list[float], slots: int) -> float:
    """Greedy list schedule in the given order on ``slots`` identical slots."""
    free = [0.0] * slots
    heapq.heapify(free)
    end = 0.0
    for c in costs:
        t = heapq.heappop(free) + c
        end = max(end, t)
        heapq.heappush(free, t)
    return end


def counts_of(name: str, size: str, sparsity: float, tail: str, block: int = 64) -> tuple[torch.Tensor, int, int]:
    spec = workloads.get_set(name, size)
    w = workloads.generate(spec, seed=0)
    perm = w.token_perm()
    q, k, v = (t.index_select(1, perm).transpose(1, 2) for t in (w.q, w.k, w.v))  # [B, H, N, D], processing order
    n, d = q.shape[2], q.shape[3]
    lognormal = tail == "lognormal"
    stats = reference.pool(q, k, v, None, block, first_order=False, cov=False, lognormal=lognormal)
    nb = num_blocks(n, block)
    forced = None
    n_forced = 0
    if spec.text:
        mask = torch.zeros(n, dtype=torch.bool)
        s, e = spec.text_range
        mask[s:e] = True
        forced = routing.forced_blocks_from_tokens(mask[perm], block)
        n_forced = int(forced.sum())
    kinds = routing.block_kinds(stats.blen, n, block, forced) if forced is not None else None
    kt = topk_count(sparsity, nb)
    sel = routing.route(stats, scale=d ** -0.5, k=kt, heads=spec.heads, kinds=kinds, n_forced=n_forced,
                        adaptive=True, k_mean=(1 - sparsity) * nb)
    return sel.tile_count, kt + n_forced, nb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="*", default=["wan-video:full", "flux-image:full"])
    ap.add_argument("--sparsity", type=float, default=0.875)
    ap.add_argument("--tail", default="lognormal", choices=["plain", "lognormal"])
    ap.add_argument("--slots", type=int, default=132, help="SMs x resident forward programs (H100 / H200: 132 x 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    print("| set | tiles | NB | top-k count | adaptive mean / std / min / max | makespan top-k | adaptive, "
          "tile order | adaptive, heaviest first | ideal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for token in args.sets:
        name, _, size = token.partition(":")
        counts, k_exact, nb = counts_of(name, size or "full", args.sparsity, args.tail)
        tail = nb / 64
        c = counts.double()
        adaptive = (c + tail).flatten().tolist()  # launch order: tile fastest, then (batch x head)
        topk = [k_exact + tail] * len(adaptive)
        ideal = sum(adaptive) / args.slots
        heavy = sorted(adaptive, reverse=True)
        print(f"| {token} | {counts.numel()} | {nb} | {k_exact} | {c.mean():.2f} / {c.std():.2f} / {int(c.min())} / "
              f"{int(c.max())} | {makespan(topk, args.slots):.0f} | {makespan(adaptive, args.slots):.0f} | "
              f"{makespan(heavy, args.slots):.0f} | {ideal:.0f} |")
    print(f"(sparsity {args.sparsity}, tail {args.tail}, {args.slots} slots; query tiles of {QUERY_TILE}; "
          "costs in exact-block units)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
