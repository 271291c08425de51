"""The pack in a real browser: headless Chromium opens a headless ComfyUI that loads only this pack,
loads every bundled workflow the way the template browser does, and checks that no node is missing,
no widget value shifted or was rejected (the front-end's own prompt goes through the server's
validation), no missing-model/missing-node dialog opened, and the PISA node's extension UI works:
preset and stats widgets present and never serialized, a `pisa.stats` event shows on the node, a
preset sets the widgets. Screenshots go to test-artifacts/browser/."""
import json
import shutil
from pathlib import Path

import pytest

from comfy_server import PACK_NAME, comfy_server, http
from prerequisites import comfy_paths, import_or_missing, missing, require_comfy
from workflow_graph import ROOT, WORKFLOWS, load

ARTIFACTS = ROOT / "test-artifacts" / "browser"
READY = ("window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.PISAPatch"
         " && window.comfyAPI.app.app.extensionManager !== undefined")

# Load one template through the server route the template browser uses, then report what the
# front-end made of it. `%s` is the file name as a JSON string.
LOAD_AND_INSPECT = """(async (name) => {
  const app = window.comfyAPI.app.app;
  const wf = await (await fetch("/api/workflow_templates/%s/" + name)).json();
  await app.loadGraphData(wf, true, true, name);
  await new Promise((r) => setTimeout(r, 800));
  const graph = app.graph;
  const reg = window.LiteGraph.registered_node_types;
  const mismatched = [];
  for (const saved of wf.nodes) {
    const node = graph.getNodeById(saved.id);
    const now = node?.serialize().widgets_values ?? null;
    if (JSON.stringify(now) !== JSON.stringify(saved.widgets_values))
      mismatched.push({ id: saved.id, type: saved.type, saved: saved.widgets_values, now });
  }
  const dialogs = [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText.slice(0, 300));
  return {
    missing: wf.nodes.filter((n) => !reg[n.type]).map((n) => n.type),
    has_errors: graph.nodes.filter((n) => n.has_errors).map((n) => n.type),
    mismatched, dialogs, prompt: (await app.graphToPrompt()).output,
  };
})(%s)"""

# Exercise the extension on the first PISA node: widgets, a stats event, a preset, serialization.
EXERCISE_PISA_NODE = """(async () => {
  const app = window.comfyAPI.app.app, api = window.comfyAPI.api.api;
  const node = app.graph.nodes.find((n) => n.type === "PISAPatch");
  const w = (name) => node.widgets.find((x) => x.name === name);
  const names = node.widgets.map((x) => x.name);
  api.dispatchCustomEvent("pisa.stats", { node: String(node.id), text: "PISA 360/400 attention calls sparse",
    calls: 400, pisa_calls: 360, dense_calls: 40, density: 0.162, attn_ms: 5321.7 });
  const stats = w("pisa_stats")?.value;
  w("preset").value = "fast";
  w("preset").callback("fast");
  const after = Object.fromEntries(["sparsity", "block_size", "dense_steps"].map((k) => [k, w(k)?.value]));
  const values = node.serialize().widgets_values;
  const apiInputs = Object.keys((await app.graphToPrompt()).output[String(node.id)].inputs);
  app.canvas.ds.scale = 1.1;
  app.canvas.ds.offset[0] = 420 - node.pos[0];
  app.canvas.ds.offset[1] = 120 - node.pos[1];
  app.canvas.setDirty(true, true);
  await new Promise((r) => setTimeout(r, 500));
  return { names, stats, after, values, apiInputs };
})()"""


def _needs():
    root = require_comfy(comfy_paths()[0])
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        missing("Chromium not installed (Debian: apt-get install chromium; scripts/setup_env.sh does it under CI=true)")
    import_or_missing("aiohttp", "the CDP client uses aiohttp (a ComfyUI requirement)")
    return root, exe


def _model_files():
    return sorted({(m["name"], m["directory"]) for p in WORKFLOWS for n in load(p)["nodes"]
                   for m in n["properties"].get("models", [])})


def _settle(url):
    """Settings a first-time user would click away (tutorial/template dialog), set up front."""
    http(url + "/settings", {"Comfy.TutorialCompleted": True}, method="POST")


def check_in_browser(root, exe, pack_dir, tmp):
    """Run the whole browser check; returns the per-workflow reports for the assertions."""
    from cdp import Browser

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    reports = {}
    with comfy_server(root, pack_dir, tmp / "comfy", _model_files()) as url:
        _settle(url)
        status, templates = http(url + "/workflow_templates")
        assert status == 200 and sorted(templates.get(PACK_NAME, [])) == sorted(p.stem for p in WORKFLOWS), templates
        with Browser(exe, str(tmp / "chromium")) as page:
            page.navigate(url)
            page.wait_for(READY, timeout=180)
            for wf in WORKFLOWS:
                report = page.evaluate(LOAD_AND_INSPECT % (PACK_NAME, json.dumps(wf.name)))
                page.screenshot(ARTIFACTS / f"{wf.stem}.png")
                status, queued = http(url + "/prompt", {"prompt": report.pop("prompt"), "client_id": "pisa-test"})
                report["prompt_status"], report["prompt_errors"] = status, queued
                http(url + "/queue", {"clear": True}, method="POST")
                http(url + "/interrupt", {}, method="POST")
                report["pisa"] = page.evaluate(EXERCISE_PISA_NODE)
                page.screenshot(ARTIFACTS / f"{wf.stem}.pisa_node.png")
                reports[wf.name] = report
            reports["console_errors"] = [e for e in page.console_errors() if "pisa" in e.lower()]
    return reports


def test_bundled_workflows_in_headless_chromium(tmp_path):
    root, exe = _needs()
    reports = check_in_browser(root, exe, ROOT, tmp_path)
    assert reports.pop("console_errors") == []
    for name, r in reports.items():
        assert r["missing"] == [] and r["has_errors"] == [], name
        assert r["mismatched"] == [], (name, r["mismatched"])
        assert not [d for d in r["dialogs"] if "missing" in d.lower()], (name, r["dialogs"])
        assert r["prompt_status"] == 200 and r["prompt_errors"].get("node_errors") == {}, (name, r["prompt_errors"])
        pisa = r["pisa"]
        assert pisa["names"][-2:] == ["preset", "pisa_stats"], (name, pisa["names"])
        assert pisa["stats"] == "PISA 360/400 attention calls sparse", pisa["stats"]
        assert pisa["after"]["sparsity"] == pytest.approx(0.94) and pisa["after"]["block_size"] == "128"
        assert len(pisa["values"]) == 9 and not {"preset", "pisa_stats"} & set(pisa["apiInputs"]), pisa
    assert Path(ARTIFACTS / f"{WORKFLOWS[0].stem}.png").stat().st_size > 10_000
