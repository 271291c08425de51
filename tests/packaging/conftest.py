"""Fixtures of the packaging tests. This folder goes on sys.path for its helper modules
(`workflow_graph`, `comfy_checkouts`, `comfy_server`, `cdp`): the suite runs in importlib mode."""
import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from comfy_checkouts import comfy_defs, import_pack_node  # noqa: E402
from prerequisites import comfy_paths  # noqa: E402
from workflow_graph import ROOT  # noqa: E402


@pytest.fixture
def install_script():
    """install.py loaded as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("pisa_install_script", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pisa_def():
    """PISAPatch as a real ComfyUI loaded it, else as imported directly (which needs no ComfyUI:
    a missing checkout fails or skips the tests that need one, not the contract tests)."""
    reasons = []
    for root in comfy_paths():
        defs = comfy_defs(root)
        if isinstance(defs, dict) and defs["pack_loaded"]:
            return defs["nodes"]["PISAPatch"]
        reasons.append(defs if isinstance(defs, str) else f"ComfyUI {defs['version']} did not load the pack")
    direct = import_pack_node()
    if isinstance(direct, dict):
        return direct
    pytest.fail("PISAPatch definition unavailable: " + "; ".join(reasons + [direct]), pytrace=False)
