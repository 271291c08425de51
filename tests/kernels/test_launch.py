"""Launch configurations of the forward kernel: the fallback chain, and which GPUs it fits.

* ``_launch`` steps down the chain until a configuration fits, caches the one that did, and raises
  ``KernelDoesNotFit`` (cached too) when none does; ``pisa_attention(backend="auto")`` then runs the
  reference, ``backend="triton"`` raises (the node runs such calls dense: tests/comfy).
* The kernel compiled offline (no GPU needed: Triton's bundled ptxas) for sm80, sm86, sm89, sm90 and
  sm120 (RTX 50; with tensor descriptors, as on sm90) finds a configuration within each GPU's shared
  memory for the largest 16-bit tiles (head dim 128, blocks of 64 and 128, key padding) and fp32 of
  head dim 64, so the "sm80 and newer" claim is checked on GPUs this project has no access to; the
  pre-scan's and the routing's kernels compile for sm80, sm90 and sm120 too.
* The pre-scan's launch aims at a number of programs an SM (``pool_chunks``).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from pisa_kernels import api, pisa_attention
from pisa_kernels.errors import KernelDoesNotFit
from pisa_test_utils import max_err, rand_qkv
from prerequisites import import_or_missing, missing

triton = import_or_missing("triton", "the launch tests drive Triton's kernels")
tk = import_or_missing("pisa_kernels.triton_kernels", "the launch tests drive Triton's kernels")

HERE = os.path.dirname(os.path.abspath(__file__))


class FakeKernel:
    """Stands in for a Triton kernel: raises OutOfResources for configurations above ``limit``."""

    __name__ = "fake_kernel"

    def __init__(self, limit):
        self.limit, self.tried = limit, []

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, num_warps, num_stages, TAIL_STAGES, **meta):
        self.tried.append((num_stages, TAIL_STAGES))
        need = 1000 * num_stages + 100 * TAIL_STAGES
        if need > self.limit:
            raise triton.runtime.errors.OutOfResources(need, self.limit, "shared memory")
        return ("compiled", num_stages, TAIL_STAGES)


def test_launch_steps_down_and_caches_the_fit(monkeypatch):
    monkeypatch.setattr(tk, "_FITTING", {})
    chain = tk._fallbacks((8, 3, 3))
    kernel = FakeKernel(limit=3150)  # (3, 1) is the first that fits
    assert tk._launch(kernel, (1,), ("k",), chain, X=1) == ("compiled", 3, 1)
    assert kernel.tried == [(3, 3), (3, 2), (3, 1)]
    kernel.tried.clear()
    assert tk._launch(kernel, (1,), ("k",), chain, X=1) == ("compiled", 3, 1)
    assert kernel.tried == [(3, 1)]  # the cached fit first
    kernel.tried.clear()
    tk._launch(kernel, (1,), ("k",), chain, X=2)  # other meta-parameters: a key of their own
    assert kernel.tried == [(3, 3), (3, 2), (3, 1)]


def test_launch_raises_when_nothing_fits_and_remembers(monkeypatch):
    monkeypatch.setattr(tk, "_FITTING", {})
    kernel = FakeKernel(limit=500)
    chain = tk._fallbacks((8, 3, 3))
    with pytest.raises(KernelDoesNotFit, match="fake_kernel"):
        tk._launch(kernel, (1,), ("k",), chain, X=1)
    assert kernel.tried == [(3, 3), (3, 2), (3, 1), (2, 1), (1, 1)]
    kernel.tried.clear()
    with pytest.raises(KernelDoesNotFit):
        tk._launch(kernel, (1,), ("k",), chain, X=1)
    assert kernel.tried == []  # no second walk down the chain


def _no_fit(*args, **kwargs):
    raise KernelDoesNotFit("no launch configuration of _pisa_fwd_kernel fits this GPU's shared memory (test)")


def test_auto_backend_falls_back_to_the_reference(monkeypatch):
    """Where Triton runs but no configuration fits: "auto" gives the reference's output (and says so),
    "triton" raises."""
    monkeypatch.setattr(api, "_PLAN_CACHE", {})  # plans made under the patched resolution stay here
    monkeypatch.setattr(api, "resolve_backend", lambda requested, device: "reference" if requested == "reference"
                        else "triton")
    monkeypatch.setattr(tk, "attend", _no_fit)
    q, k, v = rand_qkv(1, 2, 200, 64, dtype=torch.float32, seed=3)
    ref = pisa_attention(q, k, v, sparsity=0.5, backend="reference")
    with pytest.warns(RuntimeWarning, match="reference"):
        out, st = pisa_attention(q, k, v, sparsity=0.5, backend="auto", return_stats=True)
    assert st.backend == "reference" and max_err(out, ref) == 0.0
    with pytest.raises(KernelDoesNotFit):
        pisa_attention(q, k, v, sparsity=0.5, backend="triton")


def test_the_kernel_fits_sm80_to_sm90_offline():
    """Offline compilation (tests/kernels/offline_compile.py) for GPUs of 99 to 227 KB of shared memory."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "offline_compile.py")], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if isinstance(results, dict):
        missing(results["skip"])
    assert len(results) >= 5
    for r in results:
        assert r["fits"] is not None, f"no configuration fits {r['case']}: {r['tried']}"


def test_the_prescan_and_routing_kernels_compile_offline():
    """The pre-scan's and the routing's kernels, as the library launches them, compile for sm80,
    sm90 and sm120 within each GPU's shared memory (tests/kernels/offline_compile.py --aux): CI
    has no GPU, and these kernels have no fallback configuration of their own."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "offline_compile.py"), "--aux"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if isinstance(results, dict):
        missing(results["skip"])
    kernels = {r["case"][1] for r in results}
    assert {"_pool_k_kernel", "_top_blocks_kernel", "_adaptive_rank_kernel", "_adaptive_pick_kernel"} <= kernels
    for r in results:
        assert r["shared"] <= r["limit"], f"{r['case']} needs {r['shared']} bytes of shared memory"


@pytest.mark.parametrize("nb,bh", [(1182, 10), (1182, 40), (1861, 6), (512, 80), (72, 24), (5, 1), (20000, 1)])
def test_pool_launch_aims_at_the_programs_per_sm(nb, bh):
    """The pre-scan's chunks cover every key block, take at least POOL_MIN_BLOCKS each (or all of a
    shorter head), and give the launch about POOL_PROGRAMS_PER_SM programs an SM where the heads
    have enough blocks for it: never more than that target plus one chunk a head."""
    cpu = torch.device("cpu")
    bpp, chunks = tk.pool_chunks(nb, bh, cpu)
    target = tk.POOL_PROGRAMS_PER_SM * tk._DEFAULT_SMS
    assert (chunks - 1) * bpp < nb <= chunks * bpp
    assert bpp >= min(nb, tk.POOL_MIN_BLOCKS) or chunks == 1
    assert chunks * bh <= target + bh
    want = -(-target // bh)
    if nb >= tk.POOL_MIN_BLOCKS * want:  # enough blocks: the target is met, up to rounding of the chunks
        assert chunks >= 0.85 * want
