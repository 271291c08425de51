"""Soak at real model sizes: many consecutive sampling runs in one process, and what they leave.

    COMFYUI_PATH=~/comfy/ComfyUI python -m pisa_lab.e2e.soak --runs 20        # GPU
    python -m pisa_lab.e2e.soak --toy --runs 12                               # CPU, tiny models

A ComfyUI server samples for days with the same patched models.  This builds two real-size models
(default: Wan2.1 1.3B at 480p, whose long calls run the Triton kernel, and FLUX.1-dev at 1024²,
whose short calls replay CUDA graphs), patches each with its own PISA Patch node (different
settings), and runs ``--runs`` complete sampling runs alternating between them (every step of a
short schedule with one dense step, each run its own ``pre_run`` / ``cleanup``, as ComfyUI's sampler
makes them).  After each run it records GPU memory (allocated, reserved), the library's caches
(plans, token orders, CUDA graphs), the pack's live objects and every live tensor.  After the
warm-up runs nothing may grow: memory within ``--slack-mib``, caches and objects not at all, and
each model's output of a run equal to its first run's (on a GPU within roundings).  Exit status 1 when something grew.
Tests: tests/comfy/test_soak.py (the CPU soak of the node itself), tests/comfy/test_e2e_soak.py.
"""

from __future__ import annotations

import argparse
import collections
import gc
import importlib
import json
import os
import sys
import time
import types

import torch

from .comfy_host import comfy_root, import_comfy, load_pack, node_defaults
from .models import StepRunner, build, make_inputs, simple_schedule
from .specs import SPECS, TOY_SPECS

#: Steps of each soak run (the first one dense).
STEPS, DENSE_STEPS = 4, 1
#: A GPU run's output against the same model's first run (relative L2): roundings only.
GPU_REPEAT_TOL = 1e-2
#: Widgets of the second model's node, which differ from the first's (the node's defaults); with
#: ``min_tokens`` 0 FLUX 1024²'s calls (4,608 tokens, under the default) run PISA, as CUDA graphs.
OTHER_NODE = {"sparsity": 0.9, "block_size": "128", "taylor_order": "0", "min_tokens": 0}


def pack_objects(prefix: str) -> collections.Counter:
    """Live objects of the pack's classes, and the functions it created (override closures)."""
    counts = collections.Counter()
    for o in gc.get_objects():
        module = type(o).__dict__.get("__module__")
        if isinstance(module, str) and module.startswith(prefix):
            counts[type(o).__qualname__] += 1
        elif type(o) is types.FunctionType and (o.__module__ or "").startswith(prefix):
            counts["function " + o.__qualname__] += 1
    return counts


def live_tensors() -> tuple[int, int]:
    """Live tensors and the bytes of their distinct storages."""
    storages = {}
    n = 0
    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor):
            n += 1
            s = o.untyped_storage()
            storages[(s.data_ptr(), o.device)] = s.nbytes()
    return n, sum(storages.values())


def snapshot(pack, device) -> dict:
    gc.collect()
    prefix = pack.__name__ + "."
    api = importlib.import_module(prefix + "pisa_kernels.api")
    graphs = importlib.import_module(prefix + "pisa_kernels.graphs")
    snap = {"caches": {"plans": len(api._PLAN_CACHE), "token_orders": len(api._PERM_CACHE),
                       "cuda_graphs": len(graphs._GRAPHS)},
            "objects": pack_objects(prefix), "tensors": live_tensors()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        snap["allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
        snap["reserved_mib"] = torch.cuda.memory_reserved(device) / 2**20
    return snap


class Case:
    """One model, its PISA Patch, and a short sampling run."""

    def __init__(self, C, pack, spec, device, dtype, widgets: dict, uid: str):
        self.C, self.spec = C, spec
        patcher, _, _ = build(C, spec, device, dtype)
        node = pack.NODE_CLASS_MAPPINGS["PISAPatch"]
        self.widgets = {**node_defaults(node), "dense_steps": DENSE_STEPS, **widgets}
        (self.patched,) = node().patch(patcher, unique_id=uid, **self.widgets)
        self.sigmas = simple_schedule(patcher.model.model_sampling, STEPS)
        self.x, self.conds = make_inputs(patcher.model, spec, device)

    def state(self):
        return self.patched.model_options["transformer_options"]["optimized_attention_override"].pisa_state

    def run(self) -> tuple[torch.Tensor, dict]:
        """One sampling run: every step's model evaluation, then the run's statistics."""
        runner = StepRunner(self.C, self.patched, self.sigmas, self.x, self.conds)
        try:
            with torch.inference_mode():
                out = None
                for sigma in self.sigmas[:-1].tolist():
                    out = runner(sigma)
        finally:
            runner.close()
        return out, self.state().last_summary


def soak(C, pack, specs, device, dtype, runs: int, warm_up: int, slack_mib: float, widgets: dict | None = None,
         log=print) -> dict:
    """``widgets``: set on every node (``--toy``: ``min_tokens`` 0 for the tiny sequences)."""
    cases = [Case(C, pack, spec, device, dtype, {**({} if i == 0 else OTHER_NODE), **(widgets or {})},
                  uid=f"soak{i}") for i, spec in enumerate(specs)]
    first: dict[int, tuple] = {}
    rows, before = [], None
    for i in range(runs):
        case = cases[i % len(cases)]
        t0 = time.perf_counter()
        out, summary = case.run()
        if i < len(cases):
            first[i] = (out.clone(), summary["pisa_calls"])
            if not summary["pisa_calls"]:
                raise RuntimeError(f"{case.spec.name}: the soak run ran no PISA call ({summary['text']})")
        ref, ref_calls = first[i % len(cases)]
        diff = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
        # bit-equal on the CPU; on a GPU the pre-scan's fp32 atomics add in any order, so a run may
        # differ from the first by roundings (bf16), never by more
        same = (diff == 0.0 if device.type == "cpu" else diff <= GPU_REPEAT_TOL) and summary["pisa_calls"] == ref_calls
        del out
        snap = snapshot(pack, device)
        row = {"run": i, "model": case.spec.name, "s": round(time.perf_counter() - t0, 2), "same_output": same,
               "rel_l2_vs_first": diff,
               "pisa_calls": summary["pisa_calls"], "calls": summary["calls"], **snap["caches"],
               "pack_objects": sum(snap["objects"].values()), "tensors": snap["tensors"][0],
               "tensor_mib": round(snap["tensors"][1] / 2**20, 1)}
        if "allocated_mib" in snap:
            row.update(allocated_mib=round(snap["allocated_mib"], 1), reserved_mib=round(snap["reserved_mib"], 1))
        rows.append(row)
        log(json.dumps(row))
        if i == warm_up - 1:
            before = snap
    after = snap
    problems = []
    if before is None:
        problems.append(f"no baseline: --runs {runs} <= --warm-up {warm_up}")
    else:
        grown = {k: (before["objects"].get(k, 0), n) for k, n in after["objects"].items()
                 if n > before["objects"].get(k, 0)}
        if grown:
            problems.append(f"pack objects grew: {grown}")
        if after["caches"] != before["caches"]:
            problems.append(f"caches changed: {before['caches']} -> {after['caches']}")
        if after["tensors"][0] > before["tensors"][0] or after["tensors"][1] > before["tensors"][1]:
            problems.append(f"live tensors grew: {before['tensors']} -> {after['tensors']}")
        for key in ("allocated_mib", "reserved_mib"):
            if key in after and after[key] - before[key] > slack_mib:
                problems.append(f"{key} grew: {before[key]:.1f} -> {after[key]:.1f}")
    problems += [f"run {r['run']} ({r['model']}) differs from its first run" for r in rows if not r["same_output"]]
    return {"runs": rows, "warm_up": warm_up, "slack_mib": slack_mib, "problems": problems,
            "widgets": {c.spec.name: c.widgets for c in cases}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pisa_lab.e2e.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated (default wan2.1-1.3b-480p,flux1-dev-1024; "
                                                   "--toy: toy-wan,toy-flux)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warm-up", type=int, default=4, help="runs before the baseline (default 4)")
    ap.add_argument("--slack-mib", type=float, default=16.0, help="allowed GPU memory drift (default 16 MiB)")
    ap.add_argument("--toy", action="store_true", help="tiny models on the CPU, PISA's reference backend")
    ap.add_argument("--comfy", default=None, help="ComfyUI checkout (default $COMFYUI_PATH, else ~/comfy/ComfyUI)")
    ap.add_argument("--json", default=None, help="write the runs and the verdict here")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.toy or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.toy:
        ap.error("real model sizes need a CUDA GPU; use --toy on the CPU")
    pool = TOY_SPECS if args.toy else SPECS
    names = args.models.split(",") if args.models else (
        ["toy-wan", "toy-flux"] if args.toy else ["wan2.1-1.3b-480p", "flux1-dev-1024"])
    unknown = [n for n in names if n not in pool]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(pool)}")
    if args.toy:
        torch.set_num_threads(1)
        # the CPU has no PISA backend of its own: the node runs the PyTorch reference (read by the
        # node's settings, as in the node tests)
        os.environ.setdefault("PISA_BACKEND", "reference")
    C = import_comfy(comfy_root(args.comfy), cpu=device.type == "cpu")
    pack = load_pack()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = soak(C, pack, [pool[n] for n in names], device, dtype, args.runs, args.warm_up, args.slack_mib,
                  widgets={"min_tokens": 0} if args.toy else None)
    report["environment"] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                             "torch": torch.__version__, "comfyui": C.version}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    keys = ("allocated_mib", "reserved_mib", "tensors", "plans", "token_orders", "cuda_graphs", "pack_objects")
    base = report["runs"][min(args.warm_up, len(report["runs"])) - 1]
    print(f"[soak] {len(report['runs'])} runs of {', '.join(names)} on {report['environment']['device']}: after the "
          f"warm-up {({k: base[k] for k in keys if k in base})}, after the last run "
          f"{({k: report['runs'][-1][k] for k in keys if k in base})}; "
          + ("OK: nothing grew" if not report["problems"] else "PROBLEMS: " + "; ".join(report["problems"])),
          flush=True)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
