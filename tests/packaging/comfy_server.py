"""A headless ComfyUI server with only this pack loaded, for the browser and install-route tests.

Why this setup: `--cpu` and an in-memory database keep it hermetic; the pack is symlinked into a
temporary custom_nodes folder named by an extra-model-paths YAML (or, for a pack an install route
put into the checkout's own custom_nodes, loaded from there), and `--disable-all-custom-nodes
--whitelist-custom-nodes` makes sure nothing else from the checkout loads. Empty placeholder files
carry the bundled workflows' model names, so the front-end finds no "missing models" and the
server's prompt validation sees every file combo satisfied; real model files can be put under `<tmp>/models/<folder>`
before the server starts (every folder there is named in the YAML). Checkouts other than the main one
pin other front-end packages; `scripts/setup_env.sh` installs those to
`<venv>/comfy-frontends/<checkout folder>`, which goes first on that server's PYTHONPATH. The server is
always killed.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PACK_NAME = "ComfyUI-PISA"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, data=None, method=None, timeout=30):
    """(status, parsed JSON or text) of one request; HTTP errors are returned, not raised."""
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _layout(tmp, pack_dir, model_files):
    """custom_nodes/<pack> symlink (none for pack_dir None), placeholder models, user/output dirs
    and the YAML naming them."""
    (tmp / "custom_nodes").mkdir(parents=True)
    if pack_dir is not None:
        (tmp / "custom_nodes" / PACK_NAME).symlink_to(pack_dir, target_is_directory=True)
    for name, directory in model_files:
        (tmp / "models" / directory).mkdir(parents=True, exist_ok=True)
        (tmp / "models" / directory / name).write_bytes(b"")
    for d in ("user", "output", "input"):
        (tmp / d).mkdir()
    folders = sorted(p.name for p in (tmp / "models").iterdir() if p.is_dir()) if (tmp / "models").is_dir() else []
    lines = ["pisa_test:", f"  base_path: {tmp}", "  custom_nodes: custom_nodes"]
    lines += [f"  {k}: models/{k}" for k in folders]
    (tmp / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def comfy_server(root, pack_dir, tmp, model_files=(), env=None, start_timeout=240):
    """Yield the base URL of a running server; the log is at tmp/server.log.  ``pack_dir`` None: the
    pack is already in ``root``/custom_nodes/ComfyUI-PISA.  ``env``: extra environment variables of
    the server."""
    _layout(tmp, pack_dir, model_files)
    server_env = {**os.environ, **(env or {})}
    frontends = Path(sys.prefix) / "comfy-frontends" / Path(root).name
    if frontends.is_dir():
        server_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(frontends), server_env.get("PYTHONPATH")]))
    port = free_port()
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--database-url", "sqlite:///:memory:", "--extra-model-paths-config", str(tmp / "extra_model_paths.yaml"),
           "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME, "--disable-auto-launch",
           "--output-directory", str(tmp / "output"), "--input-directory", str(tmp / "input"),
           "--user-directory", str(tmp / "user")]
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=server_env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode}; log: {tmp / 'server.log'}")
            try:
                if http(url + "/system_stats", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"ComfyUI did not answer within {start_timeout}s; log: {tmp / 'server.log'}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()
