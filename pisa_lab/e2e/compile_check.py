"""Whether a patched model still works under torch.compile as ComfyUI's TorchCompileModel applies
it, with its graph breaks counted and classified against the unpatched model's.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from pathlib import Path


from .comfy_host import REPO, node_defaults
from .models import StepRunner, build, make_inputs, simple_schedule
from .specs import Spec
from .timing import sync, attention_calls_per_forward, pin_backend, rel_l2


def _skip_transformer_options_guards(guard_entries):
    """What ComfyUI's TorchCompileModel (v0.19.3) passes as ``guard_filter_fn``."""
    return [("transformer_options" not in entry.name) for entry in guard_entries]


def _compile_kwargs(C, backend: str) -> dict:
    """The arguments TorchCompileModel of this ComfyUI passes to ``set_torch_compile_wrapper``."""
    node = C.root / "comfy_extras" / "nodes_torch_compile.py"
    kwargs = {"backend": backend}
    if node.is_file() and "guard_filter_fn" in node.read_text():
        kwargs["options"] = {"guard_filter_fn": _skip_transformer_options_guards}
    return kwargs


class GraphBreakLog(logging.Handler):
    """Collects dynamo's graph-break records (the ``graph_breaks`` log artifact, quietly): where
    each break happened, why, and the user stack that led there."""

    LOGGER = "torch._dynamo.symbolic_convert.__graph_breaks"
    _AT = re.compile(r"in user code at (.+?):(\d+)")
    _FRAME = re.compile(r'File "(.+?)", line (\d+), in (\S+)')

    LIMIT_LOGGER = "torch._dynamo.convert_frame"  # "torch._dynamo hit config.recompile_limit (8)"

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[dict] = []
        self.limit_hits: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if "hit config." in text:  # a frame recompiled too often: dynamo runs it eagerly from now on
            self.limit_hits.append(" ".join(text.splitlines()[:2])[:240])
            return
        lines = text.splitlines()
        m = self._AT.search(lines[0] if lines else "")
        if not m:
            return
        reason = next((ln.strip() for ln in lines[1:] if ln.strip() and not ln.startswith(
            ("Graph Break Reason", "User code"))), "")
        stack = text.split("User code traceback:", 1)[1] if "User code traceback:" in text else ""
        self.records.append({"path": m.group(1), "line": int(m.group(2)), "reason": reason,
                             "opaque_pisa": "pisa_attention_override" in text,
                             "frames": [(f, int(n), fn) for f, n, fn in self._FRAME.findall(stack)]})

    @contextmanager
    def capture(self):
        logger, limits = logging.getLogger(self.LOGGER), logging.getLogger(self.LIMIT_LOGGER)
        chatty = logging.getLogger("torch._dynamo.variables.tensor")  # "Graph break from Tensor.item()" advice
        saved = logger.level, logger.propagate, chatty.level
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(self)
        limits.addHandler(self)
        chatty.setLevel(logging.ERROR)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            limits.removeHandler(self)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
            chatty.setLevel(saved[2])

    def classified(self) -> dict:
        """Distinct break sites, by kind: ``opaque_override`` (the call of PISA's override: one per
        attention call, expected), ``per_forward`` (PISA's DIFFUSION_MODEL wrapper bookkeeping),
        ``inside_attention`` (PISA code inside an attention call: must not happen),
        ``outside_pisa`` (ComfyUI's or torch's own; present unpatched too)."""
        sites: dict[tuple[str, int], dict] = {}
        for r in self.records:
            key = (r["path"], r["line"])
            site = sites.get(key)
            if site is None:
                site = sites[key] = {"at": f"{_short(r['path'])}:{r['line']}", "count": 0, "reason": r["reason"][:160],
                                     "kind": None}
            site["count"] += 1
            if site["kind"] is None or (site["kind"] == "unknown" and r["frames"]):
                site["kind"] = _break_kind(r)
        out = {"opaque_override": [], "per_forward": [], "inside_attention": [], "outside_pisa": []}
        for site in sites.values():
            kind = site.pop("kind")
            out["per_forward" if kind == "unknown" else kind].append(site)
        return out


def _short(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except (ValueError, OSError):
        return path


def _in_repo(path: str) -> bool:
    try:
        Path(path).resolve().relative_to(REPO)
        return True
    except (ValueError, OSError):
        return False


def _break_kind(record: dict) -> str:
    """Which kind of break site a record is (see :meth:`GraphBreakLog.classified`)."""
    if record["opaque_pisa"]:
        return "opaque_override"
    frames = record["frames"] or [(record["path"], record["line"], "?")]
    if not any(_in_repo(f) for f, _, _ in frames):
        return "outside_pisa"
    if any(f.replace("\\", "/").endswith("comfy/ldm/modules/attention.py") and fn == "wrapper" for f, _, fn in frames):
        return "inside_attention"
    return "per_forward" if record["frames"] else "unknown"


def compile_check(C, pack, spec: Spec, opts) -> dict:
    """Compile the diffusion model the way ComfyUI's TorchCompileModel node does
    (``comfy_api.torch_helpers.set_torch_compile_wrapper``: an APPLY_MODEL wrapper that swaps in
    ``torch.compile(diffusion_model)``), unpatched and PISA-patched (dense_steps 1, min_tokens 0,
    so the small model's self-attention runs PISA from step 1), run step 0 (dense), step 1 and
    step 2 (sparse), and count dynamo's graph breaks and graphs.  Patched, each attention call
    may add one break (the override is one opaque call); a repeated sparse step must add no graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from comfy_api.torch_helpers import set_torch_compile_wrapper

    device, dtype = opts.device, opts.dtype
    node_cls = pack.NODE_CLASS_MAPPINGS["PISAPatch"]
    kwargs = _compile_kwargs(C, opts.compile_backend)
    res = {"model": spec.name, "backend": opts.compile_backend, "torch": torch.__version__,
           "guard_filter_fn": "options" in kwargs}
    patcher, _, _ = build(C, spec, device, dtype)
    model = patcher.model
    widgets = dict(node_defaults(node_cls), min_tokens=0, dense_steps=1)
    (pisa_patcher,) = node_cls().patch(patcher, unique_id="e2e-compile", **widgets)
    pin_backend(pisa_patcher.model_options["transformer_options"]["optimized_attention_override"].pisa_state,
                opts, res)
    sample_sigmas = simple_schedule(model.model_sampling, 10)
    x, conds = make_inputs(model, spec, device)
    res["attention_calls_per_forward"] = attention_calls_per_forward(C, pisa_patcher, sample_sigmas, x, conds)
    eager = {}
    try:
        for name, base in (("unpatched", patcher), ("pisa", pisa_patcher)):
            m = base.clone()
            set_torch_compile_wrapper(model=m, **kwargs)
            torch._dynamo.reset()
            counters.clear()
            run = StepRunner(C, m, sample_sigmas, x, conds)
            forwards = []
            t_all = time.perf_counter()
            breaks = GraphBreakLog()
            try:
                with torch.inference_mode(), breaks.capture():
                    for step in (0, 1, 2):
                        t0 = time.perf_counter()
                        y = run(float(sample_sigmas[step]))
                        sync(device)
                        forwards.append({"step": step, "s": round(time.perf_counter() - t0, 3),
                                         "graph_breaks": sum(counters["graph_break"].values()),
                                         "unique_graphs": counters["stats"].get("unique_graphs", 0),
                                         "finite": bool(torch.isfinite(y).all())})
                    eager[name] = y
            finally:
                run.close()
            reasons = sorted(counters["graph_break"].items(), key=lambda kv: -kv[1])
            res[name] = {"forwards": forwards, "total_s": round(time.perf_counter() - t_all, 2),
                         "graph_breaks": forwards[-1]["graph_breaks"], "unique_graphs": forwards[-1]["unique_graphs"],
                         "break_reasons": [[r[:200], n] for r, n in reasons[:8]],
                         "break_sites": breaks.classified(), "recompile_limit_hits": breaks.limit_hits}
    finally:
        torch._dynamo.reset()
    # the compiled patched model computes what the eager patched model computes
    run = StepRunner(C, pisa_patcher, sample_sigmas, x, conds)
    try:
        with torch.inference_mode():
            res["compiled_vs_eager_rel_l2"] = rel_l2(eager["pisa"], run(float(sample_sigmas[2])))
    finally:
        run.close()
    up, pi = res["unpatched"], res["pisa"]
    where = pi["break_sites"]
    res["extra_graph_breaks"] = pi["graph_breaks"] - up["graph_breaks"]
    res["graphs_added_by_repeated_sparse_step"] = pi["forwards"][2]["unique_graphs"] - pi["forwards"][1]["unique_graphs"]
    res["breaks_inside_attention"] = len(where["inside_attention"])
    res["per_forward_break_sites"] = len(where["per_forward"])
    # usable: inside an attention call nothing but the one opaque override breaks the graph, a
    # repeated sparse step reuses the compiled graphs, and the output is finite
    res["ok"] = bool(not where["inside_attention"] and res["graphs_added_by_repeated_sparse_step"] == 0
                     and not pi["recompile_limit_hits"] and all(f["finite"] for f in pi["forwards"]))
    return res
