"""One truth about what runs where: the node's choice, its log line, install.py's report, README's
platform table and docs/fallbacks.md's platform table, for every platform row of the README.

Each platform is faked in-process (torch.cuda / torch.backends.mps / torch.version.hip and the
pack's Triton check are monkeypatched, so no GPU and no Triton compile is needed): the node's
`PisaState.backend_for` logs its sentence, install.py's `probe()` + `plan()` must print that same
sentence, and both documents must say "the Triton kernels" exactly where the node picks them.
"""
import logging

import pytest
import torch

from pisa_comfy import PisaSettings
from pisa_comfy.patch_state import PisaState
from pisa_kernels import backend
from workflow_graph import ROOT

NO_TRITON = "ModuleNotFoundError: No module named 'triton'"

#: README row -> faked platforms: (CUDA capability, or "mps" / "cpu"; ROCm?; Triton import error).
PLATFORMS = {
    "NVIDIA sm80–sm89 (A100, RTX 30/40) with Triton": [((8, 0), False, None), ((8, 6), False, None),
                                                       ((8, 9), False, None)],
    "NVIDIA sm90 (H100, H200) with Triton": [((9, 0), False, None)],
    "NVIDIA sm100/sm120 (B200, RTX 50) with Triton": [((10, 0), False, None), ((12, 0), False, None)],
    "NVIDIA below sm80 (V100, T4, RTX 20)": [((7, 0), False, None), ((7, 5), False, None)],
    "AMD ROCm": [((9, 4), True, None)],
    "Apple MPS": [("mps", False, None)],
    "CPU": [("cpu", False, None)],
    "any GPU without a usable Triton": [((9, 0), False, NO_TRITON), ((8, 6), False, NO_TRITON)],
}
CASES = [(row, *fake) for row, fakes in PLATFORMS.items() for fake in fakes]


def _fake_platform(monkeypatch, where, rocm, triton_error):
    cuda = isinstance(where, tuple)
    monkeypatch.delenv("PISA_BACKEND", raising=False)  # tests/comfy pins "reference" for its own tests
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read per call; the kernels are never imported here
    monkeypatch.setattr(backend, "triton_import_error", lambda: triton_error)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if cuda else 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: where)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Faked GPU")
    monkeypatch.setattr(torch.version, "hip", "6.2.0" if rocm else None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: where == "mps")
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    return torch.device("cuda", 0) if cuda else torch.device(where)


@pytest.fixture
def fresh_capability_cache():
    backend._cuda_reason.cache_clear()  # cached per device index: the faked GPUs must not leak
    yield
    backend._cuda_reason.cache_clear()


def _table_rows(path):
    """First cell -> second cell of every Markdown table row in ``path``."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and not set(cells[0]) <= set("-: "):
            rows[cells[0]] = cells[1]
    return rows


def _outcome(cell):
    for prefix, chosen in (("the Triton kernels", "triton"), ("dense", None)):
        if cell.startswith(prefix):
            return chosen
    raise AssertionError(f"platform cell {cell!r} says neither 'the Triton kernels' nor 'dense'")


def test_every_readme_platform_is_faked_here():
    readme = _table_rows(ROOT / "README.md")
    table = {k: v for k, v in readme.items() if k in PLATFORMS or k == "platform"}
    assert set(table) - {"platform"} == set(PLATFORMS)
    assert table["platform"] == "what the node runs"


@pytest.mark.parametrize("row, where, rocm, triton_error", CASES,
                         ids=[f"{row[:24]}-{fake[0]}" for row, *fake in CASES])
def test_install_report_docs_and_node_agree(row, where, rocm, triton_error, monkeypatch, caplog,
                                            fresh_capability_cache, install_script):
    device = _fake_platform(monkeypatch, where, rocm, triton_error)
    with caplog.at_level(logging.INFO, logger="pisa"):
        chosen = PisaState(PisaSettings()).backend_for(device)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("PISA runs on ")]
    assert len(logged) == 1, caplog.text
    sentence = logged[0]

    report = install_script.plan(install_script.probe())
    device_lines = [line for line in report if "PISA runs on " in line]
    assert len(device_lines) == 1, report
    assert device_lines[0].endswith(f"{sentence}."), (device_lines, sentence)
    if device.type == "cuda":
        kind = "ROCm" if rocm else f"sm{where[0]}{where[1]}"
        assert device_lines[0] == f"GPU 0 'Faked GPU' ({kind}): {sentence}."

    assert _outcome(_table_rows(ROOT / "README.md")[row]) == chosen
    assert _outcome(_table_rows(ROOT / "docs" / "fallbacks.md")[row]) == chosen
    expect = "triton" if isinstance(where, tuple) and where >= (8, 0) and not rocm and not triton_error else None
    assert chosen == expect
    if chosen is None:
        assert sentence.startswith(f"PISA runs on dense attention on {device} because ")
