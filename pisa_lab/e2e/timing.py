"""Timing one model step dense, gated (a dense step of a patched model), sparse and without
attention, and summarising one model's passes.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
import weakref
from contextlib import nullcontext

import torch

from .call_times import CallRecorder, compare
from .comfy_host import node_defaults, read_workflow
from .models import StepRunner, build, make_inputs, noop_attention, simple_schedule, with_override
from .step_profile import profile_step
from .specs import ISSUE_DENSE_STEPS, ISSUE_STEPS, Spec, short_latent, tokens_of


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Budget:
    """Wall-clock budget of the whole run (``--budget-s``).  Optional passes (the cuDNN-first
    baseline, the no-attention pass, the compile check) are skipped, with a note, when they would
    eat into the time the models still to come are expected to need (``ESTIMATE_S``)."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.reserved = 0.0  # expected time of what is still to come

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.left() - self.reserved > estimate_s


def sdpa_context(name: str):
    """``default``: PyTorch's own SDPA priority (what ComfyUI uses on Linux); ``cudnn``: cuDNN
    attention first, then flash, efficient, math (the priority ComfyUI sets on Windows)."""
    if name == "default":
        return nullcontext()
    import inspect

    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(order, set_priority=True)
    return sdpa_kernel(order)


def time_pass(run, sigma: float, device, *, min_reps: int, target_s: float, max_reps: int = 20, warm=None,
              after_warmup=None):
    """Wall time (ms, median) of full evaluations: at least ``min_reps``, more while less than
    ``target_s`` has been timed (short steps), at most ``max_reps``; after one warm-up evaluation
    (``warm``, e.g. a runner on a short latent, else ``run`` itself).  Also the peak memory of the
    timed evaluations and the last output."""
    (warm or run)(sigma)
    sync(device)
    if after_warmup is not None:
        after_warmup()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, out = [], None
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < target_s * 1000.0):
        out = None
        sync(device)
        t0 = time.perf_counter()
        out = run(sigma)
        sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms": statistics.median(times), "all_ms": [round(t, 2) for t in times], "peak_gb": peak}, out


def _stats_per_forward(payload: dict | None, forwards: int) -> dict | None:
    if not payload:
        return None
    return {"attn_ms": payload["attn_ms"] / forwards, "calls": payload["calls"] // forwards,
            "pisa_calls": payload["pisa_calls"] // forwards, "density": payload["density"], "text": payload["text"]}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_model(C, pack, spec: Spec, opts, budget: Budget) -> dict:
    device, dtype = opts.device, opts.dtype
    node_cls = pack.NODE_CLASS_MAPPINGS["PISAPatch"]
    res: dict = {"model": spec.name, "title": spec.title, "family": spec.family, "notes": []}
    t_start = time.perf_counter()

    workflow = read_workflow(spec.workflow, node_cls)
    widgets = node_defaults(node_cls)
    res["settings_source"] = "node defaults"
    if opts.settings == "workflow" and workflow and workflow.get("pisa"):
        widgets, res["settings_source"] = dict(workflow["pisa"]), f"workflow {workflow['file']}"
    widgets.update(opts.widget_overrides)
    if opts.widget_overrides:
        res["settings_source"] += " + " + ", ".join(f"{k}={v}" for k, v in opts.widget_overrides.items())
    res["settings"], res["workflow"] = widgets, workflow

    t0 = time.perf_counter()
    patcher, model_config, overrides = build(C, spec, device, dtype)
    sync(device)
    if overrides:
        res["detection_overrides"] = overrides
        res["notes"].append(f"ComfyUI's detection hard-codes {sorted(overrides)} here; used the requested values")
    model = patcher.model
    dm = model.diffusion_model
    opts.last_model = weakref.ref(model)  # main() checks that it is gone before the next case
    res.update(build_s=time.perf_counter() - t0, supported_model=type(model_config).__name__,
               model_class=type(model).__name__, diffusion_class=type(dm).__name__,
               unet_config={k: v for k, v in model_config.unet_config.items() if k != "dtype"},
               params_b=sum(p.numel() for p in dm.parameters()) / 1e9,
               image_tokens=tokens_of(spec, dm.patch_size), text_tokens=spec.text_tokens,
               text_valid=spec.text_valid, batch=2 if spec.cfg else 1, latent=list(spec.latent))
    if device.type == "cuda":
        res["weights_gb"] = torch.cuda.memory_allocated(device) / 2**30

    dense_steps = int(widgets["dense_steps"])
    steps = max(ISSUE_STEPS, dense_steps + 1)
    sample_sigmas = simple_schedule(model.model_sampling, steps)
    dense_sigma, sparse_sigma = float(sample_sigmas[0]), float(sample_sigmas[dense_steps])
    res["schedule"] = {"steps": steps, "dense_step": 0, "dense_step_sigma": dense_sigma, "sparse_step": dense_steps,
                       "sparse_step_sigma": sparse_sigma}

    def pass_s(step_ms: float) -> float:  # expected seconds of one more pass of this model
        return step_ms / 1000.0 * (1.3 if opts.quick else 1 + max(opts.reps, opts.target_s * 1000.0 / step_ms))

    x, conds = make_inputs(model, spec, device)
    wx, wconds = make_inputs(model, spec, device, latent=short_latent(spec), seed=1) if opts.quick else (x, conds)
    (pisa_patcher,) = node_cls().patch(patcher, unique_id="e2e", **widgets)
    state = pisa_patcher.model_options["transformer_options"]["optimized_attention_override"].pisa_state
    pin_backend(state, opts, res)
    variants = {"dense": patcher, "pisa": pisa_patcher, "noop": with_override(patcher, noop_attention)}

    def measure(name: str, sigma: float, ctx: str, recorder: CallRecorder | None = None):
        """One pass: a sampling run of its own (StepRunner), warm-up, timed evaluations.  The
        warm-up runs at full size, except with --quick for steps slower than 3 s (known after the
        first dense pass), which warm up on a short latent instead, but for the sparse pass
        (``recorder``, which keeps the timed evaluations' PISA calls)."""
        run = StepRunner(C, variants[name], sample_sigmas, x, conds)
        slow = not res.get("dense") or min(t["ms"] for t in res["dense"].values()) > 3000.0
        # The sparse pass warms up at full size: PISA's kernels have variants a short latent does
        # not reach (e.g. the top-k kernel's row width), whose first compilation on a machine
        # without Triton's cache would otherwise land in the one timed step.
        short_ok = opts.quick and slow and recorder is None
        warm = StepRunner(C, variants[name], sample_sigmas, wx, wconds) if short_ok else None

        def after_warmup():
            state.finish_run()
            if recorder is not None:
                recorder.start()

        try:
            with sdpa_context(ctx):
                result, out = time_pass(run, sigma, device, min_reps=opts.reps, target_s=opts.target_s,
                                        warm=warm, after_warmup=after_warmup)
            if name == "pisa":  # PISA's own statistics of the timed evaluations (CUDA events per call)
                result["pisa_stats"] = _stats_per_forward(state.finish_run(), len(result["all_ms"]))
            return result, out
        finally:
            if recorder is not None:
                recorder.stop()
            for r in (warm, run):
                if r is not None:
                    r.close()

    outputs = {}
    contexts = ["default"] if device.type != "cuda" or opts.sdpa == "default" else \
        ["default", "cudnn"] if opts.sdpa == "both" else ["cudnn"]
    with torch.inference_mode():
        if opts.quick:
            res["prime_s"] = prime(C, patcher, sample_sigmas, x, conds, dense_sigma, contexts, device)
        # Dense under each SDPA priority; the faster is the baseline and the context of the rest.
        res["dense"] = {}
        for ctx in contexts:
            if res["dense"] and not budget.allows(pass_s(min(t["ms"] for t in res["dense"].values()))):
                res["notes"].append(f"dense with SDPA priority '{ctx}' skipped: time budget")
                continue
            try:
                res["dense"][ctx], outputs[ctx] = measure("dense", dense_sigma, ctx)
            except Exception as exc:  # e.g. no kernel for a mask under this priority: keep the other
                res["notes"].append(f"dense with SDPA priority '{ctx}' failed: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
                del exc
                free(device)
        if not res["dense"]:
            raise RuntimeError("no dense measurement succeeded: " + "; ".join(res["notes"]))
        best = min(res["dense"], key=lambda k: res["dense"][k]["ms"])
        res["dense_best"], dense_ms = best, res["dense"][best]["ms"]

        res["gated"], out_gated = measure("pisa", dense_sigma, best)
        recorder = CallRecorder(state)
        res["sparse"], out_sparse = measure("pisa", sparse_sigma, best, recorder)
        # the same configured calls alone, as the benchmark times them (issue 13)
        with sdpa_context(best):
            res["call_times"] = compare(recorder, device)
        del recorder
        free(device)
        if opts.profile and device.type == "cuda":
            run = StepRunner(C, pisa_patcher, sample_sigmas, x, conds)
            try:
                with sdpa_context(best):
                    res["profile"] = profile_step(run, sparse_sigma, device)
            finally:
                run.close()
                state.finish_run()
        if budget.allows(pass_s(dense_ms)):
            res["noop"], _ = measure("noop", dense_sigma, best)
        else:
            res["notes"].append("no-attention pass skipped: time budget")

        ref = outputs[best]
        res["checks"] = {
            "finite_dense": bool(torch.isfinite(ref).all()), "finite_sparse": bool(torch.isfinite(out_sparse).all()),
            # the dense step of the patched model calls ComfyUI's attention exactly as the model did
            "gated_max_abs_diff_vs_dense": float((out_gated.float() - ref.float()).abs().max()),
            # random weights: only a sanity check that the sparse step computes something close
            "sparse_rel_l2_vs_dense": rel_l2(out_sparse, ref)}

    gs, ss = res["gated"].get("pisa_stats") or {}, res["sparse"].get("pisa_stats") or {}
    if gs.get("pisa_calls"):
        res["notes"].append("the dense step ran PISA calls: step gating did not hold")
    if not ss.get("pisa_calls"):
        res["notes"].append("the sparse step ran no PISA call (see sparse.pisa_stats.text)")
    res["summary"] = summarize(res, dense_ms, workflow)
    res["wall_s"] = time.perf_counter() - t_start
    return res


def pin_backend(state, opts, res: dict) -> None:
    """--toy: the node runs Triton or stays dense; on the CPU the toy pins PISA's PyTorch reference
    (as the node-layer tests do), so that the sparse path runs at all."""
    if opts.toy and getattr(state.settings, "backend", None) != "reference":
        state.settings = dataclasses.replace(state.settings, backend="reference")
        res["backend_pinned"] = "reference"


def prime(C, patcher, sample_sigmas, x, conds, sigma: float, contexts, device) -> float:
    """--quick: warm everything up at the full size at the cost of about one step without attention:
    one full-size forward whose attention calls are only recorded (one per distinct call shape),
    then each recorded call once through ComfyUI's dense backend under each SDPA priority (cuDNN
    builds its plans per shape).  The passes after it then warm up on a short latent only."""
    t0 = time.perf_counter()
    calls: dict[tuple, tuple] = {}

    def recording(func, *args, **kwargs):
        key = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args[:4]) + tuple(
            (k, tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in sorted(kwargs.items())
            if k in ("mask", "skip_reshape", "skip_output_reshape", "heads"))
        calls.setdefault(key, (func, args, kwargs))
        return noop_attention(func, *args, **kwargs)

    run = StepRunner(C, with_override(patcher, recording), sample_sigmas, x, conds)
    try:
        run(sigma)
    finally:
        run.close()
    for ctx in contexts:
        with sdpa_context(ctx):
            for func, args, kwargs in calls.values():
                try:
                    func(*args, **kwargs)
                except Exception:  # noqa: BLE001 - the dense pass under this priority reports it
                    break
    sync(device)
    calls.clear()
    return time.perf_counter() - t0


def summarize(res: dict, dense_ms: float, workflow: dict | None) -> dict:
    gated_ms, sparse_ms = res["gated"]["ms"], res["sparse"]["ms"]
    s = {"dense_ms": dense_ms, "dense_sdpa": res["dense_best"], "gated_ms": gated_ms,
         "gated_over_dense": gated_ms / dense_ms, "sparse_ms": sparse_ms, "step_speedup": dense_ms / sparse_ms}
    if "noop" in res:
        rest = res["noop"]["ms"]
        s["no_attention_ms"] = rest
        s["attention_share"] = max(0.0, dense_ms - rest) / dense_ms
        # attention and everything PISA adds around it (layouts, routing, permutations)
        s["sparse_attention_ms"] = max(0.0, sparse_ms - rest)
        if dense_ms > rest and sparse_ms > rest:
            s["attention_speedup"] = (dense_ms - rest) / (sparse_ms - rest)
    ga, sa = res["gated"].get("pisa_stats") or {}, res["sparse"].get("pisa_stats") or {}
    if ga:
        s["attn_events_ms_dense"] = ga["attn_ms"]
    if res.get("call_times"):
        s["in_step_over_bench"] = max(c["ratio"] for c in res["call_times"])
    if sa:
        s["attn_events_ms_sparse"] = sa["attn_ms"]
        s["pisa_calls"] = f"{sa['pisa_calls']}/{sa['calls']}"
        s["density"] = sa["density"]
    runs = {}
    if workflow and workflow.get("steps") and workflow.get("pisa"):
        runs["workflow"] = (workflow["steps"], int(workflow["pisa"]["dense_steps"]))
    runs["issue"] = (ISSUE_STEPS, ISSUE_DENSE_STEPS)
    for key, (steps, dense_steps) in runs.items():
        dense_steps = min(dense_steps, steps)
        full_dense = steps * dense_ms / 1000.0
        full_pisa = (dense_steps * gated_ms + (steps - dense_steps) * sparse_ms) / 1000.0
        s[f"run_{key}"] = {"steps": steps, "dense_steps": dense_steps, "dense_s": full_dense, "pisa_s": full_pisa,
                           "speedup": full_dense / full_pisa}
    return s


def attention_calls_per_forward(C, patcher, sample_sigmas, x, conds) -> int:
    """Calls of ComfyUI's attention function in one forward (all of them, self and cross)."""
    seen = []

    def counting(func, *args, **kwargs):
        seen.append(1)
        return noop_attention(func, *args, **kwargs)

    run = StepRunner(C, with_override(patcher, counting), sample_sigmas, x, conds)
    try:
        with torch.inference_mode():
            run(float(sample_sigmas[0]))
    finally:
        run.close()
    return len(seen)


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
