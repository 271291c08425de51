"""``python -m pisa_lab.bench``'s bookkeeping, on the CPU with its timers and kernels stood in for
(CI has no GPU): which rows get the pre-scan + routing share and the memory, and that the pre-scan
is timed once per routing and tail, its share given against every forward kernel's call."""

import torch

from pisa_lab import bench as B


def test_prescan_share_on_every_kernels_rows(monkeypatch):
    timed = []
    monkeypatch.setattr(B, "make_inputs", lambda data, b, h, n, d, seed, dev: tuple(torch.randn(b, n, h, d)
                                                                                   for _ in range(3)))
    monkeypatch.setattr(B, "sdpa", lambda q, k, v, backend: q)
    ms = {"triton": 4.0, "gluon": 2.0}
    monkeypatch.setattr(B, "pisa_attention", lambda q, k, v, backend, **kw: (q, backend))

    def fake_time(fn):  # a PISA call returns (q, its kernel); dense calls take 8 ms
        out = fn()
        return ms[out[1]] if isinstance(out, tuple) else 8.0

    monkeypatch.setattr(B, "time_ms", fake_time)
    monkeypatch.setattr(B, "peak_extra_mb", lambda fn: 1.0)
    monkeypatch.setattr(B, "prescan_routing_ms", lambda q, k, v, sp, block, ln, routing="topk":
                        timed.append((sp, ln, routing)) or 0.5)
    monkeypatch.setattr(B, "rel_l2", lambda out, ref: 0.0)
    monkeypatch.setattr(B, "_sol_attn", lambda: None)
    cpu = torch.device("cpu")
    monkeypatch.setattr(B.torch, "device", lambda name: cpu)
    rows = B.bench_shape("x", 64, 2, data="random", d=16, sparsities=(0.875, 0.9), tails=("plain", "lognormal"),
                         routings=("topk", "adaptive"), kernels=("triton", "gluon"))
    assert sorted(timed) == sorted((0.875, ln, r) for ln in (False, True) for r in ("topk", "adaptive"))
    shared = {r["method"] for r in rows if "prescan_routing_ms" in r}
    assert shared == {f"pisa-o1{t}{a}{k}" for t in ("", "+ln") for a in ("", "@adaptive") for k in ("", "/gluon")}
    assert all(r["sparsity"] == 0.875 and "extra_mem_mb" in r for r in rows if "prescan_routing_ms" in r)
    table = B.format_table(rows)
    assert "pre-scan + routing 0.50 ms = 25.0% of the call" in table  # against the Hopper kernel's 2 ms
    assert "pre-scan + routing 0.50 ms = 12.5% of the call" in table  # against the Triton kernel's 4 ms
