"""Where one PISA call's time goes, kernel by kernel: which launches of the pre-scan, the routing
and the forward pass take the call's milliseconds (issue 16's tail and pre-scan, issue 17's
adaptive routing, whose selection costs more than top-k's and was never split into its parts).

    python -m pisa_lab.breakdown                                   # Wan 720p, the node's call, B = 1
    python -m pisa_lab.breakdown --family hunyuan720 --routing adaptive --json prof.json
    python -m pisa_lab.breakdown --small --device cpu --backend reference   # CPU smoke run

The call is the node's (:func:`pisa_lab.bench_node_calls.node_call`: its token order, sinks, dense
rows and key padding), with the overrides given, run without CUDA graphs so each launch shows, and
profiled over ``--calls`` calls after a warm-up one (:mod:`torch.profiler`).  Each kernel's device
time is summed over the calls and divided by their number; the kernels are grouped into the
library's phases by their names (:data:`PHASES`), PyTorch's own kernels (GEMMs, element-wise ops,
copies) into "torch".  On the CPU the rows are the operators' self CPU times: a smoke run (the
reference backend is an oracle, not a speed path; not under ``TRITON_INTERPRET=1``, where every
interpreted line of a kernel would become a profiler event: tens of GB for the small set).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch

from pisa_kernels.api import pisa_attention

from .bench_node_calls import FAMILIES, node_call, small
from .measure import environment, make_inputs

#: The library's phases, in call order: the name fragments of their Triton kernels (how a kernel
#: without a known caller is placed), and the places that start them (a module of pisa_kernels, or
#: a function of one): a kernel or operator belongs to the outermost such place on its Python stack
#: below the API, i.e. to the step of the call that the API took (the tail bias's GEMM, run by
#: triton_kernels.tail_bias from routing.mass_bias, is the tail bias's).
PHASES = (
    ("token order", (), ("tiling.py",)),
    ("pre-scan", ("_pool_k_kernel", "_pool_q_kernel"), ("triton_kernels.py: pool",)),
    ("routing", ("_top_blocks_kernel", "_adaptive_rank_kernel", "_radix_kernel", "_tie_span_kernel",
                 "_tie_cut_kernel", "_adaptive_pick_kernel"), ("routing.py",)),
    ("tail bias", ("_tail_bias_kernel",), ("triton_kernels.py: tail_bias",)),
    ("forward", ("_pisa_fwd_kernel", "_pisa_fwd_hopper"),
     ("triton_kernels.py: attend", "hopper_kernel.py", "reference.py")),
)
#: The API's own modules: what runs in them directly (copies, the output's scatter) is "api".
API_PLACES = ("api.py", "graphs.py", "backend.py")
#: Kernels and operators launched from outside the library.
OTHER = "torch"


def phase_of(name: str, frames=()) -> str:
    """The phase of a kernel (or, on the CPU, operator) ``name`` launched under the Python frames
    ``frames`` (innermost first, as ``"path/file.py(line): function"``): the outermost frame of
    ``pisa_kernels`` below the API that a phase claims (:data:`PHASES`); else "api" when the API is
    on the stack; else the phase whose Triton kernel the name is; else :data:`OTHER`."""
    in_api = False
    for frame in reversed(frames):
        path, _, func = frame.rpartition(": ")
        if "pisa_kernels" not in path:
            continue
        here = path.rsplit("/", 1)[-1].split("(", 1)[0]
        if here in API_PLACES:
            in_api = True
            continue
        for phase, _, places in PHASES:
            if here in places or f"{here}: {func}" in places:
                return phase
    by_name = next((phase for phase, names, _ in PHASES if any(n in name for n in names)), None)
    return by_name or ("api" if in_api else OTHER)


def library_kernel(name: str) -> bool:
    """Whether ``name`` is one of the library's Triton or Gluon kernels (:data:`PHASES`)."""
    return any(n in name for _, names, _ in PHASES for n in names)


def _frames(evt) -> list[str]:
    """The Python frames above a profiler event, innermost first (``with_stack``)."""
    out, p = [], evt.cpu_parent
    while p is not None:
        out.append(p.name)
        p = p.cpu_parent
    return out


def kernel_rows(prof, calls: int, device: torch.device) -> list[dict]:
    """``{name, phase, launches, ms}`` per (kernel, phase) per call, slowest first: on CUDA the
    device time of every kernel an operator or a launch of the profile started, on the CPU every
    operator's self CPU time."""
    acc: dict[tuple[str, str], list] = {}

    def add(name, frames, us, n=1):
        entry = acc.setdefault((name, phase_of(name, frames)), [0, 0.0])
        entry[0] += n
        entry[1] += us

    unplaced: dict[str, list] = {}  # [launches, us] of every kernel less those placed by their launch
    for evt in prof.events():
        kind = getattr(evt, "device_type", None)
        if kind == torch.autograd.DeviceType.CUDA:
            entry = unplaced.setdefault(evt.name, [0, 0.0])
            entry[0] += 1
            entry[1] += evt.time_range.elapsed_us()
        elif kind != torch.autograd.DeviceType.CPU:
            continue
        elif device.type == "cuda":
            kernels = getattr(evt, "kernels", None) or ()
            if kernels:
                frames = _frames(evt)
                for k in (k for k in kernels if k.name != evt.name):  # (not an op's own legacy entry)
                    add(k.name, frames, float(k.duration))
                    entry = unplaced.setdefault(k.name, [0, 0.0])
                    entry[0] -= 1
                    entry[1] -= float(k.duration)
        elif evt.name.startswith("aten::") and evt.self_cpu_time_total > 0:
            add(evt.name, _frames(evt), float(evt.self_cpu_time_total))
    for name, (n, us) in unplaced.items():  # kernels no launch was linked to: placed by their names
        if n > 0:
            add(name, (), us, n)
    rows = [dict(name=name, phase=phase, launches=n / calls, ms=us / 1000.0 / calls)
            for (name, phase), (n, us) in acc.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def phase_totals(rows: list[dict]) -> dict[str, float]:
    """ms per call of each phase (every phase of :data:`PHASES`, "api" and :data:`OTHER`, in call order)."""
    totals = {phase: 0.0 for phase, _, _ in PHASES} | {"api": 0.0, OTHER: 0.0}
    for r in rows:
        totals[r["phase"]] += r["ms"]
    return totals


def profile_call(fn, calls: int, device: torch.device) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()  # compiles and plans outside the profile
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=True) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return kernel_rows(prof, calls, device)


def report(rows: list[dict], title: str, top: int = 25) -> str:
    totals = phase_totals(rows)
    total = sum(totals.values()) or 1.0
    lines = [title, "", "| phase | ms per call | share |", "|---|---|---|"]
    lines += [f"| {p} | {ms:.3f} | {100 * ms / total:.1f}% |" for p, ms in totals.items()]
    lines += [f"| total | {total:.3f} | |", "", "| kernel | phase | launches per call | ms per call |",
              "|---|---|---|---|"]
    lines += [f"| `{r['name'][:90]}` | {r['phase']} | {r['launches']:g} | {r['ms']:.3f} |" for r in rows[:top]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="wan720", choices=sorted(FAMILIES))
    ap.add_argument("--batch", type=int, default=1, help="default 1 (the node's Wan call has 2: CFG)")
    ap.add_argument("--small", action="store_true", help="the family at a size the reference handles")
    ap.add_argument("--data", default="random", choices=["random", "dit"])
    ap.add_argument("--sparsity", type=float, default=0.875)
    ap.add_argument("--routing", default=None, help="override the node's (topk, cov, adaptive)")
    ap.add_argument("--order", default=None, help="override the node's order (1, 0, drop)")
    ap.add_argument("--tail", default=None, help="override the node's tail (plain, lognormal)")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "gluon", "reference"])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fam = replace(FAMILIES[args.family], batch=args.batch)
    fam = small(fam) if args.small else fam
    call = node_call(fam, *make_inputs(args.data, fam.batch, fam.heads, fam.tokens, fam.head_dim, 0, device),
                     backend=args.backend, sparsity=args.sparsity)
    order = {"drop": "drop"}.get(args.order, None if args.order is None else int(args.order))
    overrides = dict(routing=args.routing, order=order, tail=args.tail, block_size=args.block_size)
    kw = dict(call.kwargs, **{k: v for k, v in overrides.items() if v is not None})
    if device.type == "cuda":
        kw["cuda_graph"] = False  # (a replayed graph would show as one launch)
    rows = profile_call(lambda: pisa_attention(call.q, call.k, call.v, **kw), args.calls, device)
    shown = {k: v for k, v in kw.items() if k in ("sparsity", "order", "tail", "routing", "block_size", "backend")}
    title = (f"{args.family}{' (small)' if args.small else ''}, B = {fam.batch}, {fam.tokens} tokens x {fam.heads} "
             f"heads, d = {fam.head_dim}, {args.data} inputs, {shown}, on {device}")
    print(report(rows, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=environment(device), title=title, kwargs={k: str(v) for k, v in shown.items()},
                           phases=phase_totals(rows), kernels=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
