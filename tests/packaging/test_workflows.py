"""The bundled workflows: they parse, their links are consistent, every node type exists with valid
widget values (PISAPatch against its contract and its real definition; core nodes against every
available ComfyUI checkout), every model reaches its sampler through a PISA Patch (the A/B workflow
keeps one dense reference), and the files are what scripts/build_workflows.py generates."""
import importlib.util

import pytest

from comfy_checkouts import loaded_defs
from prerequisites import comfy_paths
from workflow_graph import (PISA_CONTRACT, ROOT, VIRTUAL_NODES, WORKFLOWS, link_errors, load, model_paths,
                            socket_errors, widget_errors, widget_specs)

AB = [p for p in WORKFLOWS if "_ab_" in p.name]
FAMILY = [p for p in WORKFLOWS if p not in AB]
ids = [p.stem for p in WORKFLOWS]


def _generator():
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "scripts" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_is_complete_and_generated():
    gen = _generator()
    assert sorted(p.name for p in WORKFLOWS) == sorted(gen.WORKFLOWS)
    assert len(FAMILY) == 5 and len(AB) == 1
    for p in WORKFLOWS:
        assert p.read_text(encoding="utf-8") == gen.render(p.name), \
            f"{p.name} differs from scripts/build_workflows.py: run `python scripts/build_workflows.py`"


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids)
def test_parses_with_consistent_links(path):
    wf = load(path)
    assert wf["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in wf, key
    for n in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in n, (n.get("id"), key)
    assert link_errors(wf) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids)
def test_pisa_nodes_follow_the_widget_contract(path):
    nodes = [n for n in load(path)["nodes"] if n["type"] == "PISAPatch"]
    assert nodes
    for n in nodes:
        assert widget_errors(n, PISA_CONTRACT) == [], n["id"]
        assert socket_errors(n, PISA_CONTRACT) == [], n["id"]


@pytest.mark.parametrize("path", FAMILY, ids=[p.stem for p in FAMILY])
def test_every_model_reaches_its_sampler_through_pisa(path):
    paths = model_paths(load(path))
    assert paths
    for p in paths:
        assert any(n["type"] == "PISAPatch" for n in p), " -> ".join(n["type"] for n in p)


@pytest.mark.parametrize("path", AB, ids=[p.stem for p in AB])
def test_ab_workflow_compares_like_with_like(path):
    paths = model_paths(load(path))
    patched = [p for p in paths if any(n["type"] == "PISAPatch" for n in p)]
    dense = [p for p in paths if p not in patched]
    assert len(patched) == 1 and len(dense) == 1, "one dense reference and one PISA sampler"
    assert patched[0][0] is dense[0][0], "both samplers use the same model loader"
    a, b = dense[0][-1], patched[0][-1]
    assert a["type"] == b["type"] and a["widgets_values"] == b["widgets_values"], "same seed and settings"


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids)
def test_note_names_files_and_points_to_benchmarks(path):
    wf = load(path)
    notes = [n for n in wf["nodes"] if n["type"] in VIRTUAL_NODES]
    assert len(notes) == 1 and len(notes[0]["widgets_values"]) == 1
    text = notes[0]["widgets_values"][0]
    assert "README" in text and "benchmark" in text.lower()
    for n in wf["nodes"]:
        for m in n["properties"].get("models", []):
            assert m["name"] in n["widgets_values"] and m["url"].startswith("https://")
            assert m["name"] in text and f"`{m['directory']}/`" in text


@pytest.mark.parametrize("root", comfy_paths(), ids=lambda r: r.name)
@pytest.mark.parametrize("path", WORKFLOWS, ids=ids)
def test_core_nodes_exist_with_valid_widgets(path, root):
    defs = loaded_defs(root)
    errors = []
    for n in load(path)["nodes"]:
        if n["type"] in VIRTUAL_NODES or n["type"] == "PISAPatch":
            continue
        node_def = defs["nodes"].get(n["type"])
        if node_def is None or "error" in node_def:
            errors.append(f"{n['type']}: missing in ComfyUI {defs['version']} ({(node_def or {}).get('error')})")
            continue
        errors += [f"{n['type']} #{n['id']}: {e}" for e in widget_errors(n, node_def) + socket_errors(n, node_def)]
    assert errors == [], f"ComfyUI {defs['version']}"


def test_real_pisa_node_matches_the_contract(pisa_def):
    got = [(name, kind, choices, opts.get("default")) for name, kind, choices, opts in widget_specs(pisa_def)]
    want = [(name, kind, choices, opts.get("default")) for name, kind, choices, opts in widget_specs(PISA_CONTRACT)]
    assert got == want
    assert pisa_def["output"] == ["MODEL"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids)
def test_pisa_nodes_valid_for_the_real_node(path, pisa_def):
    for n in load(path)["nodes"]:
        if n["type"] == "PISAPatch":
            assert widget_errors(n, pisa_def) + socket_errors(n, pisa_def) == [], n["id"]


@pytest.mark.parametrize("root", comfy_paths(), ids=lambda r: r.name)
def test_comfyui_loads_the_pack(root):
    defs = loaded_defs(root)
    assert defs["pack_loaded"], f"ComfyUI {defs['version']} did not register PISAPatch"


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids)
def test_layout_has_no_overlaps(path):
    """Nodes (with their 30 px title bar) and groups must not cover each other when a user opens it."""
    wf = load(path)
    rects = [(n["id"], (n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]))
             for n in wf["nodes"]]
    groups = [(g["title"], (g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
                            g["bounding"][1] + g["bounding"][3])) for g in wf["groups"]]
    for items in (rects, groups):
        clashes = [(a, b) for i, (a, ra) in enumerate(items) for b, rb in items[i + 1:] if _overlap(ra, rb)]
        assert clashes == []
