"""scripts/install_torch.sh (setup_env.sh's torch choice) does what its header and the README say,
and its printed line names the rule and the reason.

The virtual environment is a fake: its `python` records pip calls instead of installing, answers
"import torch ..." as the case wants and runs everything else (the CPU-index probe, a stdlib-only
one-liner) with the real Python. `nvidia-smi` is a fake on PATH; the CPU index is a local HTTP
server (answers) or a closed local port (does not).
"""
import contextlib
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from workflow_graph import ROOT

CAP = Path("/etc/xdg/pip/constraints.txt")
CAPPED = CAP.is_file() and "torch<=2.14.1" in CAP.read_text()


@contextlib.contextmanager
def cpu_index(tmp_path):
    """A local "package index" with a torch/ page; yields its URL."""
    (tmp_path / "index" / "torch").mkdir(parents=True)
    (tmp_path / "index" / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "index"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes


def run(tmp_path, *, has_torch=False, gpu=False, index, spec=None):
    """(printed output, recorded pip argument lines) of install_torch.sh on a fake venv."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "pip.log"
    (bin_dir / "python").write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then shift 2; echo "$*" >> "{log}"; exit 0; fi
if [ "$1" = "-c" ] && [[ "$2" == "import torch"* ]]; then
  {"echo 'torch 9.9.9+fake'" if has_torch else "exit 1"}; exit 0
fi
exec "{sys.executable}" "$@"
""")
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "nvidia-smi").write_text(
        "#!/usr/bin/env bash\n" + ("echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n" if gpu else "exit 9\n"))
    for f in (bin_dir / "python", tmp_path / "path" / "nvidia-smi"):
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PISA_TORCH_SPEC"}
    env.update(PATH=f"{tmp_path / 'path'}{os.pathsep}{env['PATH']}", PISA_TORCH_CPU_INDEX=index)
    if spec is not None:
        env["PISA_TORCH_SPEC"] = spec
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install_torch.sh"), str(tmp_path / "venv")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, log.read_text().splitlines() if log.exists() else []


DEFAULT = ("install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1" if CAPPED
           else "install -q --disable-pip-version-check torch torchvision")


def test_keeps_the_torch_already_there(tmp_path):
    out, pip = run(tmp_path, has_torch=True, index=closed_port_url())
    assert out == f"torch: keep: torch 9.9.9+fake (already in {tmp_path / 'venv'})\n"
    assert pip == []


def test_installs_the_given_spec(tmp_path):
    out, pip = run(tmp_path, index=closed_port_url(), spec="torch==2.9.1 torchvision==0.24.1")
    assert out == "torch: spec: torch==2.9.1 torchvision==0.24.1 (PISA_TORCH_SPEC is set)\n"
    assert pip == ["install -q --disable-pip-version-check torch==2.9.1 torchvision==0.24.1"]


def test_cpu_build_where_the_cpu_index_answers_and_no_gpu(tmp_path):
    with cpu_index(tmp_path) as url:
        out, pip = run(tmp_path, index=url)
    assert out == f"torch: cpu: torch torchvision from {url} (no NVIDIA GPU, and that index answered)\n"
    assert pip == [f"install -q --disable-pip-version-check --index-url {url} torch torchvision"]


def test_default_where_the_cpu_index_does_not_answer(tmp_path):
    url = closed_port_url()
    out, pip = run(tmp_path, index=url)
    assert out.startswith("torch: default: ") and f"no NVIDIA GPU, but {url} did not answer within 10 s" in out
    assert ("torch==2.14.1" in out) == CAPPED and ("the CUDA build, several GB" in out) == (not CAPPED)
    assert pip == [DEFAULT]


@pytest.mark.parametrize("index_answers", [True, False])
def test_default_with_an_nvidia_gpu_whatever_the_index(tmp_path, index_answers):
    with cpu_index(tmp_path) if index_answers else contextlib.nullcontext(closed_port_url()) as url:
        out, pip = run(tmp_path, gpu=True, index=url)
    assert out.startswith("torch: default: ") and "(an NVIDIA GPU is present" in out
    assert pip == [DEFAULT]
