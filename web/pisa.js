// ComfyUI-PISA front-end: what the PISA Patch node did in the last run, shown on the node, and
// presets that fill its widgets. Both widgets are appended after the node's own widgets and are
// never serialized, so saved workflows (positional widgets_values) and API prompts stay unchanged.
// Everything is defensive: a missing widget or an older front-end only disables the feature.

const { app } = window.comfyAPI?.app ?? (await import("../../scripts/app.js"));
const { api } = window.comfyAPI?.api ?? (await import("../../scripts/api.js"));

const NODE_TYPE = "PISAPatch";
const STATS = "pisa_stats";
const PRESET = "preset";
const NO_PRESET = "(choose preset)";
// Hover text of the two widgets (the front-end shows `widget.tooltip`; the stats text box, a DOM
// element, also gets it as its title).
const TOOLTIPS = {
  [PRESET]: "Fills the widgets above with a preset: quality / balanced / fast, or settings for Wan, "
            + "HunyuanVideo or FLUX. dense_steps becomes a share of the connected sampler's steps. "
            + "The preset choice itself is not saved; the widget values it sets are.",
  [STATS]: "What PISA did in this node's last run: attention calls that ran sparse out of all calls, "
           + "the effective density and the attention time, with adaptive routing also the per-tile "
           + "density's mean, spread and range (the log has the same line). Read-only; "
           + "not saved with the workflow.",
};

// dense_frac: share of the connected sampler's steps kept dense (falls back to 30 steps).
const BALANCED = { sparsity: 0.875, block_size: "64", taylor_order: "1", dense_frac: 0.2, dense_blocks: "0",
                   min_tokens: 8192, routing: "auto" };
const PRESETS = {
  quality: { ...BALANCED, sparsity: 0.75, dense_frac: 0.25,
             hint: "quality: 1/4 of key blocks exact, first quarter of the steps dense." },
  balanced: { ...BALANCED, hint: "balanced: the defaults; 1/8 of key blocks exact, first 20% of steps dense." },
  fast: { ...BALANCED, sparsity: 0.94, dense_frac: 0.1,
          hint: "fast: 6% of key blocks exact, first 10% of steps dense. Check quality with the A/B workflow." },
  "Wan 2.1 / 2.2 video": { ...BALANCED,
          hint: "Wan: balanced settings. Wan2.2: steps count across both experts, so the low-noise expert (from step 10) runs sparse unless dense_steps > 10." },
  "HunyuanVideo": { ...BALANCED, hint: "HunyuanVideo: balanced settings; text tokens are few, video tokens dominate." },
  "FLUX image": { ...BALANCED, sparsity: 0.75, dense_frac: 0.2,
          hint: "FLUX: milder sparsity; 1024² is 4096 image tokens plus text, near min_tokens. Gains grow at 1536² and up." },
};

function widget(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

function setWidget(node, name, value) {
  const w = widget(node, name);
  const choices = w?.options?.values;
  if (!w || (Array.isArray(choices) && !choices.includes(value))) return;
  w.value = value;
  w.callback?.(value, app.canvas, node);
}

// Steps of the first sampler downstream of this node's MODEL output (through other model patches).
function samplerSteps(node) {
  const graph = node.graph;
  const links = graph?.links;
  const queue = [node];
  const seen = new Set();
  while (queue.length) {
    const n = queue.shift();
    if (!n || seen.has(n.id)) continue;
    seen.add(n.id);
    const steps = n !== node && widget(n, "steps");
    if (steps) return Number(steps.value);
    for (const out of n.outputs ?? []) {
      for (const id of out.links ?? []) {
        const link = links?.get?.(id) ?? links?.[id];
        if (link) queue.push(graph.getNodeById(link.target_id));
      }
    }
  }
  return null;
}

function showText(node, text) {
  const w = widget(node, STATS);
  if (!w) return;
  w.value = text;
  if (w.inputEl) w.inputEl.value = text;
  node.setDirtyCanvas?.(true, true);
}

function applyPreset(node, name) {
  const p = PRESETS[name];
  if (!p) return;
  const steps = samplerSteps(node) ?? 30;
  for (const key of ["sparsity", "block_size", "taylor_order", "dense_blocks", "min_tokens", "routing"]) {
    setWidget(node, key, p[key]);
  }
  setWidget(node, "dense_steps", Math.round(p.dense_frac * steps));
  showText(node, `${p.hint}\n(dense_steps = ${Math.round(p.dense_frac * steps)} of ${steps} sampler steps)`);
}

function addWidgets(node) {
  if (widget(node, PRESET)) return;
  const preset = node.addWidget("combo", PRESET, NO_PRESET, (v) => applyPreset(node, v),
                                { values: [NO_PRESET, ...Object.keys(PRESETS)], serialize: false });
  let stats;
  try {
    const STRING = window.comfyAPI?.widgets?.ComfyWidgets?.STRING;
    stats = STRING?.(node, STATS, ["STRING", { multiline: true }], app)?.widget;
  } catch (e) {
    stats = null;
  }
  stats ??= node.addWidget("text", STATS, "", () => {}, { serialize: false });
  for (const w of [preset, stats]) {
    w.serialize = false;
    w.options = { ...(w.options ?? {}), serialize: false };
    w.tooltip = TOOLTIPS[w.name];
  }
  if (stats.inputEl) {
    stats.inputEl.title = TOOLTIPS[STATS];
    stats.inputEl.readOnly = true;
    stats.inputEl.placeholder = "PISA stats appear here after a run";
    stats.inputEl.style.opacity = "0.8";
  }
  stats.value = "";
}

function onStats(event) {
  const d = event?.detail ?? {};
  const id = String(d.node ?? "").split(":").pop();
  const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
  if (!node || node.type !== NODE_TYPE) return;
  showText(node, d.text || `PISA ${d.pisa_calls}/${d.calls} attention calls sparse, density ${d.density}, `
                           + `attention ${d.attn_ms} ms`);
}

app.registerExtension({
  name: "comfyui-pisa.patch-ui",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      try {
        addWidgets(this);
      } catch (e) {
        console.warn("[PISA] could not add the preset/stats widgets", e);
      }
      return r;
    };
  },
  setup() {
    api.addEventListener("pisa.stats", onStats);
  },
});
