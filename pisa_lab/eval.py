"""Attention fidelity: PISA (orders 1 / 0 / drop) and Sol-Attn against dense attention.

    python -m pisa_lab.eval                                  # small generated sets (CPU defaults)
    python -m pisa_lab.eval --sets full --json r.json --out results/   # real resolutions (GPU)
    python -m pisa_lab.eval --capture ComfyUI/output/pisa_captures/    # captured real q/k/v
    python -m pisa_lab.eval --tails plain lognormal          # both tails in every token order

Cases are the generated DiT-like sets of :mod:`pisa_lab.workloads` (``--sets``: a size
``tiny|small|full`` for every set, or ``name`` / ``name:size``) and capture files (``--capture``:
files or folders, see :mod:`pisa_kernels.capture_format`).  For every case the truth is dense
attention in float32 over the same (bf16) inputs, computed a few heads at a time; every method
is scored by the relative L2 error ``||o - o_dense|| / ||o_dense||`` over the whole output and
by the mean cosine similarity of the output rows (one row per token and head).

The methods run as the node runs them: text / extra tokens exact as keys (``sink_kv``) and as
queries (``dense_q``), the tiled token order (text first, grids in compact tiles) or the raster
(input) order, routing ``topk`` or ``cov`` (``auto`` = the node's rule: ``cov`` for images,
``topk`` for video), the tail ``plain`` (the paper's) or ``lognormal`` (``--tails``; ``auto`` = the
node's, log-normal; methods ``pisa-o1+ln`` / ``pisa-o0+ln``).  All methods of one token order see
the same order, and PISA's orders and tails share their selected blocks (routing depends on
neither).  Sol-Attn
(``comfy_kitchen.sol_attn``: its INT8 CUDA kernel on a GPU, its full-precision eager reference on
the CPU, where its O(N^2) memory allows) runs on the same permuted tokens with the text blocks as
sinks: ``sol-topk`` with ``topk_ratio`` = PISA's density, ``sol-topk-matched`` with the ratio
lowered by the 3 blocks Sol-Attn adds per query block (its diagonal +-1, always exact), so its
exact blocks do not exceed PISA's, and ``sol-tau`` with its default ``tau``.

Outputs in ``--out``: ``fidelity.md`` (concentration, error tables, bars) and ``fidelity.png``
(error vs sparsity, one line per method); ``--json`` writes every number and the environment.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from . import measure, workloads
from pisa_kernels import pisa_attention
from pisa_kernels.capture_format import read_capture
from pisa_kernels.limits import ROUTINGS as ROUTINGS_API
from pisa_kernels.routing import forced_blocks_from_tokens
from pisa_kernels.tiling import joint_permutation

SPARSITIES = (0.75, 0.875, 0.9, 0.95)
ORDERS = (1, 0, "drop")
TOKEN_ORDERS = ("tiled", "raster")
#: Tails to run; ``auto`` is the node's rule (:func:`resolve_tail`).
TAILS = ("auto",)
#: The sparsity of the issue's bars.
BAR_SPARSITY = 0.875
#: Bars: PISA order 1 error at most this times keep-or-drop's (same blocks), and this times Sol-Attn's.
DROP_RATIO, SOL_RATIO = 0.5, 0.8


# ---- cases ---------------------------------------------------------------------------------------

@dataclass
class Case:
    """One attention call to evaluate: ``q, k, v`` ``[B, N, H, D]`` in input order."""

    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    video: bool  # a 3-D grid: the tiled-vs-raster bar applies
    images_only: bool  # only 2-D grids: routing "auto" means "cov" (the node's rule)
    exact: list = field(default_factory=list)  # token ranges kept exact (text)
    tiled_perm: torch.Tensor | None = None  # the node's tiled order; None: no grid known
    kv_valid: torch.Tensor | None = None
    heads: list = field(default_factory=list)  # head type names (generated sets)
    describe: str = ""
    grids: list = field(default_factory=list)  # [(first position, grid sides)]

    def perm(self, token_order: str) -> torch.Tensor | None:
        """``raster`` (input order: None), ``tiled`` (the node's order) or ``tile:FxHxW`` / ``tile:HxW``
        (the node's rule with another tile shape; one grid only)."""
        if token_order == "raster":
            return None
        if token_order == "tiled":
            return self.tiled_perm
        if not token_order.startswith("tile:") or len(self.grids) != 1:
            raise ValueError(f"token order {token_order!r} needs a case with one grid (raster, tiled or tile:FxHxW)")
        tile = tuple(int(x) for x in token_order[5:].split("x"))
        start, grid = self.grids[0]
        return joint_permutation(self.q.shape[1], grid, start, tile=tile, device=self.q.device)

    def has_order(self, token_order: str) -> bool:
        """Whether :meth:`perm` can give ``token_order`` here (tile shapes must match the grid)."""
        if token_order == "raster":
            return True
        if token_order == "tiled":
            return self.tiled_perm is not None
        return len(self.grids) == 1 and len(token_order[5:].split("x")) == len(self.grids[0][1])

    def token_mask(self) -> torch.Tensor | None:
        """bool ``[N]`` of the exact (text) tokens, input order."""
        if not self.exact:
            return None
        mask = torch.zeros(self.q.shape[1], dtype=torch.bool)
        for s, e in self.exact:
            mask[s:e] = True
        return mask


def _size_tokens(tokens: list[str]) -> list[tuple[str, str]]:
    out = []
    for tok in tokens:
        if tok in ("tiny", "small", "full"):
            out += [(name, tok) for name in workloads.SETS]
        else:
            name, _, size = tok.partition(":")
            out.append((name, size or "small"))
    return out


def cases_from_sets(tokens: list[str], seed: int, device: torch.device) -> list[Case]:
    cases = []
    for name, size in _size_tokens(tokens):
        spec = workloads.get_set(name, size)
        w = workloads.generate(spec, seed=seed, device=device)
        cases.append(Case(name=f"{name}/{size}", q=w.q, k=w.k, v=w.v, video=spec.video, images_only=not spec.video,
                          exact=[spec.text_range] if spec.text else [], tiled_perm=w.token_perm(),
                          heads=w.heads, describe=spec.describe(), grids=[(spec.grid_start, spec.grid)]))
    return cases


def cases_from_captures(paths: list[str], device: torch.device) -> list[Case]:
    files = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "*.safetensors"))) if os.path.isdir(p) else [p]
    cases = []
    for path in files:
        cap = read_capture(path, device=device)
        m = cap.meta
        placed = [(int(g[0]), tuple(g[1])) for g in m.get("grids") or []]
        grids = [g for _, g in placed]
        _, n, h, d = cap.q.shape
        desc = (f"{m.get('family') or m.get('model') or '?'} block {m.get('block')} step {m.get('step')}, "
                f"grids {grids or '-'}, {m.get('text_tokens', 0)} extra tokens, {n} tokens, {h} heads, d={d}")
        cases.append(Case(name=os.path.splitext(os.path.basename(path))[0], q=cap.q, k=cap.k, v=cap.v,
                          video=any(len(g) == 3 for g in grids), images_only=bool(grids) and all(len(g) == 2 for g in grids),
                          exact=[tuple(r) for r in m.get("exact") or []],
                          tiled_perm=cap.token_perm.to(device) if cap.token_perm is not None else None,
                          kv_valid=cap.kv_valid, describe=desc, grids=placed))
    return cases


# ---- dense truth and metrics ---------------------------------------------------------------------

def dense_reference(case: Case, scale: float | None = None) -> torch.Tensor:
    """float32 dense attention ``[B, N, H, D]``, a few heads at a time (bounded memory)."""
    q, k, v = case.q, case.k, case.v
    b, n, h, d = q.shape
    mask = None if case.kv_valid is None else case.kv_valid.to(q.device)[:, None, None, :]
    out = torch.empty(b, n, h, d, dtype=torch.float32, device=q.device)
    step = max(1, (1 << 27) // max(1, b * n * d * 4))
    for s in range(0, h, step):
        qh, kh, vh = (t[:, :, s:s + step].float().transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        out[:, :, s:s + step] = o.transpose(1, 2)
    return out


def metrics(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, mean row cosine similarity)."""
    o = out.float()
    diff = (o - ref).double().norm()
    rel = float(diff / ref.double().norm().clamp_min(1e-30))
    cos = torch.nn.functional.cosine_similarity(o, ref, dim=-1, eps=1e-12)
    return rel, float(cos.double().mean())


# ---- methods -------------------------------------------------------------------------------------

def resolve_routing(routing: str, case: Case) -> str:
    if routing == "auto":
        return "cov" if case.images_only else "topk"
    return routing


def resolve_tail(tail: str) -> str:
    """``auto``: the node's tail, log-normal in every token order (docs/fidelity.md)."""
    return "lognormal" if tail == "auto" else tail


def method_name(order, tail: str = "plain") -> str:
    """``pisa-o1`` / ``pisa-o0`` / ``pisa-drop``; ``+ln`` marks the log-normal tail (drop has no tail)."""
    base = {1: "pisa-o1", 0: "pisa-o0", "drop": "pisa-drop"}[order]
    return base + ("+ln" if tail == "lognormal" and order != "drop" else "")


#: Routings of the evaluation: the API's, and ``auto`` (the node's choice per set).
ROUTINGS = ("auto",) + ROUTINGS_API


def pisa_kwargs(case: Case, *, order, sparsity: float, token_order: str, routing: str, backend: str,
                tail: str = "plain") -> dict:
    """``pisa_attention``'s keyword arguments for the case as the node makes its call."""
    return dict(sparsity=sparsity, order=order, layout="BNHD", sink_kv=case.exact or None,
                dense_q=case.exact or None, kv_valid=case.kv_valid, token_perm=case.perm(token_order),
                routing=routing, tail=tail, backend=backend)


def run_pisa(case: Case, *, with_stats: bool = False, **kw):
    """PISA as the node runs it (:func:`pisa_kwargs`); with ``with_stats`` also its :class:`PisaStats`."""
    out, st = pisa_attention(case.q, case.k, case.v, return_stats=True, **pisa_kwargs(case, **kw))
    return (out, st) if with_stats else out


def sol_peer(device: torch.device):
    """``(comfy_kitchen.sol_attn, description)``, or ``(None, why not)``.  On CUDA only the compiled
    kernel counts (the eager fallback would be a different method: full precision, O(N^2) memory);
    on the CPU the eager reference is the only one there is."""
    try:
        import comfy_kitchen
    except Exception as exc:  # noqa: BLE001 - any import failure means no peer
        return None, f"comfy_kitchen is not importable ({type(exc).__name__}: {exc})"
    if not hasattr(comfy_kitchen, "sol_attn"):
        return None, "this comfy_kitchen has no sol_attn"
    if device.type == "cuda":
        if not comfy_kitchen.sol_attn_is_available(device):
            return None, "comfy_kitchen has no compiled sol_attn for this GPU"
        return comfy_kitchen.sol_attn, "comfy_kitchen.sol_attn (CUDA kernel, INT8)"
    return comfy_kitchen.sol_attn, "comfy_kitchen.sol_attn (eager reference, full precision, CPU)"


def _sink_block_range(case: Case, perm: torch.Tensor | None, block: int = 64) -> list[int] | None:
    """The exact tokens as one ``[start, end)`` range of 64-token blocks of the processing order
    (Sol-Attn's ``sink_blocks``); the hull when they are split."""
    mask = case.token_mask()
    if mask is None:
        return None
    if perm is not None:
        mask = mask[perm.cpu()]
    blocks = forced_blocks_from_tokens(mask, block).nonzero().flatten()
    return [int(blocks.min()), int(blocks.max()) + 1]


#: Key blocks around its own that every Sol-Attn query block computes exactly besides its top-k.
SOL_DIAGONAL_BLOCKS = 3


def sol_call(sol, case: Case, *, token_order: str, sparsity: float | None, matched: bool = False,
             tau: float | None = None):
    """``(call, perm)``: Sol-Attn as a call without arguments on the case's tokens already in
    ``token_order`` (``perm``; None: input order), top-k at density ``1 - sparsity`` (``matched``:
    minus its forced diagonal blocks), or with ``sparsity`` None its threshold ``tau`` (None: its
    default)."""
    perm = case.perm(token_order)
    q, k, v = case.q, case.k, case.v
    if perm is not None:
        q, k, v = (t.index_select(1, perm) for t in (q, k, v))
    q, k, v = (t.to(torch.bfloat16).contiguous() if t.dtype not in (torch.bfloat16, torch.float16) else t.contiguous()
               for t in (q, k, v))
    kwargs = {}
    sinks = _sink_block_range(case, perm)
    if sinks is not None:
        kwargs.update(sink_blocks=sinks, sink_q=sinks)
    if case.kv_valid is not None:
        valid = case.kv_valid if perm is None else case.kv_valid[:, perm.to(case.kv_valid.device)]
        kwargs["key_bias"] = valid.to(q.device)
    if sparsity is not None:
        nb = -(-q.shape[1] // 64)
        kwargs["topk_ratio"] = max(1.0 / nb, 1.0 - sparsity - (SOL_DIAGONAL_BLOCKS / nb if matched else 0.0))
    elif tau is not None:
        kwargs["tau"] = tau
    return (lambda: sol(q, k, v, **kwargs)), perm


def run_sol(sol, case: Case, **kw) -> torch.Tensor:
    """Sol-Attn's output (:func:`sol_call`'s arguments) in the case's input order."""
    call, perm = sol_call(sol, case, **kw)
    out = call()
    if perm is not None:
        out = torch.empty_like(out).index_copy_(1, perm, out)
    return out


# ---- evaluation ----------------------------------------------------------------------------------

@dataclass
class Config:
    sparsities: tuple = SPARSITIES
    orders: tuple = ORDERS
    token_orders: tuple = TOKEN_ORDERS
    routings: tuple = ("auto",)
    tails: tuple = TAILS
    backend: str = "auto"
    sol: bool = True


def evaluate_case(case: Case, cfg: Config, sol=None, log=print) -> list[dict]:
    rows: list[dict] = []
    t0 = time.time()
    ref = dense_reference(case)

    ref2 = ref.double().pow(2).sum(dim=(0, 1, 3))  # [H]

    def add(method, token_order, routing, sparsity, out, st=None):
        rel, cos = metrics(out, ref)
        row = {"case": case.name, "method": method, "token_order": token_order, "routing": routing,
               "sparsity": sparsity, "rel_l2": rel, "cos": cos,
               "head_err2": [float(x) for x in (out.float() - ref).double().pow(2).sum(dim=(0, 1, 3))],
               "head_ref2": [float(x) for x in ref2]}
        if st is not None:
            row["density"] = st.density
            spread = st.density_spread()
            if spread is not None:
                row["density_std"], row["density_min"], row["density_max"] = spread[1:]
        rows.append(row)

    for token_order in cfg.token_orders:
        if not case.has_order(token_order):
            continue
        for routing in dict.fromkeys(resolve_routing(r, case) for r in cfg.routings):
            tails = tuple(dict.fromkeys(resolve_tail(t) for t in cfg.tails))
            for sp in cfg.sparsities:
                for order in cfg.orders:
                    for tail in tails if order != "drop" else tails[:1]:
                        add(method_name(order, tail), token_order, routing, sp,
                            *run_pisa(case, order=order, sparsity=sp, token_order=token_order, routing=routing,
                                      backend=cfg.backend, tail=tail, with_stats=True))
        if sol is not None and case.q.shape[-1] == 128:
            try:
                for sp in cfg.sparsities:
                    for matched in (False, True):
                        add("sol-topk-matched" if matched else "sol-topk", token_order, "-", sp,
                            run_sol(sol, case, token_order=token_order, sparsity=sp, matched=matched))
                add("sol-tau", token_order, "-", float("nan"), run_sol(sol, case, token_order=token_order, sparsity=None))
            except RuntimeError as exc:  # the eager reference refuses large inputs (O(N^2) memory)
                log(f"[eval] {case.name}: Sol-Attn skipped ({str(exc).splitlines()[0][:160]})")
    log(f"[eval] {case.name}: {len(rows)} results in {time.time() - t0:.1f}s")
    return rows


def concentration(case: Case) -> dict:
    """Top-12.5 % block mass per head under dense attention, raster and tiled block orders."""
    out = {}
    for token_order in ("raster", "tiled"):
        if not case.has_order(token_order):
            continue
        mass = workloads.top_block_mass(case.q, case.k, token_perm=case.perm(token_order))
        out[token_order] = [round(float(x), 4) for x in mass]
    out["heads"] = case.heads
    return out


# ---- bars ----------------------------------------------------------------------------------------

def _lookup(rows, case, method, token_order, routing, sparsity=BAR_SPARSITY):
    for r in rows:
        if (r["case"], r["method"], r["token_order"], r["routing"]) == (case, method, token_order, routing) \
                and (r["sparsity"] == sparsity or (math.isnan(sparsity) and math.isnan(r["sparsity"]))):
            return r["rel_l2"]
    return None


def _default_routing(cases: list[Case], name: str) -> str:
    return next(resolve_routing("auto", c) for c in cases if c.name == name)


def bars(rows: list[dict], cases: list[Case]) -> list[dict]:
    """The issue's bars at sparsity 0.875, for every case, token order and PISA routing evaluated."""
    checks = []

    def check(name, case, token_order, routing, value, limit):
        if value is not None and limit is not None:
            checks.append(dict(bar=name, case=case, token_order=token_order, routing=routing, value=value,
                               limit=limit, ok=bool(value <= limit)))

    o1_names = {method_name(1, t): t for t in ("plain", "lognormal")}
    combos = {(r["case"], r["token_order"], r["routing"], r["method"]) for r in rows if r["method"] in o1_names}
    for case_name, token_order, routing, o1_name in sorted(combos):
        o1 = _lookup(rows, case_name, o1_name, token_order, routing)
        drop = _lookup(rows, case_name, "pisa-drop", token_order, routing)
        o0 = _lookup(rows, case_name, method_name(0, o1_names[o1_name]), token_order, routing)
        check(f"{o1_name} <= {DROP_RATIO} x drop", case_name, token_order, routing, o1,
              None if drop is None else DROP_RATIO * drop)
        check(f"{o1_name} <= {method_name(0, o1_names[o1_name])}", case_name, token_order, routing, o1, o0)
    video = {c.name for c in cases if c.video}
    for case_name, token_order, routing, o1_name in sorted(combos):
        if case_name in video and token_order == "tiled":
            check(f"tiled <= raster ({o1_name})", case_name, "tiled", routing,
                  _lookup(rows, case_name, o1_name, "tiled", routing),
                  _lookup(rows, case_name, o1_name, "raster", routing))
    for token_order in TOKEN_ORDERS:
        node_o1 = method_name(1, resolve_tail("auto"))
        for peer in ("sol-topk-matched", "sol-topk"):
            ratios = []
            for case_name in sorted({r["case"] for r in rows}):
                sol = _lookup(rows, case_name, peer, token_order, "-")
                pisa = _lookup(rows, case_name, node_o1, token_order, _default_routing(cases, case_name))
                if sol and pisa is not None:
                    ratios.append(pisa / sol)
            if ratios:
                check(f"{node_o1} <= {SOL_RATIO} x {peer} (mean ratio over cases)", "all", token_order, "auto",
                      sum(ratios) / len(ratios), SOL_RATIO)
    return checks


# ---- concentration levels ------------------------------------------------------------------------

#: Heads by their top-12.5 % block mass in the token order evaluated: (name, lower, upper bound).
#: The issue's flat / mid / concentrated sets had 0.25 / 0.65 / 0.90.
LEVELS = (("flat", 0.0, 0.45), ("mid", 0.45, 0.8), ("concentrated", 0.8, 1.01))


def levels(rows: list[dict], conc: dict, sparsity: float = BAR_SPARSITY) -> list[dict]:
    """Errors pooled over the heads of each concentration level (all cases together): relative L2
    ``sqrt(sum err^2 / sum ref^2)`` over those heads, per (token order, routing, method)."""
    out = {}
    for r in rows:
        if r["sparsity"] != sparsity or "head_err2" not in r or r["token_order"] not in conc.get(r["case"], {}):
            continue
        mass = conc[r["case"]][r["token_order"]]
        for name, lo, hi in LEVELS:
            heads = [i for i, m in enumerate(mass) if lo <= m < hi]
            if not heads:
                continue
            key = (name, r["token_order"], r["routing"], r["method"])
            acc = out.setdefault(key, {"err2": 0.0, "ref2": 0.0, "heads": 0, "mass": 0.0})
            acc["err2"] += sum(r["head_err2"][i] for i in heads)
            acc["ref2"] += sum(r["head_ref2"][i] for i in heads)
            acc["heads"] += len(heads)
            acc["mass"] += sum(mass[i] for i in heads)
    return [{"level": k[0], "token_order": k[1], "routing": k[2], "method": k[3], "heads": v["heads"],
             "mass": v["mass"] / v["heads"], "rel_l2": math.sqrt(v["err2"] / max(v["ref2"], 1e-300))}
            for k, v in out.items()]


def level_bars(lv: list[dict]) -> list[dict]:
    """The issue's graded bar per level: order 1 <= 0.5 x drop where the level's mean top-12.5 %
    mass is below 0.9, <= 0.7 x drop above; order 1 <= order 0."""
    checks = []
    get = {(x["level"], x["token_order"], x["routing"], x["method"]): x for x in lv}
    for (level, token_order, routing, method), x in sorted(get.items()):
        if not method.startswith("pisa-o1"):
            continue
        drop = get.get((level, token_order, routing, "pisa-drop"))
        o0 = get.get((level, token_order, routing, method.replace("o1", "o0")))
        ratio = 0.5 if x["mass"] < 0.9 else 0.7
        for name, peer, limit in ((f"{method} <= {ratio} x drop (level)", drop, ratio),
                                  (f"{method} <= {method.replace('o1', 'o0')} (level)", o0, 1.0)):
            if peer is not None:
                checks.append({"bar": name, "case": f"level {level}", "token_order": token_order, "routing": routing,
                               "value": x["rel_l2"], "limit": limit * peer["rel_l2"],
                               "ok": bool(x["rel_l2"] <= limit * peer["rel_l2"])})
    return checks


def level_markdown(lv: list[dict]) -> list[str]:
    if not lv:
        return []
    methods = list(dict.fromkeys(x["method"] for x in lv))
    lines = [f"## By concentration level (sparsity {BAR_SPARSITY}, heads of every case pooled)", "",
             "Heads binned by their top-12.5 % block mass in the token order: "
             + ", ".join(f"{n} [{lo:g}, {min(hi, 1):g})" for n, lo, hi in LEVELS) + ".", "",
             "| level (heads, mean mass) | token order | routing | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    get = {(x["level"], x["token_order"], x["routing"], x["method"]): x for x in lv}
    rank = {name: i for i, (name, _, _) in enumerate(LEVELS)}
    keys = list(dict.fromkeys((x["level"], x["token_order"], x["routing"]) for x in lv))
    for key in sorted(keys, key=lambda kk: (rank[kk[0]], keys.index(kk))):
        first = next(x for x in lv if (x["level"], x["token_order"], x["routing"]) == key)
        cells = [f"{get[key + (m,)]['rel_l2']:.4f}" if key + (m,) in get else "" for m in methods]
        lines.append(f"| {key[0]} ({first['heads']}, {first['mass']:.2f}) | {key[1]} | {key[2]} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def density_markdown(rows: list[dict]) -> list[str]:
    """Achieved density per (case, routing, sparsity): the mean over the call's tiles and, for
    adaptive routing, the spread over tiles."""
    seen = {}
    for r in rows:
        if "density" in r:
            seen.setdefault((r["case"], r["token_order"], r["routing"], r["sparsity"]), r)
    if not seen:
        return []
    lines = ["## Achieved density (exact blocks / blocks, forced included)", "",
             "| case | token order | routing | sparsity | target 1 - sparsity | mean | std over tiles | min | max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (case, token_order, routing, sp), r in seen.items():
        extra = (f"{r['density_std']:.4f} | {r['density_min']:.4f} | {r['density_max']:.4f}"
                 if "density_std" in r else "- | - | -")
        lines.append(f"| {case} | {token_order} | {routing} | {sp:g} | {1 - sp:.4f} | {r['density']:.4f} | {extra} |")
    return lines + [""]


# ---- reports -------------------------------------------------------------------------------------

def _fmt_sp(sp) -> str:
    return "tau" if isinstance(sp, float) and math.isnan(sp) else f"{sp:g}"


def markdown(rows: list[dict], conc: dict, checks: list[dict], env: dict, cases: list[Case]) -> str:
    lines = [f"# Attention fidelity ({env['date']}, {env['device']})", "",
             (f"torch {env['torch']}, PISA backend `{env['backend']}`, seed {env['seed']}; "
              f"Sol-Attn: {env['sol']}."), "",
             "## Attention concentration", "",
             ("Share of dense attention mass in each query row's top 12.5 % of 64-key blocks "
              "(mean over rows; per head: min / mean / max)."), "",
             "| case | tokens x heads | raster | tiled |", "|---|---|---|---|"]

    def span(xs):
        return "-" if not xs else f"{min(xs):.2f} / {sum(xs) / len(xs):.2f} / {max(xs):.2f}"

    for c in cases:
        cc = conc.get(c.name, {})
        lines.append(f"| {c.name} ({c.describe}) | {c.q.shape[1]} x {c.q.shape[2]} | {span(cc.get('raster'))} | "
                     f"{span(cc.get('tiled'))} |")
    sps = sorted({r["sparsity"] for r in rows if not math.isnan(r["sparsity"])})
    lines += ["", "## Relative L2 error vs dense (mean row cosine similarity)", ""]
    for c in cases:
        sub = [r for r in rows if r["case"] == c.name]
        if not sub:
            continue
        lines += [f"### {c.name}", "", "| token order | routing | method | " + " | ".join(_fmt_sp(s) for s in sps)
                  + " | default tau |", "|---|---|---|" + "---|" * (len(sps) + 1)]
        keys = list(dict.fromkeys((r["token_order"], r["routing"], r["method"]) for r in sub))
        for key in keys:
            cells = []
            for sp in sps + [float("nan")]:
                hit = [r for r in sub if (r["token_order"], r["routing"], r["method"]) == key
                       and (r["sparsity"] == sp or (math.isnan(sp) and math.isnan(r["sparsity"])))]
                cells.append(f"{hit[0]['rel_l2']:.4f} ({hit[0]['cos']:.4f})" if hit else "")
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += level_markdown(levels(rows, conc)) + density_markdown(rows)
    if checks:
        lines += [f"## Bars (sparsity {BAR_SPARSITY})", "", "| bar | case | token order | routing | value | limit | holds |",
                  "|---|---|---|---|---|---|---|"]
        for ch in checks:
            lines.append(f"| {ch['bar']} | {ch['case']} | {ch['token_order']} | {ch['routing']} | {ch['value']:.4f} | "
                         f"{ch['limit']:.4f} | {'yes' if ch['ok'] else '**no**'} |")
    return "\n".join(lines) + "\n"


_COLORS = {"pisa-o1": "tab:blue", "pisa-o0": "tab:orange", "pisa-drop": "tab:red", "sol-topk": "tab:olive",
           "sol-topk-matched": "tab:green", "pisa-o1+ln": "tab:purple", "pisa-o0+ln": "tab:pink"}


def plot(rows: list[dict], cases: list[Case], path: str) -> None:
    """Error vs sparsity per case: colour = method, line style = token order, marker = routing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name for c in cases if any(r["case"] == c.name for r in rows)]
    cols = min(3, max(1, len(names)))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows + 1.6), squeeze=False)
    handles = {}
    for ax, name in zip(axes.flat, names):
        sub = [r for r in rows if r["case"] == name and not math.isnan(r["sparsity"])]
        for key in dict.fromkeys((r["method"], r["token_order"], r["routing"]) for r in sub if r["method"] in _COLORS):
            pts = sorted((r["sparsity"], r["rel_l2"]) for r in sub if (r["method"], r["token_order"], r["routing"]) == key)
            method, token_order, routing = key
            label = f"{method} {token_order}{'' if routing == '-' else ' ' + routing}"
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], color=_COLORS[method],
                              linestyle={"tiled": "-", "raster": "--"}.get(token_order, ":"),
                              marker={"cov": "x", "-": "s"}.get(routing, "^" if routing.startswith("adaptive") else "o"), markersize=4, label=label)
            handles.setdefault(label, line)
        ax.set_title(name)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("relative L2 error vs dense")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(6, len(handles)), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.022 * -(-len(handles) // 6), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(device: torch.device, backend: str, seed: int, sol_note: str) -> dict:
    """:func:`pisa_lab.measure.environment` with the run's device under ``device`` and its settings."""
    env = measure.environment(device)
    return dict(env, device=env["gpu"], backend=backend, seed=seed, sol=sol_note)


# ---- CLI -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="*", default=None,
                    help="sizes (tiny/small/full) or set[:size] names; default small (none with --capture)")
    ap.add_argument("--capture", nargs="*", default=[], help="capture files or folders")
    ap.add_argument("--sparsities", nargs="*", type=float, default=list(SPARSITIES))
    ap.add_argument("--orders", nargs="*", default=["1", "0", "drop"], choices=["1", "0", "drop"])
    ap.add_argument("--token-orders", nargs="*", default=list(TOKEN_ORDERS),
                    help="raster, tiled (the node's order) and/or tile:FxHxW (another tile shape)")
    ap.add_argument("--routings", nargs="*", default=None, choices=list(ROUTINGS),
                    help="default: auto on CPU (fast), topk and cov on CUDA; adaptive: the widget's density "
                         "shared over the call's tiles by need")
    ap.add_argument("--tails", nargs="*", default=list(TAILS), choices=["auto", "plain", "lognormal"],
                    help="PISA tails (auto: the node's, log-normal)")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sol", action="store_true", help="skip Sol-Attn even where it runs")
    ap.add_argument("--out", default="fidelity-results", help="folder for fidelity.md and fidelity.png")
    ap.add_argument("--json", help="write every number and the environment to this file")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the dense truth is true float32
    cfg = Config(sparsities=tuple(args.sparsities), orders=tuple(1 if o == "1" else 0 if o == "0" else o for o in args.orders),
                 token_orders=tuple(args.token_orders),
                 routings=tuple(args.routings or (("topk", "cov") if device.type == "cuda" else ("auto",))),
                 tails=tuple(args.tails), backend=args.backend, sol=not args.no_sol)
    sol, sol_note = sol_peer(device) if cfg.sol else (None, "disabled (--no-sol)")
    sol_note = sol_note if sol is not None else f"not run ({sol_note})"
    print(f"[eval] device {device}; Sol-Attn: {sol_note}", file=sys.stderr)

    sets = args.sets if args.sets is not None else ([] if args.capture else ["small"])
    cases = cases_from_sets(sets, args.seed, device) + cases_from_captures(args.capture, device)
    if not cases:
        ap.error("nothing to evaluate: give --sets and/or --capture")
    rows, conc = [], {}
    for case in cases:
        conc[case.name] = concentration(case)
        mean = {k: sum(v) / len(v) for k, v in conc[case.name].items() if k != "heads" and v}
        print(f"[eval] {case.name}: {case.describe}; top-12.5% block mass "
              + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()), file=sys.stderr)
        rows += evaluate_case(case, cfg, sol, log=lambda s: print(s, file=sys.stderr))
    checks = bars(rows, cases) + level_bars(levels(rows, conc))
    env = environment(device, cfg.backend, args.seed, sol_note)
    os.makedirs(args.out, exist_ok=True)
    report = markdown(rows, conc, checks, env, cases)
    with open(os.path.join(args.out, "fidelity.md"), "w") as f:
        f.write(report)
    try:
        plot(rows, cases, os.path.join(args.out, "fidelity.png"))
    except ImportError as exc:
        print(f"[eval] no plot: {exc}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, concentration=conc, rows=rows, bars=checks), f, indent=1)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
