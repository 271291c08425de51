"""The hypothesis strategy of the fuzz tests (CPU: test_fuzz.py; GPU: test_gpu.py): one random
``pisa_attention`` call over shapes, dtypes, layouts, strides, masks, sparsities, orders, token
orders, sinks, dense rows, routing, tails and scales.  Inputs are Gaussian (never zeros)."""

import torch
from hypothesis import note
from hypothesis import strategies as st

from pisa_kernels.tiling import tile_permutation
from pisa_test_utils import DTYPES, strided_variant


def divisors(n):
    return [a for a in range(1, n + 1) if n % a == 0]


@st.composite
def fuzz_case(draw, *, triton=False, gpu=False):
    """One call: (q, k, v, kwargs), Gaussian values rounded to the drawn dtype.

    ``triton``: tiny shapes for the interpreter (fp32/fp16).  ``gpu``: small shapes for the compiled
    kernels (bf16/fp16, head dims 64/128: every new dtype/flag combination compiles once).
    """
    if gpu:
        b, h = draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 3), (4, 2)]))
        n = draw(st.one_of(st.integers(1, 300), st.integers(300, 1500),
                           st.sampled_from([1, 63, 64, 65, 127, 128, 129, 1000, 1024])))
        d = draw(st.sampled_from([64, 128]))
        dtype = draw(st.sampled_from(["bf16", "fp16"]))
    elif triton:
        b, h = draw(st.sampled_from([(1, 1), (1, 2), (2, 1)]))
        n = draw(st.one_of(st.integers(1, 70), st.integers(100, 200), st.sampled_from([1, 64, 65, 128, 129])))
        d = draw(st.sampled_from([64, 64, 128, 32, 80]))
        dtype = draw(st.sampled_from(["fp32", "fp16"]))
    else:
        b = draw(st.integers(1, 3))
        h = draw(st.integers(1, 3))
        n = draw(st.one_of(st.integers(1, 70), st.integers(60, 300),
                           st.sampled_from([1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257, 383])))
        d = draw(st.sampled_from([64, 128, 16, 32, 80]))
        dtype = draw(st.sampled_from(["fp64", "fp64", "fp32", "fp16", "bf16"]))
    layout = draw(st.sampled_from(["BHND", "BNHD"]))
    kw = dict(layout=layout,
              block_size=draw(st.sampled_from([64, 128])),
              order=draw(st.sampled_from([1, 0, "drop", -1, "1", "0"])),
              sparsity=draw(st.one_of(st.sampled_from([0.0, 0.5, 0.75, 0.875, 0.9, 0.99]),
                                      st.floats(0.0, 0.999, allow_nan=False))),
              routing=draw(st.sampled_from(["topk", "topk", "cov"])),
              tail=draw(st.sampled_from(["plain", "lognormal"])))
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.01, 1.0))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)

    mask_kind = draw(st.sampled_from(["none", "none", "lengths", "bool", "list"]))
    if mask_kind in ("lengths", "list"):
        lengths = [draw(st.integers(0, n)) for _ in range(b)]
        kw["kv_valid"] = torch.tensor(lengths) if mask_kind == "lengths" else lengths
    elif mask_kind == "bool":
        p = draw(st.sampled_from([0.3, 0.7, 0.95]))
        kw["kv_valid"] = torch.rand(b, n, generator=g) < p

    perm_kind = draw(st.sampled_from(["none", "none", "random", "tiled"]))
    if perm_kind == "random":
        kw["token_perm"] = torch.randperm(n, generator=g)
    elif perm_kind == "tiled":
        gh = draw(st.sampled_from(divisors(n)))
        kw["token_perm"] = tile_permutation((gh, n // gh), block_size=kw["block_size"])

    def ranges():
        out = []
        for _ in range(draw(st.integers(1, 2))):
            s = draw(st.integers(0, n))
            e = draw(st.integers(s, n))
            out.append((s, e))
        return out

    if draw(st.integers(0, 3)) == 0:
        kw["sink_kv"] = ranges()
    if draw(st.integers(0, 3)) == 0:
        kw["dense_q"] = ranges()

    shape = (b, h, n, d) if layout == "BHND" else (b, n, h, d)
    q_amp = draw(st.sampled_from([0.5, 1.0, 1.0, 3.0]))
    v_shift = draw(st.sampled_from([0.0, 0.5, 2.0]))
    q = torch.randn(shape, generator=g, dtype=torch.float64) * q_amp
    k = torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.randn(shape, generator=g, dtype=torch.float64) + v_shift
    q, k, v = (t.to(DTYPES[dtype]) for t in (q, k, v))
    strided = draw(st.sampled_from(["none", "none", "none", "d2", "n2", "transposed", "offset"]))
    if strided != "none":
        q, k, v = (strided_variant(t, strided, seed=i) for i, t in enumerate((q, k, v)))
    note(f"shape={shape} dtype={dtype} strided={strided} mask={mask_kind} perm={perm_kind} seed={seed} "
         f"q_amp={q_amp} v_shift={v_shift} kw={ {a: c for a, c in kw.items() if not isinstance(c, torch.Tensor)} }")
    return q, k, v, kw
