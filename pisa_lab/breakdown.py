"""Where one PISA call's time goes, kernel by kernel: which launches of the pre-scan, the routing
and the forward pass take the call's milliseconds (issue 16's tail and pre-scan, issue 17's
adaptive routing, whose selection costs more than top-k's and was never split into its parts).

    python -m pisa_lab.breakdown                                   # Wan 720p, the node's call, B = 1
    python -m pisa_lab.breakdown --family hunyuan720 --routing adaptive --json prof.json
    python -m pisa_lab.breakdown --small --device cpu --backend reference   # CPU smoke run

The call is the node's (:func:`pisa_lab.bench_node_calls.node_call`: its token order, sinks, dense
rows and key padding), with the overrides given, run without CUDA graphs so each launch shows, and
profiled over ``--calls`` calls after a warm-up one (:mod:`torch.profiler`).  Each kernel's device
time is summed over the calls and divided by their number, and the kernel is placed in the phase
of the call that launched it (:data:`PHASES`): by the Python frames above its launch, so that
PyTorch's own kernels in the routing (its GEMMs, the normalisation's reductions) count as routing;
without frames by its name (the library's kernels; PyTorch's then count as "torch").  The frames
come from ``with_stack``: torch 2.14 records them as events; a review on the H200's torch 2.11
found none, so there only the names place kernels (the table says so).  On the CPU the rows are the
operators' self CPU times: a smoke run (the reference backend is an oracle, not a speed path; not
under ``TRITON_INTERPRET=1``, where every interpreted line of a kernel would become a profiler
event: tens of GB for the small set).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace

import torch

from pisa_kernels.api import pisa_attention

from .bench_node_calls import FAMILIES, node_call, small
from .measure import environment, make_inputs

#: The library's phases, in call order: the name fragments of their Triton kernels (how a kernel
#: without a known caller is placed), and the places that start them, functions of pisa_kernels'
#: modules (``"file.py: function"``) or whole modules (``"file.py"``).  A kernel or operator belongs
#: to the innermost function on its Python stack that a phase names (the tail bias's GEMM runs in
#: routing.mass_bias, called by triton_kernels.tail_bias, called by hopper_kernel.attend: it is
#: the tail bias's), else to the outermost module below the API that a phase names.
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


def _place(frame: str) -> tuple[str, str] | None:
    """``(file, function)`` of a frame of pisa_kernels (``"…/pisa_kernels/routing.py(412): route"``,
    either path separator), else None."""
    path, _, func = frame.rpartition(": ")
    parts = re.split(r"[\\/]", path)
    if len(parts) < 2 or parts[-2] != "pisa_kernels":
        return None
    return parts[-1].split("(", 1)[0], func


def phase_of(name: str, frames=()) -> str:
    """The phase of a kernel (or, on the CPU, operator) ``name`` launched under the Python frames
    ``frames`` (innermost first): the innermost function a phase names, else the outermost module
    below the API a phase names (:data:`PHASES`); else "api" when the API is on the stack; else the
    phase whose Triton kernel the name is; else :data:`OTHER`."""
    places = [p for p in map(_place, frames) if p is not None]
    for here, func in places:  # innermost first
        for phase, _, claimed in PHASES:
            if f"{here}: {func}" in claimed:
                return phase
    for here, _ in reversed(places):  # outermost first
        if here in API_PLACES:
            continue
        for phase, _, claimed in PHASES:
            if here in claimed:
                return phase
    by_name = next((phase for phase, names, _ in PHASES if any(n in name for n in names)), None)
    return by_name or ("api" if any(here in API_PLACES for here, _ in places) else OTHER)


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


#: The CUDA runtime calls that launch kernels and copies (their ids are the launches' correlation
#: ids, which the device events carry as theirs): cudaLaunchKernel, cuLaunchKernelEx (Triton), ...
_RUNTIME_PREFIXES = ("cuda", "cu")


def kernel_rows(prof, calls: int, device: torch.device) -> list[dict]:
    """``{name, phase, launches, ms}`` per (kernel, phase) per call, slowest first.  On CUDA every
    device event once, placed by the Python frames above the runtime call that launched it (the
    CPU event of the same correlation id; an event without one is placed by its name); on the CPU
    every operator's self CPU time."""
    acc: dict[tuple[str, str], list] = {}

    def add(name, frames, us):
        entry = acc.setdefault((name, phase_of(name, frames)), [0, 0.0])
        entry[0] += 1
        entry[1] += us

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = list(prof.events())
    if device.type == "cuda":
        # (an operator's id may equal a launch's correlation id: only runtime calls are launches)
        launches = {e.id: e for e in events if e.device_type == cpu and e.name.startswith(_RUNTIME_PREFIXES)}
        for e in events:
            if e.device_type == cuda:
                launch = launches.get(e.id)
                add(e.name, _frames(launch) if launch is not None else (), float(e.time_range.elapsed_us()))
    else:
        for e in events:
            if e.device_type == cpu and e.name.startswith("aten::") and e.self_cpu_time_total > 0:
                add(e.name, _frames(e), float(e.self_cpu_time_total))
    rows = [dict(name=name, phase=phase, launches=n / calls, ms=us / 1000.0 / calls)
            for (name, phase), (n, us) in acc.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def has_frames(prof) -> bool:
    """Whether the profile holds Python frames (``with_stack``; some torch releases give none, and
    then every kernel is placed by its name alone)."""
    return any(".py(" in e.name for e in prof.events())


def phase_totals(rows: list[dict]) -> dict[str, float]:
    """ms per call of each phase (every phase of :data:`PHASES`, "api" and :data:`OTHER`, in call order)."""
    totals = {phase: 0.0 for phase, _, _ in PHASES} | {"api": 0.0, OTHER: 0.0}
    for r in rows:
        totals[r["phase"]] += r["ms"]
    return totals


def profile_call(fn, calls: int, device: torch.device) -> tuple[list[dict], bool]:
    """:func:`kernel_rows` of ``calls`` calls of ``fn`` after a warm-up one, and :func:`has_frames`."""
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
    return kernel_rows(prof, calls, device), has_frames(prof)


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
    order = args.order if args.order in (None, "drop") else int(args.order)
    overrides = dict(routing=args.routing, order=order, tail=args.tail, block_size=args.block_size)
    kw = dict(call.kwargs, **{k: v for k, v in overrides.items() if v is not None})
    if device.type == "cuda":
        kw["cuda_graph"] = False  # (a replayed graph would show as one launch)
    rows, framed = profile_call(lambda: pisa_attention(call.q, call.k, call.v, **kw), args.calls, device)
    shown = {k: v for k, v in kw.items() if k in ("sparsity", "order", "tail", "routing", "block_size", "backend")}
    title = (f"{args.family}{' (small)' if args.small else ''}, B = {fam.batch}, {fam.tokens} tokens x {fam.heads} "
             f"heads, d = {fam.head_dim}, {args.data} inputs, {shown}, on {device}")
    if not framed:
        title += " (this torch's profiler gave no Python frames: kernels are placed by their names only)"
    print(report(rows, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=environment(device), title=title, kwargs={k: str(v) for k, v in shown.items()},
                           python_frames=framed, phases=phase_totals(rows), kernels=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
