"""Command line of ``python -m pisa_lab.e2e`` (see the package docstring)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import traceback

import torch

from .comfy_host import comfy_root, import_comfy, load_pack
from .compile_check import compile_check
from .report import compact_table, environment, fmt_number, header_lines, write_outputs
from .specs import (COMPILE_SPECS, COMPILE_TOY_SPECS, DEFAULT_MODELS, DEPTH_KEYS, ESTIMATE_S, ISSUE_DENSE_STEPS,
                    ISSUE_STEPS, SPECS, TOY_SPECS)
from .timing import Budget, bench_model, free


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pisa_lab.e2e",
                                 description="End-to-end speed of the PISA Patch node inside ComfyUI, at real model sizes.")
    ap.add_argument("--models", default=None,
                    help="comma-separated names or 'all' (default: the issue's five). Real: " + ", ".join(SPECS)
                         + ". Toy: " + ", ".join(TOY_SPECS))
    ap.add_argument("--toy", action="store_true", help="tiny models on the CPU (fp32, PISA reference backend)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer timed steps (1 for slow steps); steps over 3 s warm up on a short latent (2 latent frames / "
                         "a quarter of the image)")
    ap.add_argument("--reps", type=int, default=None, help="least timed steps per pass (default 3; --quick 1)")
    ap.add_argument("--target-s", type=float, default=None,
                    help="time short steps until this many seconds per pass (default 10; --quick 2)")
    ap.add_argument("--sdpa", choices=["both", "default", "cudnn"], default="both",
                    help="dense baseline SDPA priority: PyTorch default, cuDNN first, or both (the faster wins)")
    ap.add_argument("--settings", choices=["defaults", "workflow"], default="defaults",
                    help="PISA widgets: the node's defaults or the bundled workflow's")
    ap.add_argument("--compile", action="store_true", help="also check torch.compile (TorchCompileModel path)")
    ap.add_argument("--compile-only", action="store_true", help="only the torch.compile check")
    ap.add_argument("--compile-models", default="wan", help="families for --compile: wan,flux,hunyuan_video or all")
    ap.add_argument("--compile-blocks", type=int, default=None,
                    help="blocks of the --compile model (Wan layers; FLUX/HunyuanVideo double and single each)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; CPU: eager)")
    ap.add_argument("--profile", action="store_true",
                    help="also run one sparse step under torch.profiler: GPU kernel time by group, the top kernels")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget: optional passes (cuDNN baseline, no-attention) are skipped when short")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    ap.add_argument("--comfy", default=None, help="ComfyUI checkout (default $COMFYUI_PATH, else ~/comfy/ComfyUI)")
    ap.add_argument("--device", default=None, help="default cuda if available (--toy: cpu)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for --toy (default 1)")
    ap.add_argument("-v", "--verbose", action="store_true", help="ComfyUI's and PISA's log lines too")
    opts = ap.parse_args(argv)
    opts.device = torch.device(opts.device or ("cpu" if opts.toy or not torch.cuda.is_available() else "cuda"))
    if opts.device.type == "cuda" and opts.device.index is None:
        opts.device = torch.device("cuda", torch.cuda.current_device())
    if opts.device.type != "cuda" and not opts.toy:
        ap.error("real model sizes need a CUDA GPU; use --toy on the CPU")
    opts.dtype = torch.bfloat16 if opts.device.type == "cuda" else torch.float32
    if opts.device.type == "cpu":
        # Tiny CPU models: threads only add contention (on a busy 2-core machine, 10-100x slower).
        torch.set_num_threads(opts.threads)
    opts.reps = opts.reps or (1 if opts.quick else 3)
    opts.target_s = opts.target_s if opts.target_s is not None else (2.0 if opts.quick or opts.toy else 10.0)
    opts.compile_backend = opts.compile_backend or ("inductor" if opts.device.type == "cuda" else "eager")
    # Toy sequences are a few hundred tokens: below the node's min_tokens, so let them run PISA.
    opts.widget_overrides = {"min_tokens": 0} if opts.toy else {}
    specs = TOY_SPECS if opts.toy else SPECS
    names = (DEFAULT_MODELS if not opts.toy else list(TOY_SPECS)) if not opts.models else (
        list(specs) if opts.models == "all" else [m.strip() for m in opts.models.split(",") if m.strip()])
    unknown = [n for n in names if n not in specs]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(specs)}")
    opts.specs = [specs[n] for n in names]
    fams = ["wan", "flux", "hunyuan_video"] if opts.compile_models == "all" else \
        [f.strip() for f in opts.compile_models.split(",") if f.strip()]
    pool = COMPILE_TOY_SPECS if opts.toy else COMPILE_SPECS
    if any(f not in pool for f in fams):
        ap.error(f"--compile-models: choose from {list(pool)}")
    opts.compile_specs = [pool[f] for f in fams] if (opts.compile or opts.compile_only) else []
    if opts.compile_blocks:
        opts.compile_specs = [dataclasses.replace(s, structure={**s.structure, **{
            k: opts.compile_blocks for k in DEPTH_KEYS[s.family]}}) for s in opts.compile_specs]
    if opts.compile_only:
        opts.specs = []
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING, format="%(message)s")
    if not opts.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    t0 = time.perf_counter()
    C = import_comfy(comfy_root(opts.comfy), cpu=opts.device.type == "cpu")
    pack = load_pack()
    budget = Budget(opts.budget_s - (time.perf_counter() - t0) if opts.budget_s else None)
    torch.manual_seed(0)
    report = {"environment": environment(C, opts), "results": [], "compile": [],
              "settings_note": ("PISA at the node's default widgets" if opts.settings == "defaults" else
                                "PISA at the bundled workflows' widgets")
              + (" (toy: min_tokens 0, PISA reference backend)" if opts.toy else "") + "; runs projected as workflow steps/dense steps and "
              f"the issue's {ISSUE_STEPS}/{ISSUE_DENSE_STEPS}"}
    print(f"[e2e] ComfyUI {C.version} at {C.root}; {report['environment'].get('gpu') or opts.device}; "
          f"torch {torch.__version__}; import {time.perf_counter() - t0:.1f}s", flush=True)
    compile_estimate = ESTIMATE_S["compile"] * len(opts.compile_specs)
    for i, spec in enumerate(opts.specs):
        budget.reserved = sum(ESTIMATE_S.get(s.name, 10) for s in opts.specs[i + 1:]) + compile_estimate
        print(f"[e2e] {spec.name}: {spec.title}", flush=True)
        try:
            res = bench_model(C, pack, spec, opts, budget)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next model
            res = {"model": spec.name, "title": spec.title, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()}
            print(res["traceback"], file=sys.stderr, flush=True)
        report["results"].append(res)
        free(opts.device)
        if getattr(opts, "last_model", None) is not None:
            res["model_freed"] = opts.last_model() is None
            opts.last_model = None
            if not res["model_freed"]:
                print(f"[e2e]   warning: {spec.name} is still referenced after its run", flush=True)
        if opts.device.type == "cuda":
            res["gpu_gb_after_free"] = torch.cuda.memory_allocated(opts.device) / 2**30
            s = res["summary"]
            print(f"[e2e]   dense {s['dense_ms'] / 1000:.3f}s ({s['dense_sdpa']}), gated {s['gated_ms'] / 1000:.3f}s, "
                  f"sparse {s['sparse_ms'] / 1000:.3f}s, step x{s['step_speedup']:.2f}, "
                  f"attention {fmt_number(s.get('attention_share'), '{:.0%}')}, {res['wall_s']:.0f}s", flush=True)
        write_outputs(report, opts)
    for i, spec in enumerate(opts.compile_specs):
        budget.reserved = ESTIMATE_S["compile"] * (len(opts.compile_specs) - i - 1)
        if opts.specs and not budget.allows(ESTIMATE_S["compile"]):
            report["compile"].append({"model": spec.name, "error": "skipped: time budget"})
            continue
        print(f"[e2e] torch.compile check: {spec.name}", flush=True)
        try:
            res = compile_check(C, pack, spec, opts)
        except Exception as exc:  # noqa: BLE001
            res = {"model": spec.name, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(res["traceback"], file=sys.stderr, flush=True)
        report["compile"].append(res)
        free(opts.device)
        write_outputs(report, opts)
    report["total_s"] = time.perf_counter() - t0
    write_outputs(report, opts)
    print("\n" + "\n".join(header_lines(report)[2:]) + "\n" + compact_table(report), flush=True)
    print(f"[e2e] total {report['total_s']:.0f}s", flush=True)
    failed = [r for r in report["results"] + report["compile"] if "error" in r]
    return 1 if failed else 0
