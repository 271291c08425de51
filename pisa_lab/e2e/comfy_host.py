"""Importing ComfyUI and this pack the way ComfyUI does, outside ComfyUI's server: the tests reuse
these loaders, so what is measured and what is tested is the same import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import json
import os
import sys
import types
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


WORKFLOWS = REPO / "workflows"


#: The name ComfyUI would import the repository under (its folder name); tests use the same one.  A
#: name that is not an identifier proves that nothing in the pack depends on its own package name.
PACK_NAME = "ComfyUI-PISA"


class _UnavailableModule(types.ModuleType):
    """Stand-in for an optional package that ComfyUI imports at module level but this script never
    uses: any attribute access fails loudly, so it cannot silently change what is measured."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self.__name__}.{name}: {self.__name__.split('.')[0]} is not installed; "
                             f"pisa_lab.e2e put a stub in its place (see _STUBBED_IF_MISSING)")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path, target=None):
        if fullname == self.root or fullname.startswith(self.root + "."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _UnavailableModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


#: Packages stubbed only when they are not installed.  comfy_aimdo (ComfyUI >= 0.4, "DynamicVRAM")
#: is imported at module level by comfy.ops, comfy.model_patcher and comfy.pinned_memory, but only
#: used once main.py has enabled it (comfy.memory_management.aimdo_enabled), which this script
#: never does.  comfy_kitchen needs no stub: comfy.quant_ops already guards its import.
_STUBBED_IF_MISSING = ("comfy_aimdo",)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def comfy_root(explicit: str | None = None) -> Path:
    root = Path(explicit or os.environ.get("COMFYUI_PATH") or Path.home() / "comfy" / "ComfyUI").expanduser()
    if not (root / "comfy" / "model_patcher.py").is_file():
        raise SystemExit(f"no ComfyUI checkout at {root}: set COMFYUI_PATH or pass --comfy")
    return root.resolve()


def comfy_version(root: Path) -> str:
    path = root / "comfyui_version.py"
    text = path.read_text() if path.is_file() else ""
    return text.split('__version__ = "', 1)[1].split('"', 1)[0] if '__version__ = "' in text else "unknown"


def import_comfy(root: Path, cpu: bool) -> types.SimpleNamespace:
    """Import the parts of ComfyUI this script needs (and nothing that pulls the server, the
    samplers' ``torchsde`` or media packages)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    stubbed = []
    for name in _STUBBED_IF_MISSING:
        if name not in sys.modules and not _installed(name):
            sys.meta_path.insert(0, _StubFinder(name))
            stubbed.append(name)
    from comfy.cli_args import args

    if cpu and "comfy.model_management" not in sys.modules:
        args.cpu = True  # must precede the first import of comfy.model_management
    import comfy.ldm.modules.attention as attention
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.patcher_extension
    import comfy.sampler_helpers
    import comfy.supported_models

    return types.SimpleNamespace(
        root=root, version=comfy_version(root), stubbed=stubbed, attention=attention,
        model_detection=comfy.model_detection, model_management=comfy.model_management,
        model_patcher=comfy.model_patcher, ops=comfy.ops, patcher_extension=comfy.patcher_extension,
        sampler_helpers=comfy.sampler_helpers)


def load_pack():
    """The repository imported as ComfyUI's custom-node loader imports it (a package named after
    its folder), so the node and its relative imports run exactly as inside ComfyUI."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(PACK_NAME, None)
        raise
    return module


def node_widget_names(node_cls) -> list[str]:
    return [k for k in node_cls.INPUT_TYPES()["required"] if k != "model"]


def node_defaults(node_cls) -> dict:
    """The PISAPatch widgets at their defaults, read from the node itself."""
    required = node_cls.INPUT_TYPES()["required"]
    return {k: required[k][1]["default"] for k in node_widget_names(node_cls)}


def read_workflow(name: str | None, node_cls) -> dict | None:
    """Steps and PISA widgets of a bundled UI-format workflow (its first sampler and PISA node)."""
    if not name or not (WORKFLOWS / name).is_file():
        return None
    nodes = json.loads((WORKFLOWS / name).read_text())["nodes"]
    out = {"file": name}
    for n in nodes:
        values = n.get("widgets_values") or []
        if n["type"] == "KSampler" and "steps" not in out:
            out.update(steps=int(values[2]), cfg=float(values[3]), sampler=values[4], scheduler=values[5])
        elif n["type"] == "KSamplerAdvanced" and "steps" not in out:
            out.update(steps=int(values[3]), cfg=float(values[4]), sampler=values[5], scheduler=values[6])
        elif n["type"] == "PISAPatch" and "pisa" not in out:
            out["pisa"] = dict(zip(node_widget_names(node_cls), values))
    return out
