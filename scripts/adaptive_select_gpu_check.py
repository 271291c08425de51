"""GPU check of adaptive routing's Triton selection (triton_kernels.AdaptiveBlocks) against the sorted
oracle (routing.SortedAdaptive), stage by stage, plus its time and memory at 720p.

    python scripts/adaptive_select_gpu_check.py            # about a minute on an H200
    python scripts/adaptive_select_gpu_check.py --no-perf  # the comparisons only

For the three cases of tests/kernels/test_gpu.py::test_adaptive_triton_selection_is_the_sorted_one
(the same inputs: tests/kernels/pisa_test_utils.adaptive_selection_case) both selectors see the
same score chunks; after the rank phase this compares each tile's candidate bitmap and keys, then
the threshold (from the radix histograms), each tile's candidates above / at it, and finally
tile_count, counts, mask and idx, printing the first difference (the test compares only the
final selection).  Then it times pre-scan + routing (bench.prescan_routing_ms) and measures the extra
memory of the whole call (adaptive routing, both tails) at Wan 720p and HunyuanVideo 720p.

Exit status: 0 all equal and memory within 10 % of q+k+v; 1 a selection differs; 2 memory over the bar.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "kernels")]

from pisa_kernels import routing as R  # noqa: E402
from pisa_kernels import triton_kernels as tk  # noqa: E402
from pisa_test_utils import adaptive_selection_case  # noqa: E402  (the GPU test's inputs)

#: PISA_CHECK_DEVICE=cpu with TRITON_INTERPRET=1 and --cases small: a self-test of this script
DEV = torch.device(os.environ.get("PISA_CHECK_DEVICE", "cuda"))
MARK = 0x7FFFFFFF
failures: list[str] = []


def first_diff(name: str, want: torch.Tensor, got: torch.Tensor, case: str) -> bool:
    """True where equal; else records and prints the first differing index and a few values."""
    if want.shape == got.shape and torch.equal(want, got):
        print(f"  {name}: equal")
        return True
    if want.shape != got.shape:
        msg = f"{case}: {name} shapes differ: {tuple(want.shape)} vs {tuple(got.shape)}"
    else:
        bad = (want != got).nonzero()
        i = tuple(bad[0].tolist())
        row = i[:-1] if want.dim() > 1 else ()
        msg = (f"{case}: {name} differs at {len(bad)} entries, first {i}: oracle {want[i].item()} vs triton "
               f"{got[i].item()}")
        if row:
            msg += f"\n    oracle row {want[row][:24].tolist()}\n    triton row {got[row][:24].tolist()}"
    print("  MISMATCH " + msg)
    failures.append(msg)
    return False


def radix_threshold(hist: torch.Tensor, take: int) -> int:
    """routing threshold the Triton kernels derive from their level histograms (``_radix_prefix``)."""
    h = hist[0].long().cpu()
    prefix, above = 0, 0
    for level in range(h.shape[0]):
        rev = torch.flip(torch.cumsum(torch.flip(h[level], [0]), 0), [0])
        d = int((above + rev >= take).sum()) - 1
        above += int(h[level][d + 1:].sum())
        prefix += d << (32 - 8 * (level + 1))
    return prefix - 2 ** 31


class Both:
    """A selector that feeds every chunk to the oracle and to the Triton selection and compares."""

    def __init__(self, case, bh, nq, nb, floor, n_forced, width, device):
        self.case, self.floor, self.lo, self.width, self.nb = case, floor, n_forced + floor, width, nb
        self.s = R.SortedAdaptive(bh, nq, nb, floor, n_forced, width, device)
        self.t = tk.adaptive_blocks(bh, nq, nb, floor, n_forced, width, device)
        assert isinstance(self.t, tk.AdaptiveBlocks), "the Triton selection fell back to the sort"
        self.t.trace = {}

    def rank(self, score, s, kinds_rows):
        self.t.rank(score, s, kinds_rows)  # (reads the scores; the oracle's rank then writes the kinds in)
        self.s.rank(score, s, kinds_rows)

    def finish(self, budget, scope, kinds_rows, rows):
        case, s, t = self.case, self.s, self.t
        bh, nq, width = s.order.shape
        tiles = bh * nq
        # the oracle's rank-phase state in the Triton layout: the first `width` ranks in block order
        okeys = R._order_keys_(s.share.clone())  # [BH, NQ, width - lo] candidate keys, by rank
        by_rank = torch.cat((torch.full((bh, nq, self.lo), MARK, dtype=torch.int32, device=DEV), okeys), -1)
        blocks, perm = torch.sort(s.order.long(), dim=-1)
        want_ckey = by_rank.gather(-1, perm)
        member = torch.zeros(bh, nq, t.nw * 32, dtype=torch.int64, device=DEV)
        member.scatter_(-1, blocks, 1)
        want_bits = (member.view(bh, nq, t.nw, 32) << torch.arange(32, device=DEV)).sum(-1)
        want_bits = torch.where(want_bits >= 2 ** 31, want_bits - 2 ** 32, want_bits).to(torch.int32)
        b, _, _, _ = t.finish(budget, scope, kinds_rows, rows)  # (scope "call": one group)
        del b
        tr = t.trace
        print(f"[{case}] BH={bh} NQ={nq} NB={self.nb} width={width} lo={self.lo} budget={budget}")
        ok = first_diff("rank: candidate bitmap", want_bits, tr["bits"], case)
        ok = first_diff("rank: candidate keys (block order, marks)", want_ckey, tr["ckey"], case) and ok
        take = budget - self.floor * tiles
        flat = okeys.flatten()
        want_t = int(torch.kthvalue(flat.cpu(), flat.numel() - take + 1).values)
        got_t = radix_threshold(tr["hist"], tr["take_marked"])
        if want_t != got_t:
            msg = f"{case}: threshold key differs: oracle {want_t} vs radix {got_t} (take {take})"
            print("  MISMATCH " + msg)
            failures.append(msg)
            ok = False
        else:
            print(f"  threshold: equal ({want_t})")
        above = (okeys > want_t).sum(-1, dtype=torch.int32)
        equal = (okeys == want_t).sum(-1, dtype=torch.int32)
        ok = first_diff("tie span: above | equal << 16", above | (equal << 16), tr["ae"], case) and ok
        print(f"  cut (rank, tiles): {tr['cut'][0].tolist()}  ties at t: {int(equal.sum())}, "
              f"need {take - int(above.sum())}")
        # the final tensors: compared in check_case, over two plain calls
        return s.finish(budget, scope, kinds_rows, rows)


def check_case(case: str) -> None:
    st, kw = adaptive_selection_case(case, DEV)
    t0 = time.perf_counter()
    R.adaptive_route(st, select=lambda *a: Both(case, *a), **kw)  # stage by stage
    a = R.adaptive_route(st, **kw)
    b = R.adaptive_route(st, select=tk.adaptive_blocks, **kw)
    for name in ("tile_count", "counts", "mask", "idx"):
        first_diff(f"final {name}", getattr(a, name), getattr(b, name), case)
    want = round(0.125 * st.kbar.shape[1] * a.tile_count.numel()) + kw["n_forced"] * a.tile_count.numel()
    if int(a.tile_count.sum()) != want:
        failures.append(f"{case}: oracle spent {int(a.tile_count.sum())} blocks, not {want}")
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    print(f"  ({time.perf_counter() - t0:.1f} s)")


def perf() -> bool:
    from pisa_kernels import pisa_attention
    from pisa_lab.bench import prescan_routing_ms
    from pisa_lab.measure import peak_extra_mb

    ok = True
    for name, n, h in (("wan720", 75600, 40), ("hunyuan720", 119056, 24)):
        q, k, v = (torch.randn(1, n, h, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        qkv_mb = 3 * q.numel() * q.element_size() / 2 ** 20
        for tail in ("plain", "lognormal"):
            ln = tail == "lognormal"
            top = prescan_routing_ms(q, k, v, 0.875, 64, ln, "topk")
            ada = prescan_routing_ms(q, k, v, 0.875, 64, ln, "adaptive")
            fn = lambda q=q, k=k, v=v, tail=tail: pisa_attention(q, k, v, sparsity=0.875, order=1, layout="BNHD",
                                                                 block_size=64, tail=tail, routing="adaptive",
                                                                 backend="triton")
            fn()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            extra = peak_extra_mb(fn)
            share = extra / qkv_mb
            flag = "" if share <= 0.10 else "   OVER THE 10 % BAR"
            ok &= share <= 0.10
            print(f"{name} {tail:9s}: pre-scan + routing {ada:.2f} ms adaptive ({top:.2f} ms top-k); "
                  f"call's extra memory {extra:.1f} MiB = {share:.2%} of q+k+v ({qkv_mb:.0f} MiB){flag}")
        del q, k, v, fn  # (fn holds them too)
        torch.cuda.empty_cache()
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-perf", action="store_true", help="only the comparisons")
    p.add_argument("--cases", nargs="*", default=["wan720", "wan720_kinds_lognormal", "flux_joint"])
    args = p.parse_args()
    import triton

    print(f"{torch.cuda.get_device_name(0) if DEV.type == 'cuda' else DEV}; torch {torch.__version__}, Triton {triton.__version__}")
    for case in args.cases:
        check_case(case)
    mem_ok = True if args.no_perf or DEV.type != "cuda" else perf()
    if failures:
        print(f"\nFAILED: {len(failures)} difference(s); the first:\n  {failures[0]}")
        return 1
    if not mem_ok:
        print("\nFAILED: extra memory over 10 % of q+k+v")
        return 2
    print("\nOK: the Triton selection is the sorted one at every stage" + ("" if args.no_perf else "; memory within 10 %"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
