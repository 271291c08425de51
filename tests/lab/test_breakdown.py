"""``python -m pisa_lab.breakdown``: which phase of the call each kernel belongs to (from the Python
stack it was launched under, else its name), the attribution of a CUDA profile (checked on a
stand-in for the profiler's events: CI has no GPU), and the CLI on the CPU."""

import json
from types import SimpleNamespace

import pytest
import torch

from pisa_lab import breakdown as B

API = "pisa_kernels/api.py(410): pisa_attention"


@pytest.mark.parametrize(("name", "frames", "phase"), [
    # the outermost library frame below the API decides: the tail bias's GEMM runs in routing.mass_bias
    ("sm90_xmma_gemm_f32", ["pisa_kernels/routing.py(455): mass_bias", "pisa_kernels/triton_kernels.py(330): tail_bias",
                            API, "bench.py(3): <module>"], "tail bias"),
    ("void at::native::reduce_kernel<LogSumExp>", ["pisa_kernels/routing.py(260): block_log_mass",
                                                    "pisa_kernels/routing.py(412): adaptive_route", API], "routing"),
    ("_radix_kernel", ["pisa_kernels/triton_kernels.py(900): _launch", "pisa_kernels/triton_kernels.py(585): finish",
                       "pisa_kernels/routing.py(437): adaptive_route", API], "routing"),
    ("_pool_k_kernel", ["pisa_kernels/triton_kernels.py(900): _launch", "pisa_kernels/triton_kernels.py(960): pool",
                        API], "pre-scan"),
    ("_pisa_fwd_hopper", ["pisa_kernels/hopper_kernel.py(500): attend", API], "forward"),
    ("elementwise_kernel<direct_copy>", ["pisa_kernels/tiling.py(80): joint_permutation", API], "token order"),
    ("elementwise_kernel<direct_copy>", [API], "api"),  # the API's own copies
    ("_pisa_fwd_hopper", [], "forward"),  # no stack: the kernel's name
    ("_tail_bias_kernel", [], "tail bias"),
    ("nvjet_tst_192x192", ["model.py(3): forward"], "torch"),  # not the library's
])
def test_phase_of(name, frames, phase):
    assert B.phase_of(name, frames) == phase


def _event(name, device_type, parent=None, kernels=(), us=0.0):
    return SimpleNamespace(name=name, device_type=device_type, cpu_parent=parent, self_cpu_time_total=us,
                           kernels=[SimpleNamespace(name=n, duration=d) for n, d in kernels],
                           time_range=SimpleNamespace(elapsed_us=lambda us=us: us))


def test_cuda_profile_attribution_counts_every_kernel_once():
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    api = _event(API, cpu)
    route = _event("pisa_kernels/routing.py(412): adaptive_route", cpu, api)
    pool = _event("pisa_kernels/triton_kernels.py(960): pool", cpu, api)
    events = [
        api, route, pool,
        _event("aten::baddbmm", cpu, route, kernels=[("gemm_a", 300.0)]),  # two calls of the same GEMM
        _event("aten::baddbmm", cpu, route, kernels=[("gemm_a", 300.0)]),
        _event("cuLaunchKernelEx", cpu, pool, kernels=[("_pool_k_kernel", 500.0)]),
        _event("aten::add_", cpu, route, kernels=[("aten::add_", 99.0)]),  # a legacy self-entry: not a kernel
        _event("gemm_a", cuda, us=300.0), _event("gemm_a", cuda, us=300.0), _event("_pool_k_kernel", cuda, us=500.0),
        _event("_pisa_fwd_hopper", cuda, us=4000.0),  # no launch linked to it: placed by its name
    ]
    rows = B.kernel_rows(SimpleNamespace(events=lambda: events), calls=2, device=torch.device("cuda"))
    got = {(r["name"], r["phase"]): (r["launches"], r["ms"]) for r in rows}
    assert got == {("gemm_a", "routing"): (1.0, 0.3), ("_pool_k_kernel", "pre-scan"): (0.5, 0.25),
                   ("_pisa_fwd_hopper", "forward"): (0.5, 2.0)}
    assert rows[0]["name"] == "_pisa_fwd_hopper"  # slowest first
    totals = B.phase_totals(rows)
    assert list(totals) == ["token order", "pre-scan", "routing", "tail bias", "forward", "api", "torch"]
    assert totals["routing"] == pytest.approx(0.3) and totals["forward"] == pytest.approx(2.0)


def test_cli_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert B.main(["--small", "--device", "cpu", "--backend", "reference", "--calls", "1", "--routing", "adaptive",
                   "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["environment"]["gpu"].startswith("CPU")
    assert report["kwargs"]["routing"] == "adaptive" and report["kwargs"]["backend"] == "reference"
    assert report["phases"]["forward"] > 0  # the reference runs pooling, routing and attention itself
    assert sum(report["phases"].values()) == pytest.approx(sum(k["ms"] for k in report["kernels"]))
    assert all(k["name"].startswith("aten::") for k in report["kernels"])
    assert "| phase | ms per call | share |" in capsys.readouterr().out
