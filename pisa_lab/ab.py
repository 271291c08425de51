"""Kernel A/B in one process: the node's real calls with the library as it is, against the same calls
with some of its modules swapped for another version of their file (a baseline commit's, a branch's)
or with one of its constants changed; outputs compared first, then times taken interleaved.

    git show main:pisa_kernels/triton_kernels.py > out/ab/main_tk.py      # here: the GPU machine has no git
    python -m pisa_lab.ab --variant main:triton_kernels=out/ab/main_tk.py \\
        --variant pool-fewer:triton_kernels.POOL_PROGRAMS_PER_SM=2 --json out/ab.json

A variant is ``LABEL:SPEC[,SPEC...]``; a SPEC is ``MODULE=PATH`` (``pisa_kernels.MODULE`` replaced by
the file at PATH, loaded inside the package so that its relative imports bind to this library's
other modules) or ``MODULE.NAME=VALUE`` (a Python literal).  Every variant applies on top of the
library as it is, which runs as ``current`` and is the reference of the output comparison.

Why one process: timings are only comparable within one run on one card (device METHOD.md); a
change is kept when it wins here, with its outputs equal to the current ones (for a kernel that
must not change the result: same selections, rounding only).  What is swapped is what the API
reaches through the module at call time (``from . import triton_kernels as tk`` inside its
functions; ``api`` itself can be swapped too); names another module imported at its own import
(the Hopper kernel's ``tail_bias``) stay the current ones.  CUDA graphs are off, so that no variant replays another's captured kernels.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass

import torch

from .bench_node_calls import FAMILIES, node_call
from .measure import environment, make_inputs, rel_l2, timer_for

PACKAGE = "pisa_kernels"


def pisa_attention(*args, **kwargs):
    """The API of the package as it is now (a variant may swap ``api`` itself)."""
    return importlib.import_module(f"{PACKAGE}.api").pisa_attention(*args, **kwargs)


@dataclass(frozen=True)
class Variant:
    label: str
    swaps: tuple[tuple[str, str], ...] = ()  # (module, path)
    sets: tuple[tuple[str, str, object], ...] = ()  # (module, name, value)


def parse_variant(text: str) -> Variant:
    """``LABEL:SPEC[,SPEC...]`` (module docstring) as a :class:`Variant`; ValueError where malformed."""
    label, sep, specs = text.partition(":")
    if not sep or not label or not specs or label == "current":
        raise ValueError(f"a variant is LABEL:MODULE=PATH or LABEL:MODULE.NAME=VALUE (not 'current'), got {text!r}")
    swaps, sets = [], []
    for spec in specs.split(","):
        target, eq, value = spec.partition("=")
        if not eq or not target or not value:
            raise ValueError(f"{spec!r} in {text!r} is neither MODULE=PATH nor MODULE.NAME=VALUE")
        module, dot, name = target.partition(".")
        if dot:
            try:
                sets.append((module, name, ast.literal_eval(value)))
            except (ValueError, SyntaxError):
                raise ValueError(f"{value!r} in {text!r} is not a Python literal") from None
        else:
            swaps.append((module, value))
    return Variant(label, tuple(swaps), tuple(sets))


_LOADED: dict[tuple[str, str], object] = {}


def load_module(module: str, path: str):
    """The file at ``path`` as a module of the package (once per file: its kernels compile once)."""
    key = (module, path)
    if key not in _LOADED:
        spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{module}", path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot load {path!r} as {PACKAGE}.{module}")
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = PACKAGE
        spec.loader.exec_module(mod)  # (not registered in sys.modules: applied() swaps it in)
        _LOADED[key] = mod
    return _LOADED[key]


@contextlib.contextmanager
def applied(variant: Variant):
    """The library with ``variant``'s swaps and constants, restored on exit."""
    package = importlib.import_module(PACKAGE)
    undo = []
    try:
        for module, path in variant.swaps:
            full = f"{PACKAGE}.{module}"
            current = importlib.import_module(full)
            replacement = load_module(module, path)
            undo.append(lambda full=full, module=module, current=current: (
                sys.modules.__setitem__(full, current), setattr(package, module, current)))
            sys.modules[full] = replacement
            setattr(package, module, replacement)
        for module, name, value in variant.sets:
            mod = importlib.import_module(f"{PACKAGE}.{module}")
            if not hasattr(mod, name):
                raise ValueError(f"{PACKAGE}.{module} has no {name}")
            undo.append(lambda mod=mod, name=name, old=getattr(mod, name): setattr(mod, name, old))
            setattr(mod, name, value)
        yield
    finally:
        for fn in reversed(undo):
            fn()


def ab_case(family: str, routing: str, variants: list[Variant], *, fam=None, reps: int = 2, seed: int = 0,
            device=None, backend: str = "auto", dtype=torch.bfloat16) -> dict:
    """One node call (``family`` of :data:`FAMILIES`, or ``fam`` itself) under every variant:
    ``{"case", "err": {label: rel. L2 against current}, "tiles_equal": {label: bool} (adaptive),
    "ms": {label: [one time a repetition]}}``.  ``backend``: the node's (``auto``) or one forced;
    ``dtype``: the inputs' (bf16, as the benchmark's)."""
    device = device or torch.device("cuda")
    fam = fam or FAMILIES[family]
    qkv = make_inputs("random", fam.batch, fam.heads, fam.tokens, fam.head_dim, seed, device)
    call = node_call(fam, *(t.to(dtype) for t in qkv))
    kw = dict(call.kwargs, routing=routing, backend=backend, cuda_graph=False, return_stats=True)
    every = [Variant("current")] + list(variants)
    outs = {}
    for var in every:
        with applied(var):
            outs[var.label] = pisa_attention(call.q, call.k, call.v, **kw)
    ref, ref_stats = outs["current"]
    row = dict(case=f"{family} {routing}", err={}, tiles_equal={}, ms={})
    for label, (out, stats) in outs.items():
        row["err"][label] = rel_l2(out, ref)
        if stats.tile_counts is not None:
            row["tiles_equal"][label] = bool(torch.equal(stats.tile_counts, ref_stats.tile_counts))
    del outs, ref, ref_stats
    timer = timer_for(device)
    kw["return_stats"] = False
    for _ in range(reps):  # interleaved, so that drift of the card's clocks reaches every variant alike
        for var in every:
            with applied(var):
                row["ms"].setdefault(var.label, []).append(timer(lambda: pisa_attention(call.q, call.k, call.v, **kw)))
    return row


def format_rows(rows: list[dict]) -> str:
    labels = list(rows[0]["ms"]) if rows else []
    lines = ["| case | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for r in rows:
        cells = []
        for label in labels:
            t = " / ".join(f"{x:.3f}" for x in r["ms"][label])
            same = r["tiles_equal"].get(label, True)
            cells.append(f"{t} (err {r['err'][label]:.1e}{'' if same else ', tiles differ'})")
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n(ms per call, one figure a repetition; err: relative L2 against current)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="LABEL:SPEC[,SPEC]")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--routings", nargs="*", default=["topk", "adaptive"], choices=["topk", "cov", "adaptive"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", help="write rows and environment to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("the A/B times kernels: it needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    print(json.dumps(env), flush=True)
    rows = []
    for family in args.families:
        for routing in args.routings:
            rows.append(ab_case(family, routing, args.variant, reps=args.reps))
            print(format_rows(rows[-1:]).splitlines()[-2], flush=True)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, variants=[v.label for v in args.variant], rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
