"""``python -m pisa_lab.ab`` on the CPU (Triton's interpreter; CI has no GPU): a variant's module
file is what the call runs (a copy of the kernels gives the current output, a copy with one constant
changed does not), constants are set and everything is restored afterwards, and malformed variants
are refused."""

import sys
from pathlib import Path

import pytest
import torch

from pisa_kernels import triton_kernels
from pisa_lab import ab
from pisa_lab.bench_node_calls import FAMILIES, small

KERNELS = Path(triton_kernels.__file__)


def test_parse_variant():
    v = ab.parse_variant("main:triton_kernels=out/tk.py,triton_kernels.POOL_PROGRAMS_PER_SM=2")
    assert v == ab.Variant("main", (("triton_kernels", "out/tk.py"),), (("triton_kernels", "POOL_PROGRAMS_PER_SM", 2),))
    for bad in ("main", "current:triton_kernels.X=1", "x:triton_kernels", "x:triton_kernels.X=not a literal", ":a=b"):
        with pytest.raises(ValueError):
            ab.parse_variant(bad)


def test_applied_swaps_and_restores():
    before = sys.modules["pisa_kernels.triton_kernels"], triton_kernels.POOL_PROGRAMS_PER_SM
    var = ab.Variant("x", (("triton_kernels", str(KERNELS)),), (("routing", "ROUTING_CHUNK_BYTES", 123),))
    import pisa_kernels
    from pisa_kernels import routing

    with ab.applied(var):
        swapped = sys.modules["pisa_kernels.triton_kernels"]
        assert swapped is not before[0] and pisa_kernels.triton_kernels is swapped
        assert routing.ROUTING_CHUNK_BYTES == 123
    assert sys.modules["pisa_kernels.triton_kernels"] is before[0] and pisa_kernels.triton_kernels is before[0]
    assert routing.ROUTING_CHUNK_BYTES != 123
    with pytest.raises(ValueError, match="has no"):
        with ab.applied(ab.Variant("y", (), (("routing", "NO_SUCH_NAME", 1),))):
            pass


def test_the_swapped_file_is_what_runs(tmp_path, monkeypatch, triton_device):
    timed = []
    monkeypatch.setattr(ab, "timer_for", lambda device: lambda fn: (fn(), timed.append(device))[1] or 1.0)
    same = tmp_path / "same.py"
    same.write_text(KERNELS.read_text())
    changed = tmp_path / "changed.py"
    text = KERNELS.read_text()
    assert "_LOG2E_IN_KERNEL = tl.constexpr(LOG2E)" in text
    changed.write_text(text.replace("_LOG2E_IN_KERNEL = tl.constexpr(LOG2E)", "_LOG2E_IN_KERNEL = tl.constexpr(LOG2E * 1.5)"))
    variants = [ab.Variant("same", (("triton_kernels", str(same)),)), ab.Variant("changed", (("triton_kernels", str(changed)),)),
                ab.Variant("chunks", (), (("triton_kernels", "POOL_PROGRAMS_PER_SM", 1),))]
    row = ab.ab_case("wan720", "adaptive", variants, fam=small(FAMILIES["wan720"]), reps=1, device=triton_device,
                     backend="triton", dtype=torch.float16)  # (Triton 3.8's interpreter gets bf16 dots wrong)
    assert row["err"]["current"] == 0.0
    assert row["err"]["same"] < 1e-5 and row["err"]["chunks"] < 1e-5  # (the moment's atomics: rounding only)
    assert row["err"]["changed"] > 1e-3
    assert row["tiles_equal"] == {"current": True, "same": True, "changed": True, "chunks": True}
    assert row["ms"] == {label: [1.0] for label in ("current", "same", "changed", "chunks")} and len(timed) == 4
    assert "| wan720 adaptive |" in ab.format_rows([row])


def test_cli_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ab.main(["--variant", "x:triton_kernels.POOL_PROGRAMS_PER_SM=8"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
