"""pyproject.toml carries what the Comfy Registry reads, and ComfyUI's own parser accepts it."""
import subprocess
import sys
import tomllib

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
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["DisplayName"] == "PISA Sparse Attention" and comfy["requires-comfyui"] == ">=0.3.64"
    for key in ("PublisherId", "Icon", "includes"):
        assert key in comfy
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "ComfyUI-PISA contributors" in (ROOT / "LICENSE").read_text()


def test_requirements_never_pin_torch():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not [ln for ln in lines if ln.split(";")[0].strip().lower().startswith(("torch", "torchvision"))]


@pytest.mark.parametrize("root", comfy_paths(), ids=lambda r: r.name)
def test_comfyui_config_parser_reads_it(root):
    require_comfy(root)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from comfy_config import config_parser as c; "
            "p = c.extract_node_configuration(sys.argv[2]); "
            "print(p.project.name, p.tool_comfy.display_name, p.project.supported_comfyui_version, "
            "p.project.supported_os, p.project.supported_accelerators, sep='|')")
    done = subprocess.run([sys.executable, "-c", code, str(root), str(ROOT)], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0 and "ModuleNotFoundError" in done.stderr:
        missing(f"ComfyUI's config parser needs its requirements: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split("|") == ["comfyui-pisa", "PISA Sparse Attention", ">=0.3.64",
                                              "['OS Independent']", "['GPU :: NVIDIA CUDA']"]
