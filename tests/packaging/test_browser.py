"""The pack in a real browser: headless Chromium opens a headless ComfyUI that loads only this pack.

Bundled workflows (every checkout, v0.3.64 included): loaded the way the template browser does; no
node is missing, no widget value shifted or was rejected (the front-end's own prompt goes through
the server's validation), no missing-model/missing-node dialog opened, and the PISA node's extension
UI works: preset and stats widgets present, with tooltips, and never serialized, a `pisa.stats` event shows on the
node, a preset sets the widgets.

A real run (the main checkout, ComfyUI >= 0.19): tiny random-weight Wan2.1 and FLUX models in
ComfyUI's own file formats (tiny_models.py says what and why: one CLIP-L text encoder feeds both,
since umt5-xxl and t5-xxl cannot be made small), loaded by ComfyUI's loader nodes, each through a
PISA Patch node with `min_tokens` low enough for their 512 and 333 tokens; the workflow is queued
with the front-end's Run button, runs on CPU with `PISA_BACKEND=reference`, both output nodes get
their animated WEBP / PNG, and each PISA node shows its stats line, read from the page's DOM.

Screenshots go to test-artifacts/browser/.
"""
import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_checkouts import HERE, checkout_version
from comfy_server import PACK_NAME, comfy_server, http
from prerequisites import comfy_paths, import_or_missing, missing, require_comfy
from workflow_graph import ROOT, WORKFLOWS, load

ARTIFACTS = ROOT / "test-artifacts" / "browser"
ROOTS = comfy_paths()  # present or not: a missing one is reported by the test (prerequisites.py)
# The app is up, the pack's node registered, and the start-up workflow (the default graph of a fresh
# user) restored: a graph loaded before that restore is replaced by it.
READY = ("window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.PISAPatch"
         " && window.comfyAPI.app.app.extensionManager !== undefined"
         " && window.comfyAPI.app.app.graph.nodes.length > 0")
# The start-up graph's checkpoint is not in the test's model folders: front-ends with an errors tab
# (1.42, ComfyUI 0.19) flag its loader (node id 4) a moment after READY, and a flag that lands after
# the first bundled workflow was loaded marks that workflow's node 4 instead (a VAELoader: a CI run
# failed on exactly that).  Waited for before the first load; older front-ends flag nothing.
STARTUP_MODELS_CHECKED = "window.comfyAPI.app.app.graph.nodes.some((n) => n.has_errors)"
STARTUP_CHECK_TIMEOUT = 15

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
  const tooltips = { preset: w("preset")?.tooltip, pisa_stats: w("pisa_stats")?.tooltip,
                     stats_title: w("pisa_stats")?.inputEl?.title };
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
  return { names, tooltips, stats, after, values, apiInputs };
})()"""


# The real run: one API-format prompt (as ComfyUI's "Save (API)" writes it) with a Wan2.1 branch and
# a FLUX branch sharing the text encoder, loaded by the front-end's own API-prompt loader and laid
# out by hand (node id -> x, y), Wan in the top row, FLUX in the bottom row.
STEPS = 3
# 2 of 8 key blocks exact on Wan's 512 tokens; min_tokens below both sequences; the first step and
# (Wan) block 0 dense, so the stats also show dense reasons.
PISA_WIDGETS = dict(sparsity=0.75, block_size="64", taylor_order="1", dense_steps=1, dense_blocks="0",
                    min_tokens=256, token_order="auto", routing="auto", verbose=False)
# PISA node -> (calls that ran PISA, all calls). Wan: 2 blocks x 3 steps of self-attention plus as many
# cross-attention calls (cond and uncond in one batch); PISA only in block 1 after the dense step.
# FLUX: one double and one single block x 3 steps, PISA in both after the dense step.
EXPECTED_CALLS = {"12": (2, 12), "21": (4, 6)}
OUTPUTS = {"17": ".webp", "27": ".png"}  # output node -> the file type it shows


def _sampler(model, positive, negative, latent, cfg):
    return {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 0, "steps": STEPS, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
        "positive": positive, "negative": negative, "latent_image": latent, "denoise": 1.0}}


TINY_RUN = {
    "1": {"class_type": "CLIPLoader",
          "inputs": {"clip_name": "tiny_clip_l.safetensors", "type": "stable_diffusion"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox running through snow", "clip": ["1", 0]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, static", "clip": ["1", 0]}},
    "10": {"class_type": "UNETLoader",
           "inputs": {"unet_name": "tiny_wan21_t2v.safetensors", "weight_dtype": "default"}},
    "11": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["10", 0], "shift": 8.0}},
    "12": {"class_type": "PISAPatch", "inputs": {"model": ["11", 0], **PISA_WIDGETS}},
    "13": {"class_type": "EmptyHunyuanLatentVideo",
           "inputs": {"width": 256, "height": 256, "length": 5, "batch_size": 1}},
    "14": _sampler(["12", 0], ["2", 0], ["3", 0], ["13", 0], cfg=3.0),
    "15": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_wan21_vae.safetensors"}},
    "16": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["15", 0]}},
    "17": {"class_type": "SaveAnimatedWEBP",
           "inputs": {"images": ["16", 0], "filename_prefix": "pisa_tiny_wan", "fps": 16.0, "lossless": False,
                      "quality": 80, "method": "default"}},
    "20": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux.safetensors", "weight_dtype": "default"}},
    "21": {"class_type": "PISAPatch", "inputs": {"model": ["20", 0], **PISA_WIDGETS, "dense_blocks": ""}},
    "22": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
    "23": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
    "24": _sampler(["21", 0], ["2", 0], ["23", 0], ["22", 0], cfg=1.0),
    "25": {"class_type": "VAELoader", "inputs": {"vae_name": "taef1"}},
    "26": {"class_type": "VAEDecode", "inputs": {"samples": ["24", 0], "vae": ["25", 0]}},
    "27": {"class_type": "SaveImage", "inputs": {"images": ["26", 0], "filename_prefix": "pisa_tiny_flux"}},
}
LAYOUT = {"1": (0, 330), "2": (0, 460), "3": (0, 720), "23": (380, 400),
          "10": (380, 0), "11": (380, 110), "13": (380, 210), "20": (380, 560), "22": (380, 670),
          "12": (760, 0), "21": (760, 500), "14": (1240, 0), "24": (1240, 500),
          "15": (1600, 0), "16": (1600, 110), "25": (1600, 500), "26": (1600, 610), "17": (1860, 0), "27": (1860, 500)}
# Screenshots: graph areas (x0, y0, x1, y1) framed in the window: the whole graph, each row close up.
VIEWS = {"graph": (-20, -40, 2200, 960), "wan": (740, -40, 2200, 460), "flux": (740, 460, 2200, 960)}

# Load the prompt, lay it out (PISA nodes large enough for the whole stats line, output nodes for
# their image), listen to the server's events and press the Run button. `%s`: the prompt, the
# layout and the output node ids as JSON.
LOAD_AND_RUN = """(async (prompt, layout, outputs) => {
  const app = window.comfyAPI.app.app, api = window.comfyAPI.api.api;
  const run = window.__pisaRun = { events: [], done: false };
  for (const type of ["executed", "pisa.stats", "execution_success", "execution_error", "execution_interrupted"])
    api.addEventListener(type, (e) => {
      run.events.push({ type, detail: e.detail });
      run.done ||= type.startsWith("execution_");
    });
  await app.loadApiJson(prompt, "pisa_tiny_run");
  for (const [id, [x, y]] of Object.entries(layout)) app.graph.getNodeById(Number(id)).pos = [x, y];
  for (const node of app.graph.nodes.filter((n) => n.type === "PISAPatch")) node.size = [440, 380];
  for (const id of outputs) app.graph.getNodeById(Number(id)).size = [320, 420];
  await new Promise((r) => setTimeout(r, 500));
  const button = [...document.querySelectorAll("button")].find((b) => b.innerText.trim() === "Run");
  button?.click();
  return { types: app.graph.nodes.map((n) => n.type).sort(), button: !!button };
})(%s, %s, %s)"""

# Show the graph area x0, y0, x1, y1 (graph units) in the window, below the top bar.
FRAME = """(async (x0, y0, x1, y1) => {
  const c = window.comfyAPI.app.app.canvas, w = c.canvas.clientWidth, h = c.canvas.clientHeight;
  const top = 110, left = 70;
  c.ds.scale = Math.min((w - left - 20) / (x1 - x0), (h - top - 20) / (y1 - y0));
  c.ds.offset[0] = left / c.ds.scale - x0;
  c.ds.offset[1] = top / c.ds.scale - y0;
  c.setDirty(true, true);
  await new Promise((r) => setTimeout(r, 1000));
})(%s)"""

# What the page shows: each PISA node's stats widget (its model value and the DOM textarea, with
# whether that textarea is the topmost element at its own centre) and each output node's files
# (the front-end's output store) and loaded images.
INSPECT_RUN = """(() => {
  const app = window.comfyAPI.app.app;
  const stats = {}, outputs = {};
  for (const node of app.graph.nodes.filter((n) => n.type === "PISAPatch")) {
    const w = node.widgets.find((x) => x.name === "pisa_stats"), el = w?.inputEl;
    const r = el?.getBoundingClientRect();
    stats[node.id] = { value: w?.value ?? null, dom: el?.isConnected ? el.value : null,
      on_top: !!r && document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2) === el };
  }
  for (const id of %s) {
    const node = app.graph.getNodeById(Number(id));
    outputs[id] = { files: (app.nodeOutputs?.[id]?.images ?? []).map((i) => i.filename),
      images: (node.imgs ?? []).map((i) => [i.naturalWidth, i.naturalHeight]) };
  }
  return { stats, outputs, events: window.__pisaRun.events };
})()"""


def _needs():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        missing("Chromium not installed (Debian: apt-get install chromium; scripts/setup_env.sh does it under CI=true)")
    import_or_missing("aiohttp", "the CDP client uses aiohttp (a ComfyUI requirement)")
    return exe


def _model_files():
    return sorted({(m["name"], m["directory"]) for p in WORKFLOWS for n in load(p)["nodes"]
                   for m in n["properties"].get("models", [])})


def _settle(url):
    """Settings a first-time user would click away (tutorial/template dialog, the minimap over the
    canvas's corner), set up front."""
    http(url + "/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}, method="POST")


def _pisa_errors(page):
    return [e for e in page.console_errors() if "pisa" in e.lower()]


def check_in_browser(root, exe, pack_dir, tmp, artifacts):
    """Run the whole browser check; returns the per-workflow reports for the assertions."""
    from cdp import Browser

    reports = {}
    with comfy_server(root, pack_dir, tmp / "comfy", _model_files()) as url:
        _settle(url)
        status, templates = http(url + "/workflow_templates")
        assert status == 200 and sorted(templates.get(PACK_NAME, [])) == sorted(p.stem for p in WORKFLOWS), templates
        with Browser(exe, str(tmp / "chromium")) as page:
            page.navigate(url)
            page.wait_for(READY, timeout=180)
            with contextlib.suppress(TimeoutError):
                page.wait_for(STARTUP_MODELS_CHECKED, timeout=STARTUP_CHECK_TIMEOUT)
            for wf in WORKFLOWS:
                report = page.evaluate(LOAD_AND_INSPECT % (PACK_NAME, json.dumps(wf.name)))
                page.screenshot(artifacts / f"{wf.stem}.png")
                status, queued = http(url + "/prompt", {"prompt": report.pop("prompt"), "client_id": "pisa-test"})
                report["prompt_status"], report["prompt_errors"] = status, queued
                http(url + "/queue", {"clear": True}, method="POST")
                http(url + "/interrupt", {}, method="POST")
                report["pisa"] = page.evaluate(EXERCISE_PISA_NODE)
                page.screenshot(artifacts / f"{wf.stem}.pisa_node.png")
                reports[wf.name] = report
            reports["console_errors"] = _pisa_errors(page)
    return reports


@pytest.mark.parametrize("root", ROOTS, ids=[r.name for r in ROOTS])
def test_bundled_workflows_in_headless_chromium(root, tmp_path):
    root = require_comfy(root)
    exe = _needs()
    artifacts = ARTIFACTS / root.name
    artifacts.mkdir(parents=True, exist_ok=True)
    reports = check_in_browser(root, exe, ROOT, tmp_path, artifacts)
    assert reports.pop("console_errors") == []
    for name, r in reports.items():
        assert r["missing"] == [] and r["has_errors"] == [], name
        assert r["mismatched"] == [], (name, r["mismatched"])
        assert not [d for d in r["dialogs"] if "missing" in d.lower()], (name, r["dialogs"])
        assert r["prompt_status"] == 200 and r["prompt_errors"].get("node_errors") == {}, (name, r["prompt_errors"])
        pisa = r["pisa"]
        assert pisa["names"][-2:] == ["preset", "pisa_stats"], (name, pisa["names"])
        tips = pisa["tooltips"]
        assert "preset" in tips["preset"] and "last run" in tips["pisa_stats"], tips
        assert tips["stats_title"] in (None, tips["pisa_stats"]), tips  # a text box only where STRING is a DOM widget
        assert pisa["stats"] == "PISA 360/400 attention calls sparse", pisa["stats"]
        assert pisa["after"]["sparsity"] == pytest.approx(0.94) and pisa["after"]["block_size"] == "64"
        assert len(pisa["values"]) == 9 and not {"preset", "pisa_stats"} & set(pisa["apiInputs"]), pisa
    assert Path(artifacts / f"{WORKFLOWS[0].stem}.png").stat().st_size > 10_000


def _write_tiny_models(root, models_dir):
    """tiny_models.py in a subprocess, with the checkout's own classes."""
    done = subprocess.run([sys.executable, str(HERE / "tiny_models.py"), str(root), str(models_dir)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def run_in_browser(root, exe, tmp, artifacts):
    """Queue TINY_RUN with the Run button and wait for it; returns what the page showed (per row)."""
    from cdp import Browser

    _write_tiny_models(root, tmp / "comfy" / "models")
    with comfy_server(root, ROOT, tmp / "comfy", env={"PISA_BACKEND": "reference"}) as url:
        _settle(url)
        with Browser(exe, str(tmp / "chromium")) as page:
            page.navigate(url)
            page.wait_for(READY, timeout=180)
            started = page.evaluate(LOAD_AND_RUN % tuple(map(json.dumps, (TINY_RUN, LAYOUT, list(OUTPUTS)))))
            assert started == {"types": sorted(n["class_type"] for n in TINY_RUN.values()), "button": True}, started
            page.evaluate(FRAME % json.dumps(VIEWS["graph"])[1:-1])
            page.wait_for("window.__pisaRun.done", timeout=300)
            page.wait_for(f"{json.dumps(list(OUTPUTS))}.every((id) => window.comfyAPI.app.app.graph"
                          ".getNodeById(Number(id)).imgs?.[0]?.naturalWidth > 0)", timeout=60)
            views = {}
            for view, area in VIEWS.items():
                page.evaluate(FRAME % json.dumps(area)[1:-1])
                views[view] = page.evaluate(INSPECT_RUN % json.dumps(list(OUTPUTS)))
                page.screenshot(artifacts / f"tiny_run.{view}.png")
            views["console_errors"] = _pisa_errors(page)
    shutil.copy(tmp / "comfy" / "server.log", artifacts / "tiny_run.server.log")
    views["server_log"] = (tmp / "comfy" / "server.log").read_text(errors="replace")
    return views


STATS_LINE = re.compile(r"PISA: (\d+)/(\d+) attention calls sparse(?: \(dense: [^)]*\))?, "
                        r"effective density (\d\.\d{3}), attention (\d+\.\d\d) s on reference")


def test_tiny_wan_and_flux_run_in_headless_chromium(tmp_path):
    root = require_comfy(ROOTS[0])
    exe = _needs()
    if checkout_version(root) < (0, 19):
        pytest.skip(f"the tiny run needs ComfyUI >= 0.19 (the Wan VAE's width read from its file); {root} is older")
    artifacts = ARTIFACTS / root.name
    artifacts.mkdir(parents=True, exist_ok=True)
    views = run_in_browser(root, exe, tmp_path, artifacts)
    assert views.pop("console_errors") == []
    log = views.pop("server_log")
    assert not [w for w in ("unet missing", "unet unexpected", "clip missing") if w in log], log[-3000:]
    events = views["graph"]["events"]
    ends = [e for e in events if e["type"].startswith("execution_")]
    assert [e["type"] for e in ends] == ["execution_success"], (ends, log[-3000:])
    sent = {e["detail"]["node"]: e["detail"] for e in events if e["type"] == "pisa.stats"}
    assert sorted(sent) == sorted(EXPECTED_CALLS), sent
    for row, node in (("wan", "12"), ("flux", "21")):
        shown = views[row]["stats"][node]
        # The textarea in the page's DOM holds the server's line and is on screen, not covered, in
        # the close-up of its row.
        assert shown["dom"] == shown["value"] == sent[node]["text"] and shown["on_top"], (node, shown)
        line = STATS_LINE.fullmatch(shown["dom"])
        assert line, shown["dom"]
        pisa_calls, calls, density, seconds = int(line[1]), int(line[2]), float(line[3]), float(line[4])
        assert (pisa_calls, calls) == EXPECTED_CALLS[node] == (sent[node]["pisa_calls"], sent[node]["calls"])
        assert 0.0 < density < 1.0 and density == pytest.approx(sent[node]["density"], abs=5e-4)
        assert sent[node]["attn_ms"] > 0.0 and seconds == pytest.approx(sent[node]["attn_ms"] / 1000, abs=0.006)
        assert shown["dom"] in log  # the node's own log line: what the server measured
    written = {e["detail"]["node"]: [i["filename"] for i in e["detail"]["output"]["images"]]
               for e in events if e["type"] == "executed"}
    for node, ext in OUTPUTS.items():
        out = views["graph"]["outputs"][node]
        assert out["files"] == written[node] and len(out["files"]) == 1 and out["files"][0].endswith(ext), out
        assert out["images"] == [[256, 256]], out
    for view in VIEWS:
        assert (artifacts / f"tiny_run.{view}.png").stat().st_size > 10_000
