"""Dump a ComfyUI checkout's node definitions (what `GET /object_info` serves) as JSON.

Run as a script in a subprocess: `python comfy_defs.py <comfyui_root> <pack_dir>`. Importing `comfy`
initialises devices and registers global state, so the pytest process never does it itself, and
each ComfyUI version gets a clean interpreter. The pack is loaded through ComfyUI's own custom-node
loader, so PISAPatch's definition is exactly what a user's ComfyUI would see.

Output: {"version": str, "pack_loaded": bool, "nodes": {type: {"input": INPUT_TYPES(),
"input_order": {...}, "output": [...], "output_name": [...]}}}; values that are not JSON become
their repr (file lists are real lists, so combo checks still work).
"""
import asyncio
import json
import os
import sys


def describe(cls):
    inputs = cls.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {k: list(v) for k, v in inputs.items() if isinstance(v, dict)},
        "output": list(getattr(cls, "RETURN_TYPES", ())),
        "output_name": list(getattr(cls, "RETURN_NAMES", None) or getattr(cls, "RETURN_TYPES", ())),
    }


def main(comfy_root, pack_dir):
    sys.path.insert(0, comfy_root)
    os.chdir(comfy_root)
    import utils  # noqa: F401  main.py imports ComfyUI's `utils` package first; later `comfy/utils.py` can shadow it
    from comfy.cli_args import args

    args.cpu = True
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    before = set(nodes.NODE_CLASS_MAPPINGS)
    pack_loaded = asyncio.run(nodes.load_custom_node(pack_dir)) and "PISAPatch" in nodes.NODE_CLASS_MAPPINGS
    defs = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        try:
            defs[name] = describe(cls)
        except Exception as e:  # one broken optional node must not hide the others
            defs[name] = {"error": repr(e)}
    import comfyui_version

    out = {"version": comfyui_version.__version__, "pack_loaded": bool(pack_loaded),
           "pack_nodes": sorted(set(nodes.NODE_CLASS_MAPPINGS) - before), "nodes": defs}
    sys.stdout.write("\n@@DEFS@@" + json.dumps(out, default=repr))


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]))
