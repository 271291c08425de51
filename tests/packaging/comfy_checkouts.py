"""ComfyUI checkouts and node definitions the packaging tests validate against.

Checkouts: $COMFYUI_PATH (default ~/comfy/ComfyUI) and the space-separated $PISA_EXTRA_COMFYUI
(default ~/comfy/ComfyUI-v0.3.64), where they exist. Their node definitions come from
`comfy_defs.py` in a subprocess (ComfyUI's own loader, this pack included), once per session.
"""
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from workflow_graph import ROOT

HERE = Path(__file__).resolve().parent


def comfy_roots():
    first = os.environ.get("COMFYUI_PATH") or str(Path.home() / "comfy" / "ComfyUI")
    extra = os.environ.get("PISA_EXTRA_COMFYUI", str(Path.home() / "comfy" / "ComfyUI-v0.3.64"))
    return [Path(p) for p in [first, *extra.split()] if (Path(p) / "main.py").is_file()]


def checkout_version(root):
    """The checkout's version as a tuple of ints, e.g. (0, 19, 3); (0,) when it does not say."""
    text = (Path(root) / "comfyui_version.py").read_text() if (Path(root) / "comfyui_version.py").is_file() else ""
    match = re.search(r'__version__ = "([\d.]+)"', text)
    return tuple(int(x) for x in match[1].split(".") if x) if match else (0,)


@functools.lru_cache(maxsize=None)
def comfy_defs(root):
    """Node definitions of one ComfyUI checkout, or the reason they are unavailable (str)."""
    try:
        done = subprocess.run([sys.executable, str(HERE / "comfy_defs.py"), str(root), str(ROOT)],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return f"loading ComfyUI at {root} timed out"
    if done.returncode != 0 or "@@DEFS@@" not in done.stdout:
        return f"ComfyUI at {root} did not load (rc {done.returncode}): {done.stderr.strip()[-800:]}"
    return json.loads(done.stdout.split("@@DEFS@@", 1)[1])


def import_pack_node():
    """PISAPatch's definition from this repository's nodes.py, imported as ComfyUI would (a package)."""
    from comfy_defs import describe

    if not (ROOT / "nodes.py").is_file() or not (ROOT / "__init__.py").is_file():
        return "the pack's nodes.py / __init__.py do not exist yet"
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
