"""install.py (run by ComfyUI-Manager after pip): it must exit 0 and say what runs where in every
environment, including one without torch; the decision table is checked on synthetic probes."""
import importlib.util
import os
import subprocess
import sys

import pytest

from workflow_graph import ROOT


def _install_module():
    spec = importlib.util.spec_from_file_location("pisa_install_script", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert any(s in out for s in ("Triton kernels", "PyTorch reference path")), out


def test_runs_without_torch(tmp_path):
    blocker = tmp_path / "torch"
    blocker.mkdir()
    (blocker / "__init__.py").write_text('raise ImportError("torch made unimportable by the test")\n')
    rc, out = _run({"PYTHONPATH": str(tmp_path)}, tmp_path)
    assert rc == 0, out
    assert "ComfyUI's torch is missing" in out


def _info(**over):
    info = {"os": "Linux", "python": "/py/python", "torch": "2.9.1+cu128", "torch_error": None, "hip": False,
            "gpus": [("NVIDIA H100", (9, 0), None)], "triton": "3.5.1", "triton_error": None}
    info.update(over)
    return info


NO_TRITON = {"triton": None, "triton_error": "ModuleNotFoundError",
             "gpus": [("NVIDIA H100", (9, 0), "Triton is not usable (ModuleNotFoundError)")]}


@pytest.mark.parametrize("over, expect", [
    ({}, "GPU 'NVIDIA H100' (sm90): Triton kernels (fast path)"),
    ({"gpus": [("Tesla T4", (7, 5), "GPU capability sm75 is below sm80")]}, "reference path (GPU capability sm75 is below sm80)"),
    (NO_TRITON, "install a CUDA build of torch"),
    ({"gpus": []}, "reference path on the CPU"),
    ({"hip": True, "gpus": [("AMD MI300", (9, 4), "ROCm GPU: the Triton kernels are only validated on NVIDIA GPUs")]},
     "reference path (ROCm GPU"),
    ({**NO_TRITON, "os": "Windows"}, '"triton-windows<3.6"'),
    ({"torch": None, "torch_error": "ModuleNotFoundError"}, "ComfyUI's torch is missing"),
])
def test_plan_says_what_runs_where(over, expect):
    text = "\n".join(_install_module().plan(_info(**over)))
    assert expect in text


def test_fallback_rule_without_the_pack():
    mod = _install_module()
    assert mod._fallback_reason(_info(), (9, 0)) is None
    assert "below sm80" in mod._fallback_reason(_info(), (7, 5))
    assert mod._fallback_reason(_info(triton=None, triton_error="x"), (9, 0)).startswith("Triton")


def test_windows_install_only_on_request(monkeypatch):
    mod = _install_module()
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
