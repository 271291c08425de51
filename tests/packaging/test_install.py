"""install.py (run by ComfyUI-Manager after pip): it must exit 0 and say what runs where in every
environment, including one without torch; its advice is checked on synthetic probes.  That its
"what runs where" is the node's own decision is pinned in test_platforms.py."""
import os
import subprocess
import sys

import pytest

from workflow_graph import ROOT


def _run(env_extra=None, tmp_path=None):
    env = {k: v for k, v in os.environ.items() if k != "PISA_INSTALL_TRITON"}
    env.update(env_extra or {})
    done = subprocess.run([sys.executable, str(ROOT / "install.py")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path or ROOT)
    return done.returncode, done.stdout + done.stderr


def test_runs_and_reports_here(tmp_path):
    rc, out = _run(tmp_path=tmp_path)
    assert rc == 0, out
    assert "[ComfyUI-PISA]" in out and "torch" in out
    assert "PISA runs on " in out, out


def test_runs_without_torch(tmp_path):
    blocker = tmp_path / "torch"
    blocker.mkdir()
    (blocker / "__init__.py").write_text('raise ImportError("torch made unimportable by the test")\n')
    rc, out = _run({"PYTHONPATH": str(tmp_path)}, tmp_path)
    assert rc == 0, out
    assert "ComfyUI's torch is missing" in out


H100 = ("GPU 0 'NVIDIA H100' (sm90)", (9, 0), "triton",
        "PISA runs on triton on cuda:0 because the Triton kernels support this device")


def _info(**over):
    info = {"os": "Linux", "python": "/py/python", "torch": "2.9.1+cu128", "torch_error": None, "pack_error": None,
            "hip": False, "devices": [H100], "min_cc": (8, 0), "triton": "3.5.1", "triton_error": None}
    info.update(over)
    return info


NO_TRITON = {"triton": None, "triton_error": "ModuleNotFoundError: No module named 'triton'",
             "devices": [(H100[0], (9, 0), None, "PISA runs on dense attention on cuda:0 because Triton ...")]}
T4_NO_TRITON = {**NO_TRITON, "devices": [("GPU 0 'Tesla T4' (sm75)", (7, 5), None, "PISA runs on dense ...")]}
ROCM_NO_TRITON = {**NO_TRITON, "hip": True, "devices": [("GPU 0 'AMD MI300' (ROCm)", (9, 4), None, "dense ...")]}


@pytest.mark.parametrize("over, expect", [
    ({}, [f"{H100[0]}: {H100[3]}."]),
    (NO_TRITON, ["install a CUDA build of torch"]),
    ({**NO_TRITON, "os": "Windows"}, ['"triton-windows<3.6"']),
    ({"torch": None, "torch_error": "ModuleNotFoundError"}, ["ComfyUI's torch is missing"]),
    ({"pack_error": "SyntaxError: x"}, ["The pack does not import here (SyntaxError: x): PISA Patch will not load"]),
])
def test_plan_prints_the_node_sentence_and_the_fix(install_script, over, expect):
    text = "\n".join(install_script.plan(_info(**over)))
    for e in expect:
        assert e in text


@pytest.mark.parametrize("over", [{}, T4_NO_TRITON, ROCM_NO_TRITON], ids=["triton-works", "sm75", "rocm"])
def test_no_triton_advice_where_triton_would_not_help(install_script, over):
    """Installing Triton is advised only where it is the one thing missing (an NVIDIA sm80+ GPU)."""
    mod = install_script
    assert not mod.needs_triton(_info(**over))
    assert mod.needs_triton(_info(**NO_TRITON))


def test_windows_install_only_on_request(install_script, monkeypatch):
    mod = install_script
    calls = []
    monkeypatch.setattr(mod.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))
    info = _info(**NO_TRITON, os="Windows")
    monkeypatch.delenv("PISA_INSTALL_TRITON", raising=False)
    assert mod.maybe_install_triton_windows(info) == [] and calls == []
    monkeypatch.setenv("PISA_INSTALL_TRITON", "1")
    assert "installed" in mod.maybe_install_triton_windows(info)[0]
    assert calls == [["/py/python", "-m", "pip", "install", "-U", "triton-windows<3.6"]]
    assert mod.maybe_install_triton_windows(_info(os="Windows")) == []
