"""pyproject.toml carries what the Comfy Registry reads, valid and consistent, and the Registry's own
parsers accept it: ComfyUI's `comfy_config` (in the checkout) and comfy-cli's `comfy node validate`."""
import copy
import os
import re
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from prerequisites import comfy_paths, missing, require_comfy
from workflow_graph import ROOT


def _config():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_registry_fields():
    cfg = _config()
    project, comfy = cfg["project"], cfg["tool"]["comfy"]
    assert project["name"] == "comfyui-pisa" and project["version"] == "0.1.0"
    assert project["license"] == {"file": "LICENSE"} and (ROOT / "LICENSE").is_file()
    assert project["requires-python"] == ">=3.10"
    assert sorted(project["dependencies"]) == ["numpy", "safetensors"]
    assert {"Operating System :: OS Independent", "Environment :: GPU :: NVIDIA CUDA"} <= set(project["classifiers"])
    assert comfy["DisplayName"] == "PISA Sparse Attention" and comfy["requires-comfyui"] == ">=0.3.64"
    assert comfy["includes"] == []
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "ComfyUI-PISA contributors" in (ROOT / "LICENSE").read_text()


#: Registry rules (docs.comfy.org/registry/specifications): node id < 100 characters of letters, digits,
#: "-", "_", "." without two special characters in a row, starting with a letter; publisher ids are
#: lower-case letters, digits and "-".
NODE_ID = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9])){0,98}$")
PUBLISHER_ID = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
GITHUB_REPO = re.compile(r"^https://github\.com/([A-Za-z0-9](?:[A-Za-z0-9-]{0,38}))/([A-Za-z0-9._-]+)$")
ICON = "docs/img/icon.png"
ICON_MAX = (400, 400)  # the Registry allows 800 x 400; square icons are shown at up to 400


def icon_url(repository):
    """The raw URL of the icon file in the repository (branch main)."""
    owner, name = GITHUB_REPO.match(repository).groups()
    return f"https://raw.githubusercontent.com/{owner}/{name}/main/{ICON}"


def metadata_problems(cfg, readme):
    """What would make the Registry metadata unpublishable or inconsistent ([] when none)."""
    problems = []
    name, urls, comfy = cfg["project"].get("name", ""), cfg["project"].get("urls", {}), cfg["tool"]["comfy"]
    if not NODE_ID.match(name):
        problems.append(f"project.name {name!r} is not a Registry node id")
    if not PUBLISHER_ID.match(comfy.get("PublisherId", "")):
        problems.append(f"PublisherId {comfy.get('PublisherId')!r} is empty or malformed")
    repository = urls.get("Repository", "")
    if not GITHUB_REPO.match(repository) or repository.endswith(".git"):
        return problems + [f"Repository {repository!r} is not https://github.com/<owner>/<name>"]
    problems += [f"[project.urls] {k} = {v!r} is a second repository URL" for k, v in urls.items()
                 if k != "Repository" and not v.startswith(repository)]
    if comfy.get("Icon") != icon_url(repository):
        problems.append(f"Icon {comfy.get('Icon')!r} is not {icon_url(repository)!r}")
    if f"git clone {repository} ComfyUI-PISA" not in readme:
        problems.append("README's git route does not clone the Repository URL")
    return problems


def test_registry_metadata_is_consistent_and_well_formed():
    assert metadata_problems(_config(), (ROOT / "README.md").read_text()) == []


@pytest.mark.parametrize("path, value", [
    (("project", "urls", "Repository"), ""),
    (("project", "urls", "Repository"), "github.com/set-before-publishing/ComfyUI-PISA"),
    (("project", "urls", "Repository"), "https://github.com/set-before-publishing/ComfyUI-PISA.git"),
    (("project", "urls", "Repository"), "https://github.com/another/ComfyUI-PISA"),
    (("project", "urls", "Documentation"), "https://example.org/docs"),
    (("tool", "comfy", "PublisherId"), ""),
    (("tool", "comfy", "PublisherId"), "Comfy PISA"),
    (("tool", "comfy", "Icon"), ""),
    (("project", "name"), "comfyui--pisa"),
])
def test_a_bad_value_is_caught(path, value):
    cfg = copy.deepcopy(_config())
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert metadata_problems(cfg, (ROOT / "README.md").read_text())


def test_icon_is_a_small_png_in_the_repository():
    data = (ROOT / ICON).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 0 < width <= ICON_MAX[0] and 0 < height <= ICON_MAX[1]


def test_requirements_never_pin_torch():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not [ln for ln in lines if ln.split(";")[0].strip().lower().startswith(("torch", "torchvision"))]


@pytest.mark.parametrize("root", comfy_paths(), ids=lambda r: r.name)
def test_comfyui_config_parser_reads_it(root):
    require_comfy(root)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from comfy_config import config_parser as c; "
            "p = c.extract_node_configuration(sys.argv[2]); t = p.tool_comfy; "
            "print(p.project.name, t.display_name, t.publisher_id, t.icon, p.project.urls.repository, "
            "p.project.supported_comfyui_version, p.project.supported_os, p.project.supported_accelerators, "
            "sep='|')")
    done = subprocess.run([sys.executable, "-c", code, str(root), str(ROOT)], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0 and "ModuleNotFoundError" in done.stderr:
        missing(f"ComfyUI's config parser needs its requirements: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    cfg = _config()
    assert done.stdout.strip().split("|") == [
        "comfyui-pisa", "PISA Sparse Attention", cfg["tool"]["comfy"]["PublisherId"], cfg["tool"]["comfy"]["Icon"],
        cfg["project"]["urls"]["Repository"], ">=0.3.64", "['OS Independent']", "['GPU :: NVIDIA CUDA']"]


def _comfy_cli():
    """comfy-cli's entry point next to this Python (requirements-dev.txt installs it), else None."""
    found = Path(sys.executable).with_name("comfy")
    return str(found) if found.is_file() else None


@pytest.mark.skipif(_comfy_cli() is None, reason="comfy-cli is not installed (requirements-dev.txt installs it)")
def test_comfy_cli_validate_accepts_it(tmp_path):
    """`comfy node validate`: comfy-cli's Registry parser (it warns, and drops the value, on a bad
    classifier or version) and its pre-publish security scan; both run offline."""
    env = {**os.environ, "HOME": str(tmp_path)}  # comfy-cli writes its config below HOME
    done = subprocess.run([_comfy_cli(), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "All validation checks passed" in out and "Warning" not in out and "Security warnings" not in out, out
    code = ("import sys; from comfy_cli.registry.config_parser import extract_node_configuration as x; "
            "p = x(sys.argv[1]); print(p.project.name, p.project.version, p.project.supported_comfyui_version, "
            "p.project.supported_os, p.project.supported_accelerators, p.tool_comfy.publisher_id, "
            "p.tool_comfy.icon, p.project.urls.repository, sep='|')")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "pyproject.toml")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Warning" not in done.stdout, done.stdout + done.stderr
    cfg = _config()
    assert done.stdout.strip().split("|") == [
        "comfyui-pisa", "0.1.0", ">=0.3.64", "['OS Independent']", "['GPU :: NVIDIA CUDA']",
        cfg["tool"]["comfy"]["PublisherId"], cfg["tool"]["comfy"]["Icon"], cfg["project"]["urls"]["Repository"]]
