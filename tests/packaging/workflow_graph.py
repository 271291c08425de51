"""Checks on UI-format workflows against node definitions (the `INPUT_TYPES` ComfyUI serves).

Why these rules: the front-end maps `widgets_values` to widgets by position, in the order of the
node's inputs (required, then optional), skipping socket-only inputs and adding one
`control_after_generate` value after every seed. A wrong count silently shifts every later
value; a combo value the node does not offer fails only when the user queues the prompt.
"""
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ["fixed", "increment", "decrement", "randomize"]
# Front-end-only nodes: not in /object_info; one text widget.
VIRTUAL_NODES = {"Note", "MarkdownNote"}

# docs/architecture.md, "Node widgets (PISAPatch)": the fixed contract the bundled workflows follow.
PISA_CONTRACT = {
    "input": {"required": {
        "model": ["MODEL"],
        "sparsity": ["FLOAT", {"default": 0.875, "min": 0.0, "max": 0.99, "step": 0.005}],
        "block_size": [["64", "128"], {"default": "64"}],
        "taylor_order": [["1", "0", "drop"], {"default": "1"}],
        "dense_steps": ["INT", {"default": 10, "min": 0, "max": 10000}],
        "dense_blocks": ["STRING", {"default": "0"}],
        "min_tokens": ["INT", {"default": 8192, "min": 0, "max": 1000000, "step": 256}],
        "token_order": [["auto", "raster"], {"default": "auto"}],
        "routing": [["auto", "topk", "covariance", "adaptive"], {"default": "auto"}],
        "verbose": ["BOOLEAN", {"default": False}],
    }},
    "output": ["MODEL"],
}


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _spec(raw):
    type_, opts = raw[0], (raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {})
    if isinstance(type_, list):
        return "COMBO", list(type_), opts
    if type_ == "COMBO":
        return "COMBO", list(opts.get("options", [])), opts
    return type_, None, opts


def widget_specs(node_def):
    """Ordered (name, kind, choices, options) of the widgets a node def gives in the front-end."""
    specs = []
    order = node_def.get("input_order") or {k: list(v) for k, v in node_def["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            kind, choices, opts = _spec(node_def["input"][section][name])
            if kind not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            specs.append((name, kind, choices, opts))
            if kind == "INT" and opts.get("control_after_generate"):
                specs.append((name + ".control_after_generate", "COMBO", CONTROL_VALUES, {}))
    return specs


def socket_inputs(node_def):
    """{name: (type, required)} for inputs that are sockets, not widgets."""
    out = {}
    for section in ("required", "optional"):
        for name, raw in node_def["input"].get(section, {}).items():
            kind, _, opts = _spec(raw)
            if kind not in WIDGET_TYPES or opts.get("forceInput"):
                out[name] = (kind, section == "required")
    return out


def widget_errors(node, node_def):
    """Problems with one node's widgets_values; [] when valid. Declared model files count as present."""
    specs = widget_specs(node_def)
    values = node.get("widgets_values", [])
    if len(values) != len(specs):
        return [f"{len(values)} widget values, node has {len(specs)} widgets: {[s[0] for s in specs]}"]
    declared = {m["name"] for m in node.get("properties", {}).get("models", [])}
    errors = []
    for (name, kind, choices, opts), v in zip(specs, values):
        bad = None
        if kind == "COMBO":
            if v not in choices and v not in declared:
                bad = f"not one of {choices[:12]}" + ("" if choices else " (and not a declared model file)")
        elif kind == "BOOLEAN":
            bad = None if isinstance(v, bool) else "not a boolean"
        elif kind == "STRING":
            bad = None if isinstance(v, str) else "not a string"
        elif kind in ("INT", "FLOAT"):
            ok_type = isinstance(v, int) if kind == "INT" else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok_type or (isinstance(v, float) and not math.isfinite(v)):
                bad = f"not {kind}"
            elif not opts.get("min", -math.inf) <= v <= opts.get("max", math.inf):
                bad = f"outside [{opts.get('min')}, {opts.get('max')}]"
        if bad:
            errors.append(f"{name}={v!r}: {bad}")
    return errors


def socket_errors(node, node_def):
    """Socket names/types of a node against its definition, and unconnected required sockets."""
    want = socket_inputs(node_def)
    errors = []
    for i in node.get("inputs", []):
        if "widget" in i:  # a widget converted to an input: checked by widget_errors
            continue
        if i["name"] not in want:
            errors.append(f"input {i['name']!r} not in definition {sorted(want)}")
        elif i["type"] != want[i["name"]][0]:
            errors.append(f"input {i['name']!r} is {i['type']}, definition says {want[i['name']][0]}")
    linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
    errors += [f"required input {n!r} not connected" for n, (_, req) in want.items() if req and n not in linked]
    got_out = [o["type"] for o in node.get("outputs", [])]
    if got_out != list(node_def["output"]):
        errors.append(f"outputs {got_out}, definition says {node_def['output']}")
    return errors


def link_errors(wf):
    """Structural integrity: every link joins existing slots and both ends agree about it."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    errors = []
    if len(nodes) != len(wf["nodes"]):
        errors.append("duplicate node ids")
    if wf.get("last_node_id", 0) < max(nodes, default=0):
        errors.append("last_node_id below the largest node id")
    if wf.get("last_link_id", 0) < max((link[0] for link in wf["links"]), default=0):
        errors.append("last_link_id below the largest link id")
    for lid, src, sslot, dst, dslot, type_ in wf["links"]:
        if src not in nodes or dst not in nodes:
            errors.append(f"link {lid} joins missing nodes {src}->{dst}")
            continue
        out, inp = nodes[src]["outputs"][sslot], nodes[dst]["inputs"][dslot]
        if lid not in (out.get("links") or []) or inp.get("link") != lid:
            errors.append(f"link {lid} not recorded on both ends")
        if not out["type"] == inp["type"] == type_:
            errors.append(f"link {lid} types {out['type']}->{inp['type']} ({type_})")
    link_ids = {link[0] for link in wf["links"]}
    for n in wf["nodes"]:
        used = [i["link"] for i in n.get("inputs", []) if i.get("link") is not None]
        used += [lid for o in n.get("outputs", []) for lid in (o.get("links") or [])]
        errors += [f"node {n['id']} refers to missing link {lid}" for lid in used if lid not in link_ids]
    return errors


def model_paths(wf):
    """Every chain of MODEL links from a model source (no MODEL input) to a model sink (no MODEL output)."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    nxt = {}
    for _, src, _, dst, _, type_ in wf["links"]:
        if type_ == "MODEL":
            nxt.setdefault(src, []).append(dst)
    has_in = {n["id"] for n in wf["nodes"] if any(i["type"] == "MODEL" for i in n.get("inputs", []))}
    sources = [i for i, n in nodes.items() if i not in has_in and any(o["type"] == "MODEL" for o in n["outputs"])]
    paths = []

    def walk(path):
        succ = nxt.get(path[-1], [])
        if not succ:
            paths.append([nodes[i] for i in path])
        for s in succ:
            walk(path + [s])

    for s in sources:
        walk([s])
    return paths
