"""The Gluon Hopper forward kernel (pisa_kernels.hopper_kernel) without a GPU: which calls it takes,
where it may run, what ``backend="gluon"`` says where it cannot, and that it compiles for sm90 within
the shared memory its ring was planned for (Gluon has no interpreter: its numerics are checked on
the GPU, tests/kernels/test_gpu.py runs every comparison with it on sm90)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pisa_kernels import pisa_attention
from pisa_kernels import hopper_kernel as hk
from pisa_kernels.backend import hopper_unavailable_reason
from pisa_kernels.routing import PooledStats
from prerequisites import missing

HERE = os.path.dirname(os.path.abspath(__file__))


def _stats(lp=True):
    z = torch.zeros(2, 4, 64)
    return PooledStats(qbar=None, kbar=z, vsum=None, blen=torch.zeros(1, 4), hsum=None, covnorm=None,
                       kbar_lp=z.bfloat16() if lp else None, vmean_lp=z.bfloat16() if lp else None)


def _call(dtype=torch.bfloat16, d=64, layout="BHND", b=1):
    shape = (b, 2, 256, d) if layout == "BHND" else (b, 256, 2, d)
    q, k, v = (torch.zeros(shape, dtype=dtype) for _ in range(3))
    if layout == "BNHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return q, k, v


def test_covered_calls():
    q, k, v = _call()
    assert hk.unsupported_reason(q, k, v, valid=None, block=64, stats=_stats(), perm=None) is None
    q, k, v = _call(layout="BNHD", b=1)  # [B, N, H, D] views of one batch element merge to [H, N, D]
    assert hk.unsupported_reason(q, k, v, valid=None, block=64, stats=_stats(), perm=None) is None
    # key padding with a token order: K / V are the pre-scan's copies (padded rows are zeros)
    valid = torch.ones(1, 256, dtype=torch.int8)
    assert hk.unsupported_reason(q, k, v, valid=valid, block=64, stats=_stats(), perm=torch.arange(256)) is None
    q, k, v = _call(d=128)  # key blocks of 128 at head dim 128 (the first-order matrix: one tile)
    assert hk.unsupported_reason(q, k, v, valid=None, block=128, stats=_stats(), perm=None) is None


@pytest.mark.parametrize("case,why", [
    (dict(dtype=torch.float32), "dtype"), (dict(d=96), "head dim"), (dict(block=128), "block"),
    (dict(valid=True), "key padding without a token order"), (dict(layout="BNHD", b=2), "strides"),
    (dict(lp=False), "centroids")])
def test_uncovered_calls_say_why(case, why):
    q, k, v = _call(dtype=case.get("dtype", torch.bfloat16), d=case.get("d", 64), layout=case.get("layout", "BHND"),
                    b=case.get("b", 1))
    reason = hk.unsupported_reason(q, k, v, valid=torch.ones(1, 256, dtype=torch.int8) if case.get("valid") else None,
                                   block=case.get("block", 64), stats=_stats(case.get("lp", True)), perm=None)
    assert reason is not None and why in reason


def test_only_sm90_with_a_validated_triton():
    assert "CUDA" in hopper_unavailable_reason(torch.device("cpu")) or "Triton" in hopper_unavailable_reason(
        torch.device("cpu"))
    q, k, v = _call()
    with pytest.raises(ValueError, match="gluon"):
        pisa_attention(q, k, v, backend="gluon")
    with pytest.raises(ValueError, match="'gluon'"):
        pisa_attention(q, k, v, backend="hopper")


def test_every_configuration_has_a_ring():
    """At least two steps of two slots everywhere (the offline compile below checks that they fit),
    so the loader fills the next step's while the consumers compute; deeper where the shared memory
    allows: the first-order matrix rides in the ring, so order 1 at head dim 128 keeps the four
    slots keep-or-drop has."""
    depths = {d: hk.ring_slots(d) for d in hk.HEAD_DIMS}
    assert all(4 <= n <= hk.MAX_SLOTS and n % 2 == 0 for n in depths.values()), depths
    assert depths[128] == 4 and depths[64] == hk.MAX_SLOTS, depths


def test_the_hopper_kernel_compiles_for_sm90_offline():
    """Gluon to sm90 machine code (no GPU): every node configuration compiles, with the shared
    memory the ring was planned for (a compiler needing more scratch than hopper_kernel.SMEM_SCRATCH
    fails here, not at a user's first launch)."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "offline_compile.py"), "--hopper"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if isinstance(results, dict):
        missing(results["skip"])
    assert len(results) == 7
    for r in results:
        assert r["shared"] <= min(r["limit"], hk.SMEM_BYTES), r


@pytest.mark.parametrize("n, heads", [(118_800, 24), (75_600, 40), (200_000, 24), (4_096, 24)])
def test_tail_bias_launches_are_sized_by_the_whole_call(n, heads):
    """Each launch's fp16 bias [NQ, NB] fits in 1/TAIL_BIAS_SHARE of the call's q, k, v, and a head
    group of a token-ordered call (a quarter of the heads) launches as many heads at a time as the
    whole call would: sized by its own bytes it fell to one head per launch (H200: +3 ms a call)."""
    call = 3 * heads * n * 128 * 2
    per_head = hk.num_blocks(n, hk.QUERY_TILE) * hk.num_blocks(n, 64) * 2
    step = hk.bias_heads_per_launch(call, n, 64)
    assert step * per_head <= call // hk.TAIL_BIAS_SHARE or step == 1
    assert (step + 1) * per_head > call // hk.TAIL_BIAS_SHARE
    assert step >= hk.bias_heads_per_launch(call // 4, n, 64)
    if n <= 120_000:  # at 720p a whole call's launches carry several heads, a quarter's would carry one
        assert step >= 3 and hk.bias_heads_per_launch(call // 4, n, 64) <= step // 3
