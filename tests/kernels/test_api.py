"""API robustness (issue 7): every bad argument gets a ``ValueError`` that names it, every unusual
but valid input gets a correct result, and non-finite inputs propagate like dense attention
instead of crashing or turning silently into finite numbers.

The validation runs before any kernel, so these tests use the reference backend (and the Triton
backend, under the interpreter on CPU, for the numeric ones)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pisa_kernels import PisaStats, pisa_attention
from pisa_test_utils import max_err, rand_qkv

N = 150


@pytest.fixture(scope="module")
def qkv():
    return rand_qkv(2, 2, N, 64, dtype=torch.float32, seed=0)


def bad(**kw):
    return kw


BAD_ARGS = [
    # (expected text in the message, keyword arguments)
    ("sparsity", bad(sparsity=1.0)),
    ("sparsity", bad(sparsity=1.5)),
    ("sparsity", bad(sparsity=-0.1)),
    ("sparsity", bad(sparsity=float("nan"))),
    ("sparsity", bad(sparsity=float("inf"))),
    ("sparsity", bad(sparsity=True)),
    ("sparsity", bad(sparsity="0.5")),
    ("sparsity", bad(sparsity=None)),
    ("block_size", bad(block_size=32)),
    ("block_size", bad(block_size=256)),
    ("block_size", bad(block_size=0)),
    ("block_size", bad(block_size="64")),
    ("block_size", bad(block_size=None)),
    ("order", bad(order=2)),
    ("order", bad(order="2")),
    ("order", bad(order="first")),
    ("order", bad(order=None)),
    ("layout", bad(layout="BNDH")),
    ("layout", bad(layout="bhnd")),
    ("layout", bad(layout=None)),
    ("routing", bad(routing="covariance")),
    ("routing", bad(routing=None)),
    ("tail", bad(tail="ln")),
    ("tail", bad(tail=None)),
    ("backend", bad(backend="cuda")),
    ("backend", bad(backend="")),
    ("scale", bad(scale=float("nan"))),
    ("scale", bad(scale=float("inf"))),
    ("scale", bad(scale="0.1")),
    ("sink_kv", bad(sink_kv=[(5, 2)])),
    ("sink_kv", bad(sink_kv=[(0, N + 1)])),
    ("sink_kv", bad(sink_kv=[(-1, 3)])),
    ("sink_kv", bad(sink_kv=[(1, 2, 3)])),
    ("sink_kv", bad(sink_kv=torch.zeros(N, dtype=torch.int64))),
    ("sink_kv", bad(sink_kv=torch.zeros(N + 1, dtype=torch.bool))),
    ("dense_q", bad(dense_q=[(10, 5)])),
    ("dense_q", bad(dense_q=[(0, N + 5)])),
    ("dense_q", bad(dense_q=[(0,)])),
    ("dense_q", bad(dense_q=torch.ones(2, N, dtype=torch.bool))),
    ("kv_valid", bad(kv_valid=torch.ones(2, N + 1, dtype=torch.bool))),
    ("kv_valid", bad(kv_valid=torch.ones(N, dtype=torch.bool))),
    ("kv_valid", bad(kv_valid=torch.ones(2, 1, N, dtype=torch.bool))),
    ("kv_valid", bad(kv_valid=torch.tensor([N, N + 1]))),
    ("kv_valid", bad(kv_valid=torch.tensor([N, -1]))),
    ("kv_valid", bad(kv_valid=torch.tensor([N, N, N]))),
    ("kv_valid", bad(kv_valid=torch.tensor([1.0, 2.0]))),
    ("kv_valid", bad(kv_valid=torch.ones(2, N, dtype=torch.float32))),
    ("token_perm", bad(token_perm=torch.arange(N - 1))),
    ("token_perm", bad(token_perm=torch.zeros(N, dtype=torch.int64))),
    ("token_perm", bad(token_perm=torch.arange(N) - 1)),
    ("token_perm", bad(token_perm=torch.arange(N) + 1)),
    ("token_perm", bad(token_perm=torch.arange(N, dtype=torch.float32))),
    ("token_perm", bad(token_perm=torch.arange(N).view(1, N))),
    ("token_perm", bad(token_perm=list(range(N)))),
    ("token_perm", bad(token_perm=torch.ones(N, dtype=torch.bool))),
]


@pytest.mark.parametrize("needle,kw", BAD_ARGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARGS)])
def test_bad_argument_raises_value_error_naming_it(qkv, needle, kw):
    q, k, v = qkv
    with pytest.raises(ValueError, match=needle):
        pisa_attention(q, k, v, **{"backend": "reference", **kw})


def _float8():
    return getattr(torch, "float8_e4m3fn", None)


@pytest.mark.parametrize("case", ["q3d", "k5d", "shape", "dtype_mix", "int", "bool", "fp8", "complex", "empty",
                                  "not_tensor", "heads_mismatch"])
def test_bad_qkv_raise_value_error(case):
    q, k, v = rand_qkv(1, 2, 64, 32, seed=1)
    needle = "q, k, v"
    if case == "q3d":
        q, needle = q[0], "q must have 4 dimensions"
    elif case == "k5d":
        k, needle = k[None], "k must have 4 dimensions"
    elif case == "shape":
        v = v[:, :, :50]
    elif case == "heads_mismatch":
        k = k[:, :1]
    elif case == "dtype_mix":
        k = k.double()
    elif case == "int":
        q, k, v, needle = q.int(), k.int(), v.int(), "dtype"
    elif case == "bool":
        q, k, v, needle = q > 0, k > 0, v > 0, "dtype"
    elif case == "fp8":
        f8 = _float8()
        if f8 is None:
            pytest.skip("this torch has no float8")
        q, k, v, needle = q.to(f8), k.to(f8), v.to(f8), "dtype"
    elif case == "complex":
        q, k, v, needle = q.to(torch.complex64), k.to(torch.complex64), v.to(torch.complex64), "dtype"
    elif case == "empty":
        q, k, v, needle = q[:, :, :0], k[:, :, :0], v[:, :, :0], "empty"
    elif case == "not_tensor":
        q, needle = q.tolist(), "q must be a torch.Tensor"
    with pytest.raises(ValueError, match=needle):
        pisa_attention(q, k, v, backend="reference")


@pytest.mark.parametrize("pair", [(0, 64), [0, 64]])
@pytest.mark.parametrize("name", ["sink_kv", "dense_q"])
def test_single_range_not_wrapped_in_a_list(qkv, name, pair):
    """A single ``(start, end)`` pair instead of a list of pairs is an easy mistake: it must give a
    ValueError naming the argument (or be accepted as one range), never a TypeError."""
    q, k, v = qkv
    try:
        out = pisa_attention(q, k, v, backend="reference", **{name: pair})
    except ValueError as e:
        assert name in str(e)
        return
    expect = pisa_attention(q, k, v, backend="reference", **{name: [tuple(pair)]})
    assert torch.equal(out, expect)


@pytest.mark.parametrize("name", ["sink_kv", "dense_q"])
@pytest.mark.parametrize("value", [[3], [("a", "b")], [(None, 3)]])
def test_malformed_range_entries(qkv, name, value):
    q, k, v = qkv
    with pytest.raises(ValueError, match=name):
        pisa_attention(q, k, v, backend="reference", **{name: value})


@pytest.mark.parametrize("block_size", [64.0, 128.0])
def test_float_block_size(qkv, block_size):
    """``block_size=64.0`` (e.g. from a float widget or JSON) compares equal to 64: it must either work
    like 64 or be refused with a ValueError naming ``block_size``, not fail deep inside."""
    q, k, v = qkv
    try:
        out = pisa_attention(q, k, v, backend="reference", block_size=block_size)
    except ValueError as e:
        assert "block_size" in str(e)
        return
    assert torch.equal(out, pisa_attention(q, k, v, backend="reference", block_size=int(block_size)))


def test_triton_backend_refuses_what_it_cannot_run(triton_device):
    q, k, v = rand_qkv(1, 1, 64, 64, dtype=torch.float64, seed=2, device=triton_device)
    with pytest.raises(ValueError, match="backend"):
        pisa_attention(q, k, v, backend="triton")
    q, k, v = rand_qkv(1, 1, 64, 256, dtype=torch.float32, seed=2, device=triton_device)
    with pytest.raises(ValueError, match="backend"):
        pisa_attention(q, k, v, backend="triton")
    # ...while "auto" runs them on the reference.
    out, st = pisa_attention(q, k, v, backend="auto", return_stats=True)
    assert st.backend == "reference" and torch.isfinite(out).all()


def test_auto_backend_on_cpu_is_reference(qkv):
    q, k, v = qkv
    _, st = pisa_attention(q, k, v, return_stats=True)
    assert st.backend == "reference"


def test_return_stats(qkv):
    q, k, v = qkv  # N = 150: 3 blocks of 64
    out, st = pisa_attention(q, k, v, sparsity=0.5, order="drop", sink_kv=[(149, 150)], dense_q=[(0, 10)],
                             backend="reference", return_stats=True)
    assert isinstance(st, PisaStats)
    assert (st.blocks, st.exact_blocks, st.order, st.dense_rows) == (3, 2, -1, 10)
    assert math.isclose(st.density, 2 / 3)
    assert out.shape == q.shape


def test_inputs_are_not_modified(qkv):
    q, k, v = qkv
    copies = [t.clone() for t in (q, k, v)]
    perm = torch.randperm(N)
    perm_copy = perm.clone()
    lengths = torch.tensor([N, 100])
    pisa_attention(q, k, v, backend="reference", token_perm=perm, kv_valid=lengths, dense_q=[(0, 5)])
    for a, b in zip((q, k, v), copies):
        assert torch.equal(a, b)
    assert torch.equal(perm, perm_copy) and torch.equal(lengths, torch.tensor([N, 100]))


def test_perm_edited_in_place_is_rechecked(qkv):
    """token_perm validation may be cached per tensor; an in-place edit must be seen again."""
    q, k, v = qkv
    perm = torch.arange(N)
    pisa_attention(q, k, v, backend="reference", token_perm=perm)
    perm[0] = 1  # no longer a permutation
    with pytest.raises(ValueError, match="token_perm"):
        pisa_attention(q, k, v, backend="reference", token_perm=perm)


def test_argument_forms_are_equivalent(qkv):
    """Lengths vs the same bool mask, python lists vs tensors, order spellings."""
    q, k, v = qkv
    lengths = torch.tensor([N, 77])
    mask = torch.arange(N)[None, :] < lengths[:, None]
    a = pisa_attention(q, k, v, backend="reference", kv_valid=lengths)
    assert torch.equal(a, pisa_attention(q, k, v, backend="reference", kv_valid=mask))
    assert torch.equal(a, pisa_attention(q, k, v, backend="reference", kv_valid=[N, 77]))
    assert torch.equal(a, pisa_attention(q, k, v, backend="reference", kv_valid=lengths.int()))
    full = pisa_attention(q, k, v, backend="reference")
    assert torch.equal(full, pisa_attention(q, k, v, backend="reference", kv_valid=torch.tensor([N, N])))
    assert torch.equal(full, pisa_attention(q, k, v, backend="reference", sink_kv=[], dense_q=[]))
    for o1, o2 in ((1, "1"), (0, "0"), ("drop", -1), ("drop", "-1")):
        assert torch.equal(pisa_attention(q, k, v, backend="reference", order=o1),
                           pisa_attention(q, k, v, backend="reference", order=o2))


@pytest.mark.parametrize("b,h,n,d", [(64, 1, 16, 32), (1, 1, 1, 64), (1, 3, 2, 64), (3, 1, 1, 128)])
def test_tiny_and_wide_batches(b, h, n, d):
    """Huge batch of tiny sequences, N = 1, N = 2: all dense (one block), equal to SDPA."""
    q, k, v = rand_qkv(b, h, n, d, seed=3)
    out = pisa_attention(q, k, v, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_tiny_and_wide_batches_triton(triton_device):
    q, k, v = rand_qkv(48, 1, 16, 32, seed=4, device=triton_device)
    out = pisa_attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=3e-3, atol=3e-3)


# --- non-finite inputs ---

BACKENDS = ["reference", "triton"]


def _run(backend, q, k, v, dev, **kw):
    if backend == "triton":
        q, k, v = (t.to(dev) for t in (q, k, v))
        kw = {a: (b.to(dev) if isinstance(b, torch.Tensor) else b) for a, b in kw.items()}
    return pisa_attention(q, k, v, backend=backend, **kw).cpu()


@pytest.fixture
def bdev(request, backend):
    return request.getfixturevalue("triton_device") if backend == "triton" else None


def _nonfinite_rows(o):
    return (~torch.isfinite(o)).any(dim=-1)  # [B, H, N]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [1, 0, "drop"])
@pytest.mark.parametrize("tail", ["plain", "lognormal"])
def test_nan_query_row_propagates_like_dense(backend, order, tail, bdev):
    """A NaN in one query gives a NaN output row in dense attention; PISA must give it too (not a
    silent 0) and keep every query tile without the NaN row finite."""
    q, k, v = rand_qkv(1, 1, 300, 64, seed=5)
    q[0, 0, 200, 3] = float("nan")
    dense = F.scaled_dot_product_attention(q, k, v)
    out = _run(backend, q, k, v, bdev, sparsity=0.6, order=order, tail=tail)
    assert bool(_nonfinite_rows(dense)[0, 0, 200])
    assert bool(_nonfinite_rows(out)[0, 0, 200]), "the NaN query row must give a NaN output row, as dense"
    assert bool(torch.isfinite(out[0, 0, :128]).all()) and bool(torch.isfinite(out[0, 0, 256:]).all()), \
        "query tiles without the NaN row must stay finite"
    if order != "drop":  # the tile's other rows too: the log-normal tail's q^2 leaves the NaN row out
        assert int(_nonfinite_rows(out)[0, 0].sum()) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [1, 0])
@pytest.mark.parametrize("where", ["k_nan", "v_nan", "v_inf"])
@pytest.mark.parametrize("tail", ["plain", "lognormal"])
def test_nonfinite_key_or_value_propagates_like_dense(backend, order, where, tail, bdev):
    """Dense attention turns every row non-finite when a key is NaN or a value is NaN/Inf; the
    Taylor tail covers every block, so with orders 1 and 0 every PISA row must be non-finite too
    (never a finite, silently wrong number)."""
    q, k, v = rand_qkv(1, 1, 300, 64, seed=6)
    t = k if where.startswith("k") else v
    t[0, 0, 70, 5] = float("nan") if where.endswith("nan") else float("inf")
    dense = F.scaled_dot_product_attention(q, k, v)
    assert bool(_nonfinite_rows(dense).all())
    out = _run(backend, q, k, v, bdev, sparsity=0.6, order=order, tail=tail)
    assert bool(_nonfinite_rows(out).all()), f"{int((~_nonfinite_rows(out)).sum())} finite rows"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [1, 0, "drop"])
@pytest.mark.parametrize("where", ["q_inf", "k_inf", "v_inf", "all_nan"])
def test_nonfinite_inputs_do_not_crash(backend, order, where, bdev):
    q, k, v = rand_qkv(2, 1, 200, 64, seed=7)
    if where == "all_nan":
        q[1], k[1], v[1] = float("nan"), float("nan"), float("nan")
    else:
        {"q": q, "k": k, "v": v}[where[0]][1, 0, 150, 0] = float("inf")
    out = _run(backend, q, k, v, bdev, sparsity=0.6, order=order, kv_valid=torch.tensor([200, 180]))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(torch.isfinite(out[0]).all()), "the other batch element must be unaffected"
    if where == "all_nan":
        assert bool(torch.isnan(out[1]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("tail", ["plain", "lognormal"])
def test_masked_keys_with_garbage_have_no_influence(backend, value, tail, bdev):
    """Padded keys (kv_valid False) get exactly zero weight: whatever they hold, even NaN or Inf
    (uninitialised padding), must not change the output."""
    q, k, v = rand_qkv(2, 1, 300, 64, seed=8)
    lengths = torch.tensor([300, 230])
    clean = _run(backend, q, k, v, bdev, sparsity=0.6, kv_valid=lengths, tail=tail)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 240:] = value
    v2[1, :, 235:] = value
    out = _run(backend, q, k2, v2, bdev, sparsity=0.6, kv_valid=lengths, tail=tail)
    assert bool(torch.isfinite(out).all())
    assert max_err(out, clean) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [1, 0, "drop"])
@pytest.mark.parametrize("scales", [(30, 1, 1), (10, 10, 1), (100, 3, 1)], ids=["q30", "qk10", "q100k3"])
@pytest.mark.parametrize("tail", ["plain", "lognormal"])
def test_fp16_large_logits_stay_finite(backend, order, scales, tail, bdev):
    """fp16 with logits in the hundreds or thousands: no overflow (max subtraction covers exact
    and centroid logits), no NaN/Inf where dense attention has none."""
    qs, ks, vs = scales
    q, k, v = rand_qkv(1, 2, 300, 64, dtype=torch.float32, seed=9)
    q, k, v = (q * qs).half(), (k * ks).half(), (v * vs).half()
    dense = F.scaled_dot_product_attention(q, k, v)
    assert bool(torch.isfinite(dense).all())
    out = _run(backend, q, k, v, bdev, sparsity=0.75, order=order, tail=tail)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [1, 0])
def test_fp16_large_values_stay_finite(backend, order, bdev):
    """fp16 values around 1200 (2% of the fp16 range; dense attention is fine): the tail's value
    SUMS over a 64-token block reach ~77,000, beyond fp16's 65,504, so they must not be stored or
    multiplied in fp16."""
    q, k, v = rand_qkv(1, 1, 300, 64, dtype=torch.float32, seed=10)
    q, k, v = q.half(), k.half(), (v * 120 + 1200).half()
    dense = F.scaled_dot_product_attention(q, k, v)
    assert bool(torch.isfinite(dense).all())
    out = _run(backend, q, k, v, bdev, sparsity=0.75, order=order)
    assert bool(torch.isfinite(out).all()), "overflow in the tail"
    assert max_err(out, dense) / 1200 < 0.05


def test_perm_edited_in_place_under_inference_mode(qkv):
    """ComfyUI samples under ``torch.inference_mode()``, where tensors have no version counter: a
    cached permutation check must still not let an in-place edit that breaks the permutation
    through (the output would silently lose and duplicate tokens)."""
    q, k, v = qkv
    with torch.inference_mode():
        perm = torch.randperm(N)
        pisa_attention(q, k, v, backend="reference", token_perm=perm)
        perm[0] = perm[1]  # no longer a permutation
        with pytest.raises(ValueError, match="token_perm"):
            pisa_attention(q, k, v, backend="reference", token_perm=perm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["BHND", "BNHD"])
def test_head_groups_of_a_token_order_change_nothing(monkeypatch, backend, layout, bdev):
    """Long calls with a token order run in groups of heads (bounded copies): the same output as one
    group, with masks, sinks and dense rows."""
    from pisa_kernels import api

    q, k, v = rand_qkv(2, 6, 300, 64, seed=31, layout=layout)
    kw = dict(sparsity=0.7, layout=layout, token_perm=torch.randperm(300, generator=torch.Generator().manual_seed(2)),
              kv_valid=torch.tensor([300, 250]), sink_kv=[(0, 3)], dense_q=[(0, 10)], tail="lognormal")
    whole = _run(backend, q, k, v, bdev, **kw)
    monkeypatch.setattr(api, "PERM_GROUP_MIN_BYTES", 0)
    grouped = _run(backend, q, k, v, bdev, **kw)
    # the fp32 atomics of the GPU pre-scan may add in another order; the interpreter and the
    # reference are exact
    assert max_err(grouped, whole) <= (1e-5 if backend == "triton" and bdev.type == "cuda" else 0.0)


def test_dense_rows_accurate_under_comfyuis_reduced_precision_sdpa():
    """ComfyUI turns on ``allow_fp16_bf16_reduction_math_sdp`` at import, for the whole process, so
    PyTorch's math SDPA (the CPU path for 16-bit inputs) then reduces in fp16.  The reference's dense
    query rows must not inherit that: they run in fp32 off CUDA (this case, found by the fuzz, had
    4.3e-3 relative error in the dense rows before, 1.4e-4 after).  Strided inputs: the CPU's fused
    SDPA kernel takes contiguous ones, so these reach the math path."""
    from naive_pisa import naive_pisa
    from pisa_test_utils import strided_variant

    g = torch.Generator().manual_seed(103)
    q, k, v = (strided_variant(torch.randn(1, 1, 172, 64, generator=g, dtype=torch.float64).half(), "d2", seed=i)
               for i in range(3))
    kw = dict(sparsity=0.0, scale=0.875, dense_q=[(0, 8)])
    before = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        out = pisa_attention(q, k, v, backend="reference", **kw)
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(before)
    expect, _ = naive_pisa(q, k, v, **kw)
    assert max_err(out[:, :, :8], expect[:, :, :8]) <= 1e-3


def test_a_full_plan_cache_drops_the_least_recently_used(monkeypatch):
    """A plan in use survives a stream of other settings (a CUDA graph is keyed by its plan: a plan
    dropped and rebuilt is a graph captured again); the cache stays at its size."""
    from pisa_kernels import api

    monkeypatch.setattr(api, "_PLAN_CACHE", {})
    monkeypatch.setattr(api, "_PLAN_CACHE_SIZE", 4)
    q = torch.randn(1, 2, 128, 16)

    def plan(sparsity):
        return api._plan(q, sparsity=sparsity, block_size=64, order=1, scale=None, layout="BHND", sink_kv=None,
                         dense_q=None, token_perm=None, routing="topk", tail="plain", backend="reference")

    hot, first_cold = plan(0.5), plan(0.1)
    for i in range(10):
        plan(0.2 + 0.01 * i)
        assert plan(0.5) is hot
    assert len(api._PLAN_CACHE) == 4
    assert plan(0.1) is not first_cold  # long unused: dropped
