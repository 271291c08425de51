"""README's install routes, followed: each installs the pack from a git URL into a fresh copy of
ComfyUI's tree, runs what that route runs (requirements.txt, install.py), and a ComfyUI server
started on that tree then lists PISAPatch and serves the front-end extension.

Routes: ComfyUI-Manager's own CLI (`cm-cli install <git URL>`, the code path of the Manager's
"Install via Git URL"), comfy-cli (`comfy node install <git URL>`, which runs cm-cli), and
`git clone` + pip + install.py as README writes them.  The Registry route (`comfy node install
comfyui-pisa`) needs the network and a published pack; the URL routes need neither: the pack comes
from a local repository of this working tree (`file://localhost/...`: cm-cli takes only URLs with a
host), and both tools come from requirements-dev.txt.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prerequisites import comfy_paths, missing, require_comfy
from comfy_server import PACK_NAME, comfy_server, http
from workflow_graph import ROOT

BIN = Path(sys.executable).parent
TIMEOUT = 300


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.fixture(scope="module")
def pack_url(tmp_path_factory):
    """A one-commit git repository of the working tree as it is (tracked and untracked files that
    git does not ignore), named like the pack so every route installs it as custom_nodes/ComfyUI-PISA."""
    if shutil.which("git") is None:
        missing("git is not installed")
    try:
        listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    except subprocess.CalledProcessError as e:
        missing(f"the repository root is not a git work tree: {e.stderr.strip()}")
    repo = tmp_path_factory.mktemp("origin") / PACK_NAME
    for rel in filter(None, listed.split("\0")):
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    _git("init", "-q", "-b", "main", cwd=repo)
    _git("add", "-A", cwd=repo)
    _git("-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-q", "-m", "pack", cwd=repo)
    return f"file://localhost{repo}"


@pytest.fixture
def fresh_comfy(tmp_path):
    """A copy of the main ComfyUI checkout with nothing installed in its custom_nodes."""
    main = require_comfy(comfy_paths()[0])
    tree = tmp_path / "ComfyUI"
    # A __pycache__ there stays valid: copytree keeps mtimes.
    shutil.copytree(main, tree, symlinks=True, ignore=shutil.ignore_patterns(".git", "user", "output", "temp"))
    for extra in (tree / "custom_nodes").iterdir():
        if extra.is_dir():
            shutil.rmtree(extra)
    return tree


def _run(cmd, tmp_path, **env):
    """Run one route's command offline-capable and hermetic: HOME (comfy-cli's config, git's) in tmp."""
    full_env = {**os.environ, "HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1", **env}
    (tmp_path / "home").mkdir(exist_ok=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=full_env,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{out[-4000:]}"
    return out


def _tool(name):
    path = BIN / name
    if not path.is_file():
        missing(f"{name} is not installed next to {sys.executable} (requirements-dev.txt installs it)")
    return str(path)


def cm_cli(url, tree, tmp_path):
    return _run([_tool("cm-cli"), "install", "--exit-on-fail", url], tmp_path, COMFYUI_PATH=str(tree))


def comfy_cli(url, tree, tmp_path):
    # VIRTUAL_ENV: the Python comfy-cli hands to cm-cli (and pip), this one.
    return _run([_tool("comfy"), "--skip-prompt", "--no-enable-telemetry", "--workspace", str(tree), "node",
                 "install", "--exit-on-fail", url], tmp_path, VIRTUAL_ENV=sys.prefix)


def git_clone(url, tree, tmp_path):
    """README's git route, command by command."""
    nodes = tree / "custom_nodes"
    out = _run(["git", "clone", "-q", url, PACK_NAME], nodes)
    out += _run([sys.executable, "-m", "pip", "install", "-q", "-r", f"{PACK_NAME}/requirements.txt"], nodes)
    return out + _run([sys.executable, f"{PACK_NAME}/install.py"], nodes)


@pytest.mark.parametrize("route", [cm_cli, comfy_cli, git_clone], ids=lambda r: r.__name__)
def test_route_installs_a_pack_comfyui_loads(route, pack_url, fresh_comfy, tmp_path):
    out = route(pack_url, fresh_comfy, tmp_path)
    installed = fresh_comfy / "custom_nodes" / PACK_NAME
    assert (installed / "__init__.py").is_file() and (installed / "pyproject.toml").is_file(), out[-2000:]
    assert "[ComfyUI-PISA] PISA runs on " in out or "[ComfyUI-PISA] GPU 0 " in out, \
        f"install.py did not run or did not report:\n{out[-3000:]}"

    with comfy_server(fresh_comfy, None, tmp_path / "server") as url:
        status, info = http(url + "/object_info/PISAPatch")
        assert status == 200 and "PISAPatch" in info, (status, str(info)[:500])
        assert info["PISAPatch"]["display_name"] == "PISA Patch"
        status, js = http(f"{url}/extensions/{PACK_NAME}/pisa.js")
        assert status == 200 and "registerExtension" in js, (status, str(js)[:300])
    log = (tmp_path / "server" / "server.log").read_text(errors="replace")
    assert str(installed) in log and f"(IMPORT FAILED): {installed}" not in log, log[-3000:]
