"""The node's real attention calls, timed next to the bare kernel call (issue 13).

    python -m pisa_lab.bench --node-calls                     # Wan 720p and HunyuanVideo 720p
    python -m pisa_lab.bench_node_calls --families hunyuan720 --json out.json

A benchmark that calls ``pisa_attention(q, k, v, layout="BNHD")`` on fresh contiguous tensors times
a call the node never makes.  Each case here is built the way ComfyUI's model code hands attention
to the node's override (the batch: Wan runs the conditional and unconditional halves together, so
B = 2; the q/k/v views and their strides; HunyuanVideo's additive text-padding mask), and its
keyword arguments come from the node's own decision for that call (``pisa_comfy.dispatch``: the
token order of the latent grid, the text as sinks and dense rows, the mask read as key padding).
The node's configuration is timed next to the bare call, each extra alone on top of the bare call,
and dense SDPA on the same inputs; the token order's copies of the previous implementation are
timed against the bytes they move, next to the pre-scan that now applies the order.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace

import torch

from pisa_kernels.api import pisa_attention

from .measure import environment, make_inputs, peak_extra_mb, time_ms

#: The keyword arguments the node adds to a bare call, in the order of the table.
EXTRAS = ("token_perm", "kv_valid", "sink_kv", "dense_q")
#: (case, extras on top of the bare call); "node" is everything the node passes.
CASES = (("bare", ()), ("+ token order", ("token_perm",)), ("+ kv_valid", ("kv_valid",)),
         ("+ text sinks, dense rows", ("sink_kv", "dense_q")), ("node", EXTRAS))


@dataclass(frozen=True)
class Family:
    """One model family's main self-attention call at one resolution."""

    model: str  # "wan" or "hunyuan_video": which ComfyUI attention call is imitated
    batch: int
    heads: int
    grid: tuple[int, int, int]  # latent grid after patching (frames, height, width)
    text: int = 0  # joint-attention text tokens, before the grid (HunyuanVideo in ComfyUI >= Feb 2026)
    padded: int = 0  # of which this many, at the end of the text, are padding
    head_dim: int = 128

    @property
    def tokens(self) -> int:
        return self.text + math.prod(self.grid)


FAMILIES = {
    # Wan2.1-14B T2V, 1280 x 720 x 81 frames, conditional and unconditional batched (CFG)
    "wan720": Family("wan", batch=2, heads=40, grid=(21, 45, 80)),
    # HunyuanVideo T2V, 1280 x 720 x 129 frames: 118,800 image + 256 text tokens, half of them padding
    "hunyuan720": Family("hunyuan_video", batch=1, heads=24, grid=(33, 45, 80), text=256, padded=128),
}


def small(fam: Family) -> Family:
    """The same call at a size the PyTorch reference handles (fidelity checks)."""
    return replace(fam, heads=2, grid=(3, 8, 20), text=min(fam.text, 40), padded=min(fam.padded, 16),
                   head_dim=64)


@dataclass
class NodeCall:
    q: torch.Tensor  # as the node hands them to pisa_attention (views of ComfyUI's tensors)
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict  # pisa_attention's keyword arguments, as the node builds them
    mask: torch.Tensor | None  # the additive mask ComfyUI passes (for the dense path)


def comfy_attention_call(fam: Family, q, k, v, transformer_options: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of ComfyUI's ``optimized_attention`` call for ``[B, N, H, D]`` inputs.

    * Wan (``comfy/ldm/wan/model.py``): ``q.view(b, s, n * d)`` of contiguous ``[B, N, H, D]``
      tensors (after RoPE), ``heads`` as a keyword; the node views them as BNHD.
    * HunyuanVideo (``comfy/ldm/flux/layers.py``, double blocks): ``[B, H, N, D]`` tensors with the
      text first (``torch.cat((txt_q, img_q), dim=2)``, then RoPE: contiguous), ``skip_reshape``,
      and the ``(1, 1, N)`` additive mask: 0 for valid keys, ``-finfo.max`` for padded text.
    """
    if fam.model == "wan":
        b, n, h, d = q.shape
        return tuple(t.reshape(b, n, h * d) for t in (q, k, v)), dict(heads=h, transformer_options=transformer_options)
    mask = torch.zeros(1, 1, fam.tokens, dtype=q.dtype, device=q.device)
    mask[..., fam.text - fam.padded:fam.text] = -torch.finfo(q.dtype).max
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return (qh, kh, vh, fam.heads), dict(skip_reshape=True, mask=mask, transformer_options=transformer_options)


def node_call(fam: Family, q, k, v, *, backend: str = "auto", sparsity: float = 0.875) -> NodeCall:
    """The call as the node makes it: ComfyUI's attention call for ``[B, N, H, D]`` inputs, run
    through the node's decision (a PISA Patch with ``sparsity``, no dense steps or blocks), with
    ``backend`` (the node's on a GPU is ``"auto"``: the Triton backend with the library's choice of
    forward kernel; ``"triton"`` / ``"gluon"`` force one)."""
    try:
        from pisa_comfy import dispatch
        from pisa_comfy.attention_call import AttentionCall
        from pisa_comfy.forward_context import ForwardContext
        from pisa_comfy.settings import PisaSettings
        from pisa_comfy.patch_state import PisaState
        from pisa_comfy.token_layout import END, TokenLayout
    except ImportError as exc:
        raise RuntimeError(f"the node's call needs pisa_comfy next to pisa_lab (run from the repository "
                           f"root): {exc}") from None
    state = PisaState(PisaSettings(sparsity=sparsity, dense_steps=0, dense_blocks=frozenset(), min_tokens=0,
                                   backend="reference"))  # (decides on any device; ``backend`` set below)
    layout = TokenLayout(fam.model, (fam.grid,), END if fam.model == "wan" else None)
    ctx = ForwardContext(layout, step=None, double_blocks=0, whole_forward=False)
    args, kwargs = comfy_attention_call(fam, q, k, v, {state.forward_key: ctx})
    call = AttentionCall.parse(args, kwargs)
    plan = dispatch.decide(state, call)
    if isinstance(plan, str):
        raise RuntimeError(f"the node runs this call dense ({plan})")
    qn, kn, vn = call.kernel_inputs()
    return NodeCall(qn, kn, vn, dict(plan.kwargs, backend=backend), call.mask)


def case_kwargs(node: dict, extras) -> dict:
    """The node's keyword arguments without the extras not in ``extras``."""
    return {key: val for key, val in node.items() if key not in EXTRAS or key in extras}


def dense_ms(call: NodeCall) -> float:
    """Dense SDPA on the call's inputs (with its key-padding mask): the node's dense path."""

    views = [t if call.kwargs["layout"] == "BHND" else t.transpose(1, 2) for t in (call.q, call.k, call.v)]
    valid = call.kwargs.get("kv_valid")
    mask = valid[:, None, None, :] if valid is not None else None
    return time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(*views, attn_mask=mask))


def order_copy_costs(call: NodeCall) -> dict:
    """The token order's cost, part by part (ms and GB/s against the bytes moved):

    * ``old_copies``: what the call did before issue 13 with a token order: ``index_select`` gathers
      of q, k and v and an ``index_copy_`` scatter of the output, per group of heads;
    * ``prescan`` / ``prescan_ordered``: the Triton pre-scan without and with the order (it now
      reads K and V through it and writes their processing-order copies)."""
    from pisa_kernels import api
    from pisa_kernels import triton_kernels as tk

    perm = call.kwargs["token_perm"].to(call.q.device)
    seq_dim = 2 if call.kwargs["layout"] == "BHND" else 1
    head_dim = 3 - seq_dim
    heads = call.q.shape[head_dim]
    qkv_bytes = 3 * call.q.numel() * call.q.element_size()
    groups = api.PERM_HEAD_GROUPS if qkv_bytes >= api.PERM_GROUP_MIN_BYTES else 1
    step = -(-heads // groups)
    out = torch.empty_like(call.q)

    def old_copies():
        for h0 in range(0, heads, step):
            qp, kp, vp = (t.narrow(head_dim, h0, min(step, heads - h0)).index_select(seq_dim, perm)
                          for t in (call.q, call.k, call.v))
            out.narrow(head_dim, h0, qp.shape[head_dim]).index_copy_(seq_dim, perm, qp)
            del qp, kp, vp

    views = [t if call.kwargs["layout"] == "BHND" else t.transpose(1, 2) for t in (call.q, call.k, call.v)]
    kp, vp = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in views[1:])
    kw = dict(valid=None, block=call.kwargs["block_size"], first_order=True, cov=False,
              lognormal=call.kwargs["tail"] == "lognormal")
    res = dict(old_copies=time_ms(old_copies), old_copies_bytes=8 * qkv_bytes // 3,  # 3 gathers, 1 scatter
               prescan=time_ms(lambda: tk.pool(*views, **kw)),
               prescan_ordered=time_ms(lambda: tk.pool(*views, **kw, perm=perm, kv_out=(kp, vp))),
               prescan_copy_bytes=2 * qkv_bytes // 3)  # the k and v copies it writes
    res["old_copies_gbs"] = res["old_copies_bytes"] / res["old_copies"] / 1e6
    return res


def bench_family(name: str, *, data: str = "random", seed: int = 0, sparsity: float = 0.875,
                 kernels=("auto",), log=print) -> list[dict]:
    """Rows ``{family, case, ms, ...}``: dense SDPA, the bare call, each extra the node adds alone,
    the node's configuration, with each backend of ``kernels`` (``"auto"``: the node's; the
    others' rows are labelled ``[triton]`` / ``[gluon]``); a failing case is logged and skipped."""

    fam = FAMILIES[name]
    dev = torch.device("cuda")
    call = node_call(fam, *make_inputs(data, fam.batch, fam.heads, fam.tokens, fam.head_dim, seed, dev),
                     sparsity=sparsity)
    qkv_mb = 3 * call.q.numel() * call.q.element_size() / 2**20
    rows = []
    try:
        rows.append(dict(family=name, case="dense (SDPA)", ms=dense_ms(call)))
    except Exception as exc:  # noqa: BLE001 - a benchmark row, never the run
        log(f"[node-calls] {name} dense: {type(exc).__name__}: {exc}")
    for (case, extras), kernel in ((c, k) for k in kernels for c in CASES):
        if extras and case != "node" and all(call.kwargs.get(e) is None for e in extras):
            continue  # the node adds nothing of this kind for this family
        kw = dict(case_kwargs(call.kwargs, extras), backend=kernel)
        case = case if kernel == "auto" else f"{case} [{kernel}]"
        try:
            fn = lambda: pisa_attention(call.q, call.k, call.v, **kw)
            fn()  # compiles outside the timing
            rows.append(dict(family=name, case=case, ms=time_ms(fn), extra_mb=peak_extra_mb(fn), qkv_mb=qkv_mb))
        except Exception as exc:  # noqa: BLE001
            log(f"[node-calls] {name} {case}: {type(exc).__name__}: {exc}")
        else:
            log(f"[node-calls] {name} {case}: {rows[-1]['ms']:.2f} ms")
    return rows


def format_table(rows: list[dict]) -> str:
    bare = {r["family"]: r["ms"] for r in rows if r["case"] == "bare"}
    dense = {r["family"]: r["ms"] for r in rows if r["case"] == "dense (SDPA)"}
    lines = [f"{'family':<11} {'case':<26} {'ms':>8} {'vs bare':>8} {'vs dense':>9} {'extra mem':>10}"]
    for r in rows:
        kernel = r["case"] != "dense (SDPA)"
        vb = f"{100 * (r['ms'] / bare[r['family']] - 1):+.1f}%" if kernel and r["family"] in bare else ""
        vd = f"{dense[r['family']] / r['ms']:.2f}x" if kernel and r["family"] in dense else ""
        mem = f"{100 * r['extra_mb'] / r['qkv_mb']:.1f}%" if "extra_mb" in r else ""
        lines.append(f"{r['family']:<11} {r['case']:<26} {r['ms']:>8.2f} {vb:>8} {vd:>9} {mem:>10}")
    return "\n".join(lines) + "\n(extra mem: peak GPU memory of the call beyond its output, share of q+k+v)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--data", default="random", choices=["random", "dit"])
    ap.add_argument("--sparsity", type=float, default=0.875)
    ap.add_argument("--kernels", nargs="*", default=["auto"], choices=["auto", "triton", "gluon"],
                    help="pisa_attention backends to time each case with (auto: the node's)")
    ap.add_argument("--json", help="write rows and environment to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("the node-call benchmark needs a CUDA GPU", file=sys.stderr)
        return 2

    env = environment()
    print(json.dumps(env))
    rows = []
    for name in args.families:
        rows += bench_family(name, data=args.data, sparsity=args.sparsity, kernels=args.kernels)
    print(format_table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
