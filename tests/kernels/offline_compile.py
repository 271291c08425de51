"""Compile the forward kernel for GPUs this machine does not have (no driver needed), and report the
first launch configuration of the fallback chain whose shared memory fits each target.  With
``--hopper``: compile the Gluon Hopper kernel (pisa_kernels.hopper_kernel) for sm90 in the
configurations the node uses, and report its shared memory against what ``hopper_kernel.ring_slots``
planned for.  With ``--aux``: compile the pre-scan's and the routing's kernels for sm80, sm90 and
sm120 as the library launches them, with their shared memory.

Run as a script in its own process (``python offline_compile.py``): the tests' process runs Triton's
interpreter, which replaces ``@triton.jit`` functions and cannot compile.  Prints one JSON list, or
``{"skip": reason}`` where this Triton has no offline compiler for NVIDIA GPUs.
"""

import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from pisa_kernels import triton_kernels as tk  # noqa: E402

#: Largest shared memory one block may opt into, per compute capability (CUDA programming guide):
#: A100, RTX 30, RTX 40, H100, B200, RTX 50.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

#: (capability, dtype, block, head dim, order, log-normal tail, kv_valid, tensor descriptors, token
#: order and dense rows): the tightest targets (sm86/89/120: 99 KB) with the largest 16-bit tiles, fp32
#: of head dim 64, sm80 with the default configuration, and the descriptor (TMA) path of sm90+ on
#: Hopper and on RTX 50, also with everything the node passes for HunyuanVideo (key padding, token
#: order, dense text rows).  fp32 of head dim 128 needs 147 KB (196 KB with kv_valid) even with the
#: shallowest pipelines: on sm86/89 (and sm80 with kv_valid) such calls raise KernelDoesNotFit, which
#: the API and the node turn into the reference / dense (docs/fallbacks.md).
CASES = [(86, "bfloat16", 64, 128, 1, True, False, False, False), (86, "float16", 128, 128, 1, True, True, False, True),
         (89, "bfloat16", 64, 128, 0, False, True, False, False), (86, "float32", 64, 64, 1, True, True, False, False),
         (80, "bfloat16", 64, 128, 1, True, True, False, True), (90, "bfloat16", 64, 128, 1, True, False, True, False),
         (90, "bfloat16", 64, 128, 1, True, True, True, True), (120, "bfloat16", 64, 128, 1, True, False, True, False)]

_TRITON_TYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _descriptor_type(dtype: str, box: list[int]) -> str:
    """Triton's signature type of a host tensor descriptor with this block (box) shape."""
    t = torch.zeros([1] * (len(box) - 2) + box[-2:], dtype=getattr(torch, dtype))
    return mangle_type(TensorDescriptor(t, list(t.shape), list(t.stride()), box))


def signature(dtype: str, lognormal: bool, tma: bool, block: int, d: int) -> dict:
    t = _TRITON_TYPE[dtype]
    lp = t  # centroids and value means come in the input dtype (fp32 stays fp32)
    ptr = {"Q": t, "KD": t, "VD": t, "K": t, "V": t, "O": t, "VALID": "i8", "IDX": "i32", "CNT": "i32", "SEL": "i8",
           "KBAR": lp, "VMEAN": lp, "BLEN": "fp32", "HSUM": "fp32", "Q2": "fp32", "KVAR": lp if lognormal else "fp32",
           "TOTAL": "fp32", "PERM": "i64", "DROWS": "i64", "DFLAG": "i8", "DIDX": "i32", "DCNT": "i32",
           "TORD": "i32"}
    sig = {}
    for name in tk._pisa_fwd_kernel.arg_names:
        if name in ptr:
            sig[name] = "*" + ptr[name]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    if tma:  # as attend() passes them: K / V as [B, H, N, D], the tail's tensors as [BH, NB, D]
        sig["KD"] = sig["VD"] = _descriptor_type(dtype, [1, 1, block, d])
        for name in ("KBAR", "VMEAN") + (("KVAR",) if lognormal else ()):
            sig[name] = _descriptor_type(dtype, [1, tk.TAIL_GROUP, d])
    return sig


def first_fit(cap, dtype, block, d, order, lognormal, valid, tma, node) -> dict:
    bd = tk._block_d(d)
    meta = dict(BLOCK_M=tk.QUERY_TILE, BLOCK_N=block, BLOCK_D=bd, GROUP=tk.TAIL_GROUP, ORDER=order,
                SPLIT=valid, LOGNORMAL=lognormal, KV_TMA=tma, TAIL_TMA=tma, HAS_PERM=node, HAS_DENSE=node,
                TILE_COUNTS=node, REORDER=node)  # (adaptive routing's per-tile counts: two loads, no shared memory)
    tried = []
    for cfg in tk._fallbacks(tk._launch_config(block, bd, torch.device("cuda"), getattr(torch, dtype))):
        consts = dict(meta, TAIL_STAGES=cfg["TAIL_STAGES"])
        sig = signature(dtype, lognormal, tma, block, d)
        names = tk._pisa_fwd_kernel.arg_names
        for name in consts:
            sig[name] = "constexpr"
        src = ASTSource(tk._pisa_fwd_kernel, sig, {(names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                  options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        shared = compiled.metadata.shared
        tried.append(dict(cfg, shared=shared))
        if shared <= SMEM_LIMIT[cap]:
            return dict(case=[cap, dtype, block, d, order, lognormal, valid, tma, node],
                        fits=dict(cfg, shared=shared), tried=tried)
    return dict(case=[cap, dtype, block, d, order, lognormal, valid, tma, node], fits=None, tried=tried)


def ptxas_missing() -> str | None:
    """Why this Triton cannot compile for NVIDIA GPUs offline (None: it can)."""
    try:
        import triton.backends.nvidia as nvidia
    except ImportError as exc:
        return f"no NVIDIA backend in this Triton ({exc})"
    path = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    return None if os.path.exists(path) else f"no ptxas at {path}"


#: (dtype, head dim, order, token order, adaptive counts, key padding and dense rows) of the Hopper
#: kernel: the node's configurations (Wan; HunyuanVideo and FLUX with their text), adaptive
#: routing, order 0 in fp16, keep-or-drop, head dim 64, key blocks of 128.
HOPPER_CASES = [("bfloat16", 128, 1, True, False, False), ("bfloat16", 128, 1, True, False, True),
                ("bfloat16", 128, 1, False, True, False), ("float16", 128, 0, True, True, True),
                ("bfloat16", 128, -1, False, False, False), ("bfloat16", 64, 1, True, False, True),
                ("bfloat16", 128, 1, True, False, True, 128)]


def hopper_compile(dtype: str, d: int, order: int, perm: bool, counts: bool, text: bool, block: int = 64) -> dict:
    from triton.experimental.gluon._runtime import GluonASTSource

    from pisa_kernels import hopper_kernel as hk

    t = torch.zeros(1, hk.SLOT, d, dtype=getattr(torch, dtype))
    box = hk._desc(t, [1, hk.SLOT, d], [hk.SLOT * d, d, 1], [1, hk.SLOT, d])
    hm = hk._desc(torch.zeros(d, d, dtype=t.dtype), [d, d], [d, 1], [hk.SLOT, d]) if order == 1 else box
    fn = hk._pisa_fwd_hopper
    ptr = dict(Q=_TRITON_TYPE[dtype], O=_TRITON_TYPE[dtype], PERM="i64", IDX="i32", CNT="i32", TB="fp16", TORD="i32",
               VALID="i8", DROWS="i64", DFLAG="i8", DIDX="i32", DCNT="i32")
    consts = dict(BLOCK_N=block, D=d, SLOTS=hk.ring_slots(d), ORDER=order, HAS_PERM=perm,
                  TILE_COUNTS=counts, REORDER=counts, HAS_VALID=text, HAS_DENSE=text)
    sig = {}
    for name in fn.arg_names:
        if name in ptr:
            sig[name] = "*" + ptr[name]
        elif name.endswith("_desc"):
            sig[name] = mangle_type(hm if name == "hm_desc" else box)
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    src = GluonASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=hk.MAX_REGS))
    return dict(case=[dtype, d, order, perm, counts, text, block], slots=consts["SLOTS"],
                shared=compiled.metadata.shared, limit=SMEM_LIMIT[90])


#: Pointer types of the pre-scan's and the routing's kernels, by argument name (bf16 inputs: the
#: node's; ``TB``-like outputs as the library allocates them).
_AUX_POINTERS = dict(
    _pool_k_kernel=dict(K="bf16", V="bf16", VALID="i8", PERM="i64", KP="bf16", VP="bf16", KBAR="fp32", VSUM="fp32",
                        KBAR_LP="bf16", VMEAN_LP="bf16", BLEN="fp32", HSUM="fp32", COVN="fp32", KVAR="bf16"),
    _pool_q_kernel=dict(Q="bf16", PERM="i64", QBAR="fp32", Q2="fp32"),
    _top_blocks_kernel=dict(S="fp32", IDX="i32", MASK="i8", KIND="i8", CNT="i32"),
    _tail_bias_kernel=dict(C="fp32", MASK="i8", BLEN="fp32", OUT="fp16"),
    _adaptive_rank_kernel=dict(S="fp32", CKEY="i32", BITS="i32", KIND="i8"),
    _radix_kernel=dict(CKEY="i32", HIST="i32"),
    _tie_span_kernel=dict(CKEY="i32", HIST="i32", AE="i32"),
    _tie_cut_kernel=dict(AE="i32", CUT="i32"),
    _adaptive_pick_kernel=dict(CKEY="i32", BITS="i32", AE="i32", CUT="i32", MASK="i8", KIND="i8", CNT="i32",
                               TCOUNT="i32"),
)


def aux_cases() -> list:
    """(kernel name, constexprs, launch options) of the pre-scan and the routing as the library
    launches them: the node's pre-scan (log-normal statistics, token order, key padding), the split
    moment of the plain tail, covariance routing; the top-k kernel at the 720p row width with block
    kinds and at the widest; the Hopper kernel's tail bias; adaptive routing's five kernels."""
    w720 = 2048
    pool = dict(BLOCK=64, BLOCK_D=128, HAS_VALID=True, HAS_PERM=True, MOMENT=True, COV=False, WRITE_LP=True,
                SECOND=True, KVAR_MAX=65504.0, EXACT_DOT=False, DSPLIT=1)
    first = dict(tk.POOL_CONFIGS[0])  # its launch options, and any constexpr the configuration sets
    pool_opts = dict(num_warps=first.pop("num_warps"), num_stages=first.pop("num_stages"))
    pool.update(first)
    return [
        ("_pool_k_kernel", pool, pool_opts),
        ("_pool_k_kernel", dict(pool, HAS_VALID=False, HAS_PERM=False, SECOND=False, DSPLIT=tk.POOL_DSPLIT), pool_opts),
        ("_pool_k_kernel", dict(pool, BLOCK_D=64, SECOND=False, COV=True, MOMENT=False), pool_opts),
        ("_pool_q_kernel", dict(BLOCK_M=tk.QUERY_TILE, BLOCK_D=128, SECOND=True, HAS_PERM=True), dict(num_warps=4)),
        ("_top_blocks_kernel", dict(BLOCK=w720, HAS_KIND=True), dict(num_warps=tk._warps(w720))),
        ("_top_blocks_kernel", dict(BLOCK=tk.TOP_BLOCKS_WIDTHS[-1], HAS_KIND=False),
         dict(num_warps=tk._warps(tk.TOP_BLOCKS_WIDTHS[-1]))),
        ("_tail_bias_kernel", dict(BLOCK=tk.TAIL_BIAS_BLOCK, LOGNORMAL=True), dict(num_warps=4)),
        ("_adaptive_rank_kernel", dict(BLOCK=w720, HAS_KIND=True), dict(num_warps=tk._warps(w720))),
        ("_radix_kernel", dict(LEVEL=1, BLOCK=tk.RADIX_BLOCK), dict(num_warps=4)),
        ("_tie_span_kernel", dict(BLOCK=512), dict(num_warps=tk._warps(512))),
        ("_tie_cut_kernel", dict(BLOCK=tk.CUT_BLOCK), dict(num_warps=4)),
        ("_adaptive_pick_kernel", dict(BLOCK=w720, HAS_KIND=True), dict(num_warps=tk._warps(w720))),
    ]


def aux_compile(cap: int, name: str, consts: dict, options: dict) -> dict:
    """Compile one pre-scan or routing kernel for ``cap``; its shared memory against the GPU's."""
    fn = getattr(tk, name)
    ptr = _AUX_POINTERS[name]
    sig = {arg: "constexpr" if arg in consts else ("*" + ptr[arg] if arg in ptr else "i32") for arg in fn.arg_names}
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    return dict(case=[cap, name, consts], shared=compiled.metadata.shared, limit=SMEM_LIMIT[cap])


#: The capabilities the pre-scan and routing kernels are compiled for: Ampere, Hopper, and RTX 50
#: (sm86 / sm89 compile as sm80 does; their shared memory is sm120's, far above these kernels').
AUX_CAPS = (80, 90, 120)


if __name__ == "__main__":
    missing = ptxas_missing()
    if missing:
        print(json.dumps({"skip": missing}))
    elif "--hopper" in sys.argv:
        print(json.dumps([hopper_compile(*case) for case in HOPPER_CASES]))
    elif "--aux" in sys.argv:
        print(json.dumps([aux_compile(cap, *case) for cap in AUX_CAPS for case in aux_cases()]))
    else:
        print(json.dumps([first_fit(*case) for case in CASES]))
