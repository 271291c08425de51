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
                            "pisa_kernels/hopper_kernel.py(520): attend", API, "bench.py(3): <module>"], "tail bias"),
    ("sm90_xmma_gemm_f32", [r"C:\x\pisa_kernels\routing.py(455): mass_bias",
                            r"C:\x\pisa_kernels\triton_kernels.py(330): tail_bias"], "tail bias"),  # Windows paths
    ("_pisa_fwd_kernel", ["pisa_kernels/triton_kernels.py(900): _launch", "pisa_kernels/triton_kernels.py(1040): attend",
                          API], "forward"),
    ("x", ["other_pkg/pisa_kernels_fork.py(1): f"], "torch"),  # not the library's folder
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


def _event(name, device_type, parent=None, us=0.0, eid=0):
    return SimpleNamespace(name=name, device_type=device_type, cpu_parent=parent, self_cpu_time_total=us, id=eid,
                           time_range=SimpleNamespace(elapsed_us=lambda us=us: us))


def test_cuda_profile_attribution_counts_every_kernel_once():
    """Each device event once, placed by the runtime call of its correlation id; an operator whose
    id collides with a correlation id (as torch's do) is no launch; a kernel without a launch goes
    by its name."""
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    api = _event(API, cpu)
    route = _event("pisa_kernels/routing.py(412): adaptive_route", cpu, api)
    pool = _event("pisa_kernels/triton_kernels.py(960): pool", cpu, api)
    gemm_op = _event("aten::baddbmm", cpu, route, eid=7)
    events = [
        api, route, pool, gemm_op,
        _event("cudaLaunchKernel", cpu, gemm_op, eid=101), _event("cudaLaunchKernel", cpu, gemm_op, eid=102),
        _event("cuLaunchKernelEx", cpu, pool, eid=103),
        _event("aten::fill_", cpu, api, eid=103),  # an operator's id equal to a correlation id: no launch
        _event("gemm_a", cuda, us=300.0, eid=101), _event("gemm_a", cuda, us=300.0, eid=102),
        _event("_pool_k_kernel", cuda, us=500.0, eid=103),
        _event("_pisa_fwd_hopper", cuda, us=4000.0, eid=999),  # no launch recorded: placed by its name
    ]
    prof = SimpleNamespace(events=lambda: events)
    rows = B.kernel_rows(prof, calls=2, device=torch.device("cuda"))
    got = {(r["name"], r["phase"]): (r["launches"], r["ms"]) for r in rows}
    assert got == {("gemm_a", "routing"): (1.0, 0.3), ("_pool_k_kernel", "pre-scan"): (0.5, 0.25),
                   ("_pisa_fwd_hopper", "forward"): (0.5, 2.0)}
    assert rows[0]["name"] == "_pisa_fwd_hopper"  # slowest first
    totals = B.phase_totals(rows)
    assert list(totals) == ["token order", "pre-scan", "routing", "tail bias", "forward", "api", "torch"]
    assert totals["routing"] == pytest.approx(0.3) and totals["forward"] == pytest.approx(2.0)
    assert B.has_frames(prof)
    assert not B.has_frames(SimpleNamespace(events=lambda: [e for e in events if ".py(" not in e.name]))


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


@pytest.mark.parametrize("order", ["drop", "0"])
def test_cli_order_override(order, tmp_path):
    # gpu_diag.sh's keep-or-drop row failed on the H200: "drop" went through int()
    out = tmp_path / "b.json"
    assert B.main(["--small", "--device", "cpu", "--backend", "reference", "--calls", "1", "--order", order,
                   "--json", str(out)]) == 0
    assert json.loads(out.read_text())["kwargs"]["order"] == order
