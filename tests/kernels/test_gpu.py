"""GPU tests of the compiled Triton kernels (marked ``gpu``; skipped without CUDA).

* Triton vs the reference (on the GPU) in bf16/fp16 at moderate shapes (N = 1000-5000), every order,
  masks, token orders, covariance routing, sinks, both layouts.  At these sizes routing may break a
  near-tie differently (the two pre-scans sum in different orders), so outputs are compared on the
  reference's selection (replayed) and the backends' own selections must agree on almost all tiles.
* A 2,000-case hypothesis fuzz (issue 7), mostly small shapes, Triton vs reference and the CUDA-graph
  path vs the eager one, in :data:`GPU_FUZZ_SHARDS` tests of their own seeds (each fits one device
  call; ``scripts/gpu_tests.py`` runs them in groups).
* ``sparsity=0`` vs SDPA: relative L2 <= 1e-2 in bf16 (issue 2's bar), with and without a key mask.
* No recompilation (or re-autotuning) for a new sequence length or sparsity (issue 2).
* Extra GPU memory during a call <= 10% of the bytes of q + k + v (issue 2's bar).

bf16 is only checked here: Triton 3.8's interpreter computes bf16 ``tl.dot`` wrongly, so the CPU
suite cannot.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import seed as fuzz_seed

from fuzz_strategies import fuzz_case
from pisa_kernels import pisa_attention
from pisa_kernels.tiling import joint_permutation, tile_permutation
from pisa_test_utils import (adaptive_forward, adaptive_selection_case, assert_graph_path_is_eager, assert_same_selection, capture_routing, max_err, rand_qkv, rel_l2, selection_of,
                             structured_qkv)
from prerequisites import missing

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 3e-3}  # fp32 dots run as tf32
N_GPU_FUZZ = int(2000 * float(os.environ.get("PISA_FUZZ_SCALE", "1")))
#: The GPU fuzz runs as this many tests (``test_gpu_fuzz[shard0]`` ...), each with its own seed and
#: its share of the N_GPU_FUZZ cases, so that one shard fits one device call.
GPU_FUZZ_SHARDS = 8


@pytest.fixture(scope="module", autouse=True)
def _triton_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from pisa_kernels.backend import triton_unavailable_reason

    reason = triton_unavailable_reason(DEV)
    if reason is not None:
        missing(f"the Triton kernels cannot run on this GPU: {reason}")


def _dev(kw):
    return {a: (c.to(DEV) if isinstance(c, torch.Tensor) else c) for a, c in kw.items()}


def forward_backends() -> list[str]:
    """The Triton backend's forward kernels this GPU runs: the portable one, and on sm90 (with a
    validated Triton) the Gluon Hopper kernel through ``"auto"`` (the node's choice: the Hopper
    kernel where it covers the call, the portable one for the rest)."""
    from pisa_kernels.backend import hopper_unavailable_reason

    return ["triton"] + (["auto"] if hopper_unavailable_reason(DEV) is None else [])


def compare_on_gpu(q, k, v, *, max_disagree=0.01, **kw):
    """Each forward kernel (:func:`forward_backends`) vs the reference on the GPU.  Returns (the
    largest error on the replayed selection, fraction of (head, tile) routings that differ).  The
    calls run eagerly (capture_routing sees to it); test_cuda_graph_replay and the fuzz check the
    graph path against the eager one."""
    q, k, v = (t.to(DEV) for t in (q, k, v))
    kw = _dev(kw)
    with capture_routing() as log_r:
        ref = pisa_attention(q, k, v, backend="reference", **kw)
    sel_r = selection_of(log_r)
    worst = frac = 0.0
    for backend in forward_backends():
        with capture_routing() as log_t:
            own = pisa_attention(q, k, v, backend=backend, **kw)
        sel_t = selection_of(log_t)
        assert own.shape == q.shape and own.dtype == q.dtype and own.device == q.device
        blen = log_r[0][0].blen
        heads = sel_r.mask.shape[0] // blen.shape[0]
        nonempty = (blen > 0).repeat_interleave(heads, dim=0)[:, None, :]
        differs = ((sel_r.mask != sel_t.mask) & nonempty).any(dim=-1)  # [BH, NQ]
        frac = max(frac, float(differs.float().mean()))
        if not bool(differs.any()):
            tri = own
        else:  # near-ties broken differently: compare the kernel math on the same blocks
            with capture_routing(replay=sel_r):
                tri = pisa_attention(q, k, v, backend=backend, **kw)
        err = max_err(tri, ref)
        assert frac <= max_disagree, f"routing differs on {frac:.2%} of the tiles"
        assert err <= TOL[q.dtype], f"{backend} vs reference {err:.3e} ({kw.keys()})"
        worst = max(worst, err)
    return worst, frac


# --- moderate shapes ---


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", [1, 0, "drop"])
@pytest.mark.parametrize("n,d,block", [(1000, 128, 64), (3001, 64, 128), (4999, 128, 64), (4999, 128, 128)])
def test_moderate_shapes(dtype, order, n, d, block):
    q, k, v = rand_qkv(2, 4, n, d, dtype=dtype, seed=n, v_shift=0.5, device=DEV)
    compare_on_gpu(q, k, v, sparsity=0.875, order=order, block_size=block)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", [1, 0, "drop"])
def test_moderate_masks_perm_sinks(dtype, order):
    """Joint attention at FLUX-like size: 256 text tokens (the last 56 padded in one batch element),
    then a tiled 48x64 grid; text sinks and dense text rows."""
    grid, n_text = (48, 64), 256
    q, k, v = structured_qkv(2, 4, grid, 128, dtype=dtype, seed=1, n_extra=n_text, device=DEV)
    n = q.shape[2]
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 200:n_text] = False
    compare_on_gpu(q, k, v, sparsity=0.85, order=order, token_perm=joint_permutation(n, grid, n_text),
                   kv_valid=valid, sink_kv=[(0, n_text)], dense_q=[(0, n_text)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("routing", ["topk", "cov"])
@pytest.mark.parametrize("layout", ["BHND", "BNHD"])
@pytest.mark.parametrize("tail", ["plain", "lognormal"])
def test_moderate_layout_routing_video_perm(dtype, routing, layout, tail):
    grid = (5, 20, 36)  # a small video latent: 3600 tokens, 8x8 tiles do not divide 20 or 36
    n = 5 * 20 * 36
    q, k, v = rand_qkv(1, 6, n, 128, dtype=dtype, seed=2, layout=layout, device=DEV)
    compare_on_gpu(q, k, v, sparsity=0.875, order=1, routing=routing, layout=layout, tail=tail,
                   token_perm=tile_permutation(grid), kv_valid=torch.tensor([n - 300]))
    # without a mask the exact blocks come through tensor descriptors on sm90+
    compare_on_gpu(q, k, v, sparsity=0.875, order=1, routing=routing, layout=layout, tail=tail,
                   token_perm=tile_permutation(grid))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["wan720", "hunyuan720"])
def test_node_calls(dtype, name):
    """The node's calls (pisa_lab.bench_node_calls: ComfyUI's views and mask, the node's own
    keyword arguments) at a moderate size: Wan's B = 2 BNHD views in tiled order; HunyuanVideo's
    256 text tokens (128 padded) as sinks, dense rows and key padding, in joint order.  On sm90+ the
    full blocks come through tensor descriptors with the mask, only the partial ones through
    pointers."""
    from dataclasses import replace

    from pisa_lab import bench_node_calls as nc

    fam = replace(nc.FAMILIES[name], heads=4, grid=(5, 16, 40))
    call = nc.node_call(fam, *rand_qkv(fam.batch, fam.heads, fam.tokens, fam.head_dim, dtype=dtype, seed=4,
                                       layout="BNHD", v_shift=0.5, device=DEV))
    kw = {a: b for a, b in call.kwargs.items() if a != "backend"}  # (compare_on_gpu runs both backends)
    compare_on_gpu(call.q, call.k, call.v, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", ["plain", "lognormal"])
@pytest.mark.parametrize("case", ["video_perm", "video_perm_padded", "joint_masks_sinks_dense", "block128"])
def test_adaptive_routing(dtype, tail, case):
    """Adaptive routing (issue 17) in the compiled kernel: each tile's own exact count, the
    heaviest-first tile order (also behind the dense-row programs), key padding, sinks, token
    orders; the call's mean count is the budget's exactly.  The budget's one threshold over
    the call may break a near-tie differently on the two pre-scans, so the selections must agree
    on most tiles and the outputs are compared on the reference's (replayed)."""
    kw = {"sparsity": 0.875, "order": 1, "routing": "adaptive", "tail": tail}
    if case.startswith("video_perm"):  # the lab's DiT-like heads (local ... flat: counts spread), BNHD
        from pisa_lab import workloads

        grid = (5, 20, 36)
        n = 5 * 20 * 36
        w = workloads.generate(workloads.SetSpec("adaptive", "wan", grid, heads=6), seed=7, device=DEV, dtype=dtype)
        q, k, v = w.q, w.k, w.v
        kw.update(token_perm=tile_permutation(grid), layout="BNHD")
        if case == "video_perm_padded":
            kw.update(kv_valid=torch.tensor([n - 300]))
    elif case == "joint_masks_sinks_dense":
        grid, n_text = (48, 64), 256
        q, k, v = structured_qkv(2, 4, grid, 128, dtype=dtype, seed=8, n_extra=n_text, device=DEV)
        n = q.shape[2]
        valid = torch.ones(2, n, dtype=torch.bool)
        valid[1, 200:n_text] = False
        kw.update(sparsity=0.85, token_perm=joint_permutation(n, grid, n_text), kv_valid=valid,
                  sink_kv=[(0, n_text)], dense_q=[(0, n_text)])
    else:
        q, k, v = rand_qkv(2, 4, 3001, 64, dtype=dtype, seed=9, v_shift=0.5, device=DEV)
        q = q * 3  # sharper attention: the counts spread
        kw.update(block_size=128, order=0)
    compare_on_gpu(q, k, v, max_disagree=0.1, **kw)
    _, st = pisa_attention(q.to(DEV), k.to(DEV), v.to(DEV), backend="triton", return_stats=True, cuda_graph=False,
                           **_dev(kw))
    tiles = st.tile_counts
    assert tiles is not None and abs(float(tiles.double().mean()) - st.exact_mean) < 1e-9
    assert int(tiles.max()) > int(tiles.min())
    if "kv_valid" not in kw:
        assert_graph_path_is_eager(q.to(DEV), k.to(DEV), v.to(DEV), 2e-2 if dtype == torch.bfloat16 else 2e-3,
                                   **_dev(kw))


def test_adaptive_tile_order_only_reorders():
    """The node's adaptive call equals the reference; the heaviest-first launch order changes which
    program takes which tile, not the result."""
    q, k, v = structured_qkv(1, 8, (48, 64), 128, dtype=torch.bfloat16, seed=10, n_extra=128, device=DEV)
    kw = {"sparsity": 0.875, "routing": "adaptive", "tail": "lognormal", "backend": "triton", "cuda_graph": False,
          "token_perm": joint_permutation(q.shape[2], (48, 64), 128), "sink_kv": [(0, 128)], "dense_q": [(0, 128)]}
    a = pisa_attention(q, k, v, **kw)
    ref = pisa_attention(q, k, v, **dict(kw, backend="reference"))
    assert max_err(a, ref) <= 2e-2  # the node's adaptive call, on the GPU, against the oracle
    h, b = adaptive_forward(q, k, v, sparsity=0.875, reorder=True, lognormal=True)
    r, _ = adaptive_forward(q, k, v, sparsity=0.875, reorder=False, lognormal=True)
    assert int(b.tile_count.min()) < int(b.tile_count.max())
    assert max_err(h, r) <= 1e-2  # (the first-order moments meet through fp32 atomics in any order)


def test_fp32_and_large_head_dim_fallback():
    q, k, v = rand_qkv(1, 2, 2000, 64, dtype=torch.float32, seed=3, device=DEV)
    compare_on_gpu(q, k, v, sparsity=0.75, order=1)
    q, k, v = rand_qkv(1, 1, 500, 256, dtype=torch.bfloat16, seed=3, device=DEV)
    out, st = pisa_attention(q, k, v, return_stats=True)  # auto: D > 128 runs the reference
    assert st.backend == "reference" and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="backend"):
        pisa_attention(q, k, v, backend="triton")


def test_auto_is_triton_on_gpu():
    q, k, v = rand_qkv(1, 2, 700, 64, dtype=torch.bfloat16, seed=4, device=DEV)
    _, st = pisa_attention(q, k, v, return_stats=True)
    assert st.backend == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,kw", [((1, 24, 4608, 128), dict(sparsity=0.85, sink_kv=[(0, 512)])),
                                      ((2, 4, 1000, 64), dict(order=0, layout="BNHD")),
                                      ((1, 8, 3000, 128), dict(order="drop", routing="cov", block_size=128))])
def test_cuda_graph_replay(dtype, shape, kw):
    """Short calls replay a captured CUDA graph: each replay must read the new inputs (the graph
    holds static copies) and equal the eager call, also for a new shape and after other calls."""
    b, h, n, d = shape
    layout = kw.get("layout", "BHND")
    for backend in forward_backends():
        for seed in (1, 2, 3):
            q, k, v = rand_qkv(b, h, n, d, dtype=dtype, seed=seed, layout=layout, device=DEV)
            eager = pisa_attention(q, k, v, backend=backend, cuda_graph=False, **kw)
            graph = pisa_attention(q, k, v, backend=backend, cuda_graph=True, **kw)
            assert max_err(graph, eager) <= (1e-2 if dtype == torch.bfloat16 else 2e-3)
            # A different shape in between must not disturb the cached graph.
            q2, k2, v2 = rand_qkv(1, 2, 700, d, dtype=dtype, seed=seed, layout=layout, device=DEV)
            pisa_attention(q2, k2, v2, backend=backend, cuda_graph=True, **kw)
        q[0, 0] += 1.0  # in-place change of an input: the replay must see it
        assert max_err(pisa_attention(q, k, v, backend=backend, cuda_graph=True, **kw),
                       pisa_attention(q, k, v, backend=backend, cuda_graph=False, **kw)) <= 1e-2


def test_routing_capture_of_short_calls():
    """Issue 18: the fuzz's simplest case (N = 1, fp32, no mask), on the default path, which
    replays short calls as a CUDA graph: a graph routes twice when captured and never when
    replayed, so capture_routing runs the calls eagerly: one routing per call, on the first and on a
    repeated call; the graph path gives the same output."""
    q, k, v = rand_qkv(1, 1, 1, 64, seed=7, device=DEV)
    for _ in range(2):
        with capture_routing() as log_r:
            ref = pisa_attention(q, k, v, backend="reference", sparsity=0.0)
        with capture_routing() as log_t:
            tri = pisa_attention(q, k, v, backend="triton", sparsity=0.0)
        assert torch.equal(selection_of(log_r).mask.bool(), selection_of(log_t).mask.bool())
        assert max_err(tri, ref) <= TOL[torch.float32]
    assert_graph_path_is_eager(q, k, v, TOL[torch.float32], sparsity=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_of_expanded_inputs_and_across_inference_mode(dtype):
    """Two calls that raised on the graph path while the eager path ran (issue 18): keys and values
    expanded over the heads (a stride of 0, as grouped-query attention shares them) could not be
    copied into buffers of their strides; a graph captured under torch.inference_mode() (ComfyUI's
    sampling) holds inference tensors, which a call outside it could not write."""
    kw = dict(backend="triton", sparsity=0.75)
    b, h, n, d = 1, 4, 700, 64
    q = rand_qkv(b, h, n, d, dtype=dtype, seed=8, device=DEV)[0]
    _, k1, v1 = rand_qkv(b, 1, n, d, dtype=dtype, seed=9, device=DEV)
    k, v = k1.expand(b, h, n, d), v1.expand(b, h, n, d)
    assert k.stride(1) == 0
    eager = pisa_attention(q, k, v, cuda_graph=False, **kw)
    assert max_err(pisa_attention(q, k, v, cuda_graph=True, **kw), eager) <= TOL[dtype]

    q, k, v = rand_qkv(1, 2, 333, d, dtype=dtype, seed=10, device=DEV)  # a shape of its own: a new graph
    with torch.inference_mode():
        inside = pisa_attention(q, k, v, cuda_graph=True, **kw)  # captured here
    outside = pisa_attention(q, k, v, cuda_graph=True, **kw)  # replayed outside inference mode
    assert not outside.is_inference()
    eager = pisa_attention(q, k, v, cuda_graph=False, **kw)
    assert max_err(inside, eager) <= TOL[dtype] and max_err(outside, eager) <= TOL[dtype]


# --- fuzz ---


@pytest.mark.parametrize("shard", range(GPU_FUZZ_SHARDS), ids=lambda i: f"shard{i}")
def test_gpu_fuzz(case_counter, shard):
    """One shard of the GPU fuzz: its own seed (shards draw independent cases; each starts with
    hypothesis's simplest case) and its share of the N_GPU_FUZZ cases (the shares sum to it)."""
    n_cases = N_GPU_FUZZ * (shard + 1) // GPU_FUZZ_SHARDS - N_GPU_FUZZ * shard // GPU_FUZZ_SHARDS
    before = case_counter["triton vs reference (GPU)"]
    fracs = []

    @fuzz_seed(20261127 + shard)
    @settings(max_examples=n_cases, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(fuzz_case(gpu=True))
    def run(case):
        q, k, v, kw = case
        case_counter["triton vs reference (GPU)"] += 1
        err, frac = compare_on_gpu(q, k, v, max_disagree=1.0, **kw)
        note(f"error {err:.3e}, routing differs on {frac:.2%} of the tiles")
        fracs.append(frac)
        q, k, v = (t.to(DEV) for t in (q, k, v))
        assert_graph_path_is_eager(q, k, v, TOL[q.dtype], **_dev(kw))

    run()
    ran = case_counter["triton vs reference (GPU)"] - before
    print(f"GPU fuzz shard {shard}: {ran} cases, routing differs on {sum(fracs) / max(1, len(fracs)):.3%} "
          f"of tiles on average")
    assert ran >= n_cases
    assert sum(fracs) / max(1, len(fracs)) <= 0.01


# --- sparsity 0 is dense ---


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("layout", ["BHND", "BNHD"])
def test_sparsity0_is_sdpa(dtype, mask, layout):
    b, h, n, d = 2, 8, 4096, 128
    q, k, v = rand_qkv(b, h, n, d, dtype=dtype, seed=5, layout=layout, device=DEV)
    lengths = torch.tensor([n, 3000], device=DEV)
    kv_valid = lengths if mask else None
    out = pisa_attention(q, k, v, sparsity=0.0, layout=layout, kv_valid=kv_valid, backend="triton")
    qh, kh, vh = (t if layout == "BHND" else t.transpose(1, 2) for t in (q, k, v))
    attn_mask = (torch.arange(n, device=DEV)[None, :] < lengths[:, None])[:, None, None, :] if mask else None
    truth = F.scaled_dot_product_attention(qh.float(), kh.float(), vh.float(), attn_mask=attn_mask)
    if layout == "BNHD":
        truth = truth.transpose(1, 2)
    err = rel_l2(out, truth)
    assert err <= 1e-2, f"rel L2 vs dense {err:.2e}"


# --- no recompilation for a new N ---


def _jit_functions():
    """The Triton JIT functions of pisa_kernels.triton_kernels (unwrapping autotuners)."""
    import triton

    from pisa_kernels import triton_kernels as tk

    jit_type = triton.runtime.jit.JITFunction
    out = {}
    for name in dir(tk):
        obj = getattr(tk, name)
        fn = getattr(obj, "fn", None)
        if isinstance(obj, jit_type):
            out[name] = (obj, None)
        elif isinstance(fn, jit_type):  # an Autotuner (or Heuristics) around a JITFunction
            out[name] = (fn, obj)
    return out


def _cache_entries(jit, tuner) -> int:
    """Compiled variants (and autotune results) held by a JITFunction: Triton >= 3.0 keeps
    ``device_caches[device] = (kernel_cache, ...)``; older ones a ``cache`` dict per device."""
    n = 0
    caches = getattr(jit, "device_caches", None)
    if caches is not None:
        for entry in caches.values():
            n += len(entry[0])
    else:
        cache = getattr(jit, "cache", None)
        if not isinstance(cache, dict):
            pytest.skip("cannot inspect this Triton version's kernel cache")
        for per_dev in cache.values():
            n += len(per_dev) if isinstance(per_dev, dict) else 1
    if tuner is not None and isinstance(getattr(tuner, "cache", None), dict):
        n += len(tuner.cache)
    return n


def _snapshot():
    return {name: _cache_entries(j, t) for name, (j, t) in _jit_functions().items()}


@pytest.mark.parametrize("flags", [dict(order=1), dict(order=1, kv_valid="lengths"), dict(order=0, routing="cov"),
                                   dict(order="drop", token_perm="tiled")])
def test_no_recompilation_for_new_lengths_and_sparsities(flags):
    """Sequence length, block counts and the number of selected blocks are runtime values: after
    warming up one length that is a multiple of 16 and one that is not (Triton specialises integer
    arguments on divisibility by 16), new lengths and sparsities compile nothing and autotune nothing."""
    assert _jit_functions(), "no Triton JIT functions found in pisa_kernels.triton_kernels"

    def call(n, sparsity=0.875):
        q, k, v = rand_qkv(1, 4, n, 128, dtype=torch.bfloat16, seed=n, device=DEV)
        kw = dict(flags)
        if kw.get("kv_valid") == "lengths":
            kw["kv_valid"] = torch.tensor([n - 17], device=DEV)
        if kw.get("token_perm") == "tiled":
            kw["token_perm"] = torch.randperm(n, device="cpu").to(DEV)
        pisa_attention(q, k, v, sparsity=sparsity, backend="triton", **kw)

    for n in (1000, 1024):
        call(n)
    torch.cuda.synchronize()
    before = _snapshot()
    for n in (1100, 1537, 2001, 3072, 4999, 7777):
        call(n)
    for sparsity in (0.75, 0.9, 0.95):
        call(2500, sparsity)
    torch.cuda.synchronize()
    after = _snapshot()
    grown = {name: (before[name], after[name]) for name in after if after[name] != before.get(name)}
    assert not grown, f"kernels compiled again for new lengths/sparsities: {grown}"


# --- adaptive routing's Triton selection at full size ---


@pytest.mark.parametrize("case", ["wan720", "wan720_kinds_lognormal", "flux_joint"])
def test_adaptive_triton_selection_is_the_sorted_one(case):
    """triton_kernels.adaptive_blocks against routing.SortedAdaptive, bit for bit, on random pooled
    statistics of real sizes: Wan2.1 720p (BH=40, 591 tiles, 1,182 blocks, one score chunk a head
    at this size: several chunks), with sinks, empty and partial blocks and the log-normal mass
    correction; FLUX 1024² with its text sinks (72 blocks): pisa_test_utils.adaptive_selection_case.
    scripts/adaptive_select_gpu_check.py compares the same cases stage by stage."""
    from pisa_kernels import routing as R
    from pisa_kernels import triton_kernels as tk

    st, kw = adaptive_selection_case(case, DEV)
    tiles = st.qbar.shape[0] * st.qbar.shape[1]
    a = R.adaptive_route(st, **kw)
    b = R.adaptive_route(st, select=tk.adaptive_blocks, **kw)
    assert_same_selection(a, b)
    assert int(a.tile_count.sum()) == round(0.125 * st.kbar.shape[1] * tiles) + kw["n_forced"] * tiles
    assert int(a.tile_count.max()) > int(a.tile_count.min())


# --- memory ---


@pytest.mark.parametrize("case", ["plain", "kv_valid", "token_perm", "cov_routing", "lognormal", "adaptive"])
def test_extra_memory_is_small(case):
    """Extra GPU memory during a call (peak minus inputs minus the output) <= 10% of q+k+v bytes
    at a medium shape, and nothing accumulates from call to call.  A token order adds the pre-scan's
    processing-order copies of k and v, a group of heads at a time (pisa_kernels.api.PERM_HEAD_GROUPS):
    2/3 of q+k+v divided by the number of groups."""
    from pisa_kernels import api

    b, h, n, d = 1, 24 if case == "token_perm" else 16, 16384, 128
    q, k, v = rand_qkv(b, h, n, d, dtype=torch.bfloat16, seed=6, device=DEV)
    kw = dict(sparsity=0.875, order=1, backend="triton")
    limit = 0.10
    if case == "kv_valid":
        kw["kv_valid"] = torch.tensor([n - 1000], device=DEV)
    elif case == "token_perm":
        kw["token_perm"] = tile_permutation((8, 32, 64), device=DEV)
        assert 3 * q.numel() * q.element_size() >= api.PERM_GROUP_MIN_BYTES  # grouped
        limit += 2 / 3 / api.PERM_HEAD_GROUPS
    elif case == "cov_routing":
        kw["routing"] = "cov"
    elif case == "lognormal":
        kw["tail"] = "lognormal"
    elif case == "adaptive":
        kw.update(routing="adaptive", tail="lognormal")
    qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    out = pisa_attention(q, k, v, **kw)  # warm-up: compilation, cached permutation checks
    del out
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(DEV)
    torch.cuda.reset_peak_memory_stats(DEV)
    out = pisa_attention(q, k, v, **kw)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(DEV)
    out_bytes = out.numel() * out.element_size()
    extra = peak - base - out_bytes
    held = torch.cuda.memory_allocated(DEV) - base - out_bytes
    assert extra <= limit * qkv_bytes, \
        f"extra memory {extra / 2**20:.1f} MiB = {extra / qkv_bytes:.1%} of q+k+v ({qkv_bytes / 2**20:.0f} MiB)"
    assert held <= 0.01 * qkv_bytes, f"{held / 2**20:.1f} MiB still held after the call"
