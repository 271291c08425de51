"""The node definitions the packaging tests validate against, from the ComfyUI checkouts that
``prerequisites.comfy_paths`` names ($COMFYUI_PATH, $PISA_EXTRA_COMFYUI).  The definitions come
from `comfy_defs.py` in a subprocess (ComfyUI's own loader, this pack included), once per session.

Tests are parametrized over the configured checkouts, present or not (``comfy_paths``): a missing
one is a missing prerequisite that the test reports (a skip, a failure under CI=true), where a
parameter list of only the present checkouts was empty without ComfyUI and pytest skipped the test
as "got empty parameter set" (issue 18).
"""
import functools
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

from prerequisites import comfy_missing, missing, require_comfy
from workflow_graph import ROOT

HERE = Path(__file__).resolve().parent


def checkout_version(root):
    """The checkout's version as a tuple of ints, e.g. (0, 19, 3); (0,) when it does not say."""
    text = (Path(root) / "comfyui_version.py").read_text() if (Path(root) / "comfyui_version.py").is_file() else ""
    match = re.search(r'__version__ = "([\d.]+)"', text)
    return tuple(int(x) for x in match[1].split(".") if x) if match else (0,)


@functools.lru_cache(maxsize=None)
def comfy_defs(root):
    """Node definitions of one ComfyUI checkout, or the reason they are unavailable (str)."""
    reason = comfy_missing(root)
    if reason:
        return reason
    try:
        done = subprocess.run([sys.executable, str(HERE / "comfy_defs.py"), str(root), str(ROOT)],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return f"loading ComfyUI at {root} timed out"
    if done.returncode != 0 or "@@DEFS@@" not in done.stdout:
        return f"ComfyUI at {root} did not load (rc {done.returncode}): {done.stderr.strip()[-800:]}"
    return json.loads(done.stdout.split("@@DEFS@@", 1)[1])


def loaded_defs(root):
    """``comfy_defs(root)``, or :func:`prerequisites.missing` with the reason it is unavailable (no
    checkout, or ComfyUI cannot start: its requirements are not installed)."""
    defs = comfy_defs(require_comfy(root))
    if isinstance(defs, str):
        missing(defs)
    return defs


def import_pack_node():
    """PISAPatch's definition from this repository's nodes.py, imported as ComfyUI would (a package)."""
    from comfy_defs import describe

    spec = importlib.util.spec_from_file_location("comfyui_pisa_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        return describe(module.NODE_CLASS_MAPPINGS["PISAPatch"])
    except Exception as e:
        sys.modules.pop(spec.name, None)
        return f"importing the pack without ComfyUI failed: {type(e).__name__}: {e}"
