"""Generate the bundled example workflows in `workflows/` (ComfyUI UI/save format, version 0.4).

Why a generator: six workflows share loaders, notes, layout and the PISA node; writing their link
tables by hand invites dangling links and wrong slot numbers. Edit this file, then run
`python scripts/build_workflows.py`; `tests/packaging/test_workflows.py` fails when the committed
JSON and this generator disagree. Only ComfyUI core nodes present in both v0.3.64 and v0.19.3 are
used (the tests check that against real checkouts); widget values are positional, in the order of
each node's INPUT_TYPES, with the extra `control_after_generate` value after every seed.
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "workflows"

# Sockets (inputs: (name, type[, optional]); outputs: types) of every node type used below.
SOCKETS = {
    "UNETLoader": ([], ["MODEL"]),
    "CLIPLoader": ([], ["CLIP"]),
    "DualCLIPLoader": ([], ["CLIP"]),
    "VAELoader": ([], ["VAE"]),
    "ModelSamplingSD3": ([("model", "MODEL")], ["MODEL"]),
    "PISAPatch": ([("model", "MODEL")], ["MODEL"]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["CONDITIONING"]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], ["CONDITIONING"]),
    "EmptyHunyuanLatentVideo": ([], ["LATENT"]),
    "EmptySD3LatentImage": ([], ["LATENT"]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], ["LATENT"]),
    "KSamplerAdvanced": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent_image", "LATENT")], ["LATENT"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], ["IMAGE"]),
    "VAEDecodeTiled": ([("samples", "LATENT"), ("vae", "VAE")], ["IMAGE"]),
    "ImageStitch": ([("image1", "IMAGE"), ("image2", "IMAGE", True)], ["IMAGE"]),
    "CreateVideo": ([("images", "IMAGE"), ("audio", "AUDIO", True)], ["VIDEO"]),
    "SaveVideo": ([("video", "VIDEO")], []),
    "SaveImage": ([("images", "IMAGE")], []),
    "MarkdownNote": ([], []),
}
SIZES = {"UNETLoader": [350, 82], "CLIPLoader": [350, 106], "DualCLIPLoader": [350, 130],
         "VAELoader": [350, 58], "ModelSamplingSD3": [300, 58], "PISAPatch": [340, 400],
         "CLIPTextEncode": [420, 170], "FluxGuidance": [300, 58], "EmptyHunyuanLatentVideo": [320, 130],
         "EmptySD3LatentImage": [320, 106], "KSampler": [320, 262], "KSamplerAdvanced": [320, 334],
         "VAEDecode": [210, 46], "VAEDecodeTiled": [270, 150], "ImageStitch": [270, 150],
         "CreateVideo": [270, 78], "SaveVideo": [480, 420], "SaveImage": [480, 520],
         "MarkdownNote": [500, 640]}

PISA_DEFAULTS = {"sparsity": 0.875, "block_size": "64", "taylor_order": "1", "dense_steps": 10,
                 "dense_blocks": "0", "min_tokens": 8192, "token_order": "auto", "routing": "auto",
                 "verbose": False}



def split_file(repo, name, directory):
    """(file, models/ folder, download URL) of a file in a Comfy-Org "repackaged" repository."""
    return name, directory, f"https://huggingface.co/Comfy-Org/{repo}/resolve/main/split_files/{directory}/{name}"


UMT5 = split_file("Wan_2.1_ComfyUI_repackaged", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders")
WAN_VAE = split_file("Wan_2.1_ComfyUI_repackaged", "wan_2.1_vae.safetensors", "vae")
FLUX_FILES = [
    ("flux1-dev.safetensors", "diffusion_models",
     "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"),
    ("t5xxl_fp16.safetensors", "text_encoders",
     "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    ("clip_l.safetensors", "text_encoders",
     "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    ("ae.safetensors", "vae", "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors"),
]

WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
                "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
VIDEO_PROMPT = ("A red fox trots through fresh snow in a birch forest at golden hour, its breath steaming "
                "in the cold air; the camera tracks alongside at ground level, shallow depth of field, "
                "soft backlight, fine detail in the fur.")
IMAGE_PROMPT = ("A weathered lighthouse keeper's desk by a rain-streaked window at dusk: brass compass, "
                "open logbook with handwritten entries, a steaming tin mug, warm lamplight, detailed "
                "wood grain, photorealistic.")
SEED = 20260101


class Graph:
    """A workflow under construction: nodes, links and groups in ComfyUI's 0.4 save format."""

    def __init__(self):
        self.nodes, self.links, self.groups = [], [], []

    def add(self, type_, pos, widgets, *, title=None, models=None, color=None, size=None):
        ins, outs = SOCKETS[type_]
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos),
                "size": list(size or SIZES[type_]), "flags": {}, "order": 0, "mode": 0,
                "inputs": [{"name": i[0], "type": i[1], "link": None, **({"shape": 7} if i[2:] else {})}
                           for i in ins],
                "outputs": [{"name": t, "type": t, "slot_index": k, "links": []} for k, t in enumerate(outs)],
                "properties": {} if type_ == "MarkdownNote" else {"Node name for S&R": type_},
                "widgets_values": list(widgets)}
        if type_ == "PISAPatch":
            node["properties"].update({"cnr_id": "comfyui-pisa", "ver": "0.1.0"})
        if models:
            node["properties"]["models"] = [{"name": n, "url": u, "directory": d} for n, d, u in models]
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        return node

    def link(self, src, dst, input_name, out_slot=0):
        slot = next(k for k, i in enumerate(dst["inputs"]) if i["name"] == input_name)
        link_id = len(self.links) + 1
        type_ = src["outputs"][out_slot]["type"]
        self.links.append([link_id, src["id"], out_slot, dst["id"], slot, type_])
        src["outputs"][out_slot]["links"].append(link_id)
        dst["inputs"][slot]["link"] = link_id

    def group(self, title, members, color="#3f789e"):
        x0 = min(n["pos"][0] for n in members) - 20
        y0 = min(n["pos"][1] for n in members) - 60
        x1 = max(n["pos"][0] + n["size"][0] for n in members) + 20
        y1 = max(n["pos"][1] + n["size"][1] for n in members) + 20
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": color, "font_size": 24, "flags": {}})

    def to_json(self):
        self._set_order()
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [620, 200]}}, "version": 0.4}

    def _set_order(self):
        """`order` is the execution order ComfyUI saves: a topological order of the link graph."""
        indeg = {n["id"]: 0 for n in self.nodes}
        for _, _, _, dst, _, _ in self.links:
            indeg[dst] += 1
        ready, order = sorted(i for i, d in indeg.items() if d == 0), 0
        by_id = {n["id"]: n for n in self.nodes}
        while ready:
            nid = ready.pop(0)
            by_id[nid]["order"], order = order, order + 1
            for _, src, _, dst, _, _ in self.links:
                if src == nid:
                    indeg[dst] -= 1
                    if indeg[dst] == 0:
                        ready.append(dst)
            ready.sort()


def pisa(g, pos, title="PISA Patch", **over):
    values = {**PISA_DEFAULTS, **over}
    return g.add("PISAPatch", pos, values.values(), title=title, color=("#335", "#446"))


def note(g, text, pos=(-560, -40), size=None):
    return g.add("MarkdownNote", pos, [text], title="Read me: files, settings, speed", size=size,
                 color=("#432", "#653"))


def file_table(models):
    """Markdown table: where each file goes, with its download link."""
    rows = "\n".join(f"| `{d}/` | [{n}]({u}) |" for n, d, u in models)
    return "**Files** (put each in the folder under `ComfyUI/models/`)\n\n| folder | file |\n|---|---|\n" + rows


SPEED = ("**Speed.** Expect the sampling time to drop roughly in proportion to the attention share of "
         "the step time; measured numbers per GPU and resolution are in the README benchmark table "
         "(see README, *Benchmarks*). After a run the PISA node shows its stats (PISA calls, effective "
         "density, attention time).")
WIDGETS = ("**PISA settings.** `sparsity` = share of key blocks approximated (not computed exactly) per "
           "query tile; `dense_steps` = first sampling steps kept fully dense (the layout forms there); "
           "`dense_blocks` = transformer blocks kept dense; `min_tokens` = shorter sequences stay dense. "
           "Use the node's *preset* menu for quality / balanced / fast.")


def text_encode(g, clip, pos, text, negative=False):
    node = g.add("CLIPTextEncode", pos, [text], title="Negative prompt" if negative else "Positive prompt",
                 color=("#322", "#533") if negative else ("#232", "#353"))
    g.link(clip, node, "clip")
    return node


def video_out(g, image, pos, fps, prefix):
    create = g.add("CreateVideo", pos, [fps])
    save = g.add("SaveVideo", (pos[0], pos[1] + 130), [prefix, "auto", "auto"])
    g.link(image, create, "images")
    g.link(create, save, "video")
    return [create, save]


def wan21(size_name, unet, width, height, shift, steps, cfg, prefix, intro):
    """Wan2.1 T2V: the ComfyUI example graph with PISA between ModelSamplingSD3 and KSampler."""
    g = Graph()
    models = [split_file("Wan_2.1_ComfyUI_repackaged", unet, "diffusion_models"), UMT5, WAN_VAE]
    dense_steps = steps // 5
    note(g, f"# PISA · Wan2.1 T2V {size_name}\n\n{intro}\n\n{file_table(models)}\n\n"
            f"**Settings here.** {width}×{height}, 81 frames, {steps} steps, `sparsity` 0.875, "
            f"`dense_steps` {dense_steps} (the first 20 % of the steps), block 0 dense.\n\n{WIDGETS}\n\n{SPEED}")
    unet_n = g.add("UNETLoader", (0, 0), [unet, "default"], models=[models[0]])
    clip = g.add("CLIPLoader", (0, 130), [UMT5[0], "wan", "default"], models=[UMT5])
    vae = g.add("VAELoader", (0, 290), [WAN_VAE[0]], models=[WAN_VAE])
    latent = g.add("EmptyHunyuanLatentVideo", (0, 400), [width, height, 81, 1])
    ms = g.add("ModelSamplingSD3", (420, 0), [shift])
    patch = pisa(g, (420, 100), dense_steps=dense_steps)
    pos = text_encode(g, clip, (840, 0), VIDEO_PROMPT)
    neg = text_encode(g, clip, (840, 220), WAN_NEGATIVE, negative=True)
    ks = g.add("KSampler", (1320, 0), [SEED, "fixed", steps, cfg, "uni_pc", "simple", 1.0])
    dec = g.add("VAEDecode", (1320, 300), [])
    g.link(unet_n, ms, "model")
    g.link(ms, patch, "model")
    g.link(patch, ks, "model")
    g.link(pos, ks, "positive")
    g.link(neg, ks, "negative")
    g.link(latent, ks, "latent_image")
    g.link(ks, dec, "samples")
    g.link(vae, dec, "vae")
    outs = video_out(g, dec, (1700, 0), 16, prefix)
    g.group("1 · Load models", [unet_n, clip, vae, latent])
    g.group("2 · PISA sparse attention", [ms, patch], color="#335")
    g.group("3 · Prompt, sample, save", [pos, neg, ks, dec, *outs], color="#444")
    return g


def wan22():
    """Wan2.2 A14B T2V: two experts, each with its own PISA Patch, split by KSamplerAdvanced steps."""
    g = Graph()
    hi, lo = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
    models = [split_file("Wan_2.2_ComfyUI_Repackaged", n, "diffusion_models") for n in (hi, lo)] + [UMT5, WAN_VAE]
    note(g, "# PISA · Wan2.2 14B T2V (two experts)\n\nWan2.2 A14B runs a high-noise expert for the first "
            "half of the steps and a low-noise expert for the rest. Each expert is a separate model, so each "
            "gets its own PISA Patch.\n\n" + file_table(models) + "\n\n"
            "**Settings here.** 1280×720, 81 frames, 20 steps (high noise 0–10, low noise 10–20), "
            "`sparsity` 0.875 for both. PISA counts steps across both samplers (the low-noise one "
            "continues at step 10), so `dense_steps` 4 on the high-noise expert keeps steps 0-3 dense "
            "(20 % of the schedule, where the layout forms) and the low-noise expert runs sparse "
            "throughout (`dense_steps` 0).\n\n" + WIDGETS + "\n\n" + SPEED, size=[500, 720])
    u_hi = g.add("UNETLoader", (0, 0), [hi, "default"], title="Load high-noise expert", models=[models[0]])
    u_lo = g.add("UNETLoader", (0, 120), [lo, "default"], title="Load low-noise expert", models=[models[1]])
    clip = g.add("CLIPLoader", (0, 240), [UMT5[0], "wan", "default"], models=[UMT5])
    vae = g.add("VAELoader", (0, 400), [WAN_VAE[0]], models=[WAN_VAE])
    latent = g.add("EmptyHunyuanLatentVideo", (0, 510), [1280, 720, 81, 1])
    ms_hi = g.add("ModelSamplingSD3", (420, 0), [8.0])
    ms_lo = g.add("ModelSamplingSD3", (420, 580), [8.0])
    p_hi = pisa(g, (420, 100), title="PISA Patch (high noise)", dense_steps=4)
    p_lo = pisa(g, (420, 680), title="PISA Patch (low noise)", dense_steps=0)
    pos = text_encode(g, clip, (840, 0), VIDEO_PROMPT)
    neg = text_encode(g, clip, (840, 220), WAN_NEGATIVE, negative=True)
    k_hi = g.add("KSamplerAdvanced", (1320, 0),
                 ["enable", SEED, "fixed", 20, 3.5, "euler", "simple", 0, 10, "enable"],
                 title="KSampler (high noise, steps 0-10)")
    k_lo = g.add("KSamplerAdvanced", (1320, 380),
                 ["disable", 0, "fixed", 20, 3.5, "euler", "simple", 10, 10000, "disable"],
                 title="KSampler (low noise, steps 10-20)")
    dec = g.add("VAEDecode", (1700, 0), [])
    for a, b, name in [(u_hi, ms_hi, "model"), (ms_hi, p_hi, "model"), (p_hi, k_hi, "model"),
                       (u_lo, ms_lo, "model"), (ms_lo, p_lo, "model"), (p_lo, k_lo, "model"),
                       (pos, k_hi, "positive"), (neg, k_hi, "negative"), (latent, k_hi, "latent_image"),
                       (pos, k_lo, "positive"), (neg, k_lo, "negative"), (k_hi, k_lo, "latent_image"),
                       (k_lo, dec, "samples"), (vae, dec, "vae")]:
        g.link(a, b, name)
    outs = video_out(g, dec, (1700, 100), 16, "pisa/wan22_t2v_14B")
    g.group("1 · Load models", [u_hi, u_lo, clip, vae, latent])
    g.group("2 · PISA, one per expert", [ms_hi, ms_lo, p_hi, p_lo], color="#335")
    g.group("3 · Prompt, sample, save", [pos, neg, k_hi, k_lo, dec, *outs], color="#444")
    return g


def hunyuan():
    """HunyuanVideo T2V 720p: embedded guidance through FluxGuidance, KSampler at cfg 1."""
    g = Graph()
    unet, te1, te2, vae_f = ("hunyuan_video_t2v_720p_bf16.safetensors", "clip_l.safetensors",
                             "llava_llama3_fp8_scaled.safetensors", "hunyuan_video_vae_bf16.safetensors")
    models = [split_file("HunyuanVideo_repackaged", n, d) for n, d in
              [(unet, "diffusion_models"), (te1, "text_encoders"), (te2, "text_encoders"), (vae_f, "vae")]]
    note(g, "# PISA · HunyuanVideo T2V 720p\n\n" + file_table(models) + "\n\n"
            "**Settings here.** 1280×720, 129 frames, 30 steps, embedded guidance 6.0 (FluxGuidance; "
            "KSampler cfg stays 1.0), shift 7. PISA: `sparsity` 0.875, `dense_steps` 6 (20 %), block 0 "
            "dense.\n\n"
            + WIDGETS + "\n\n" + SPEED)
    unet_n = g.add("UNETLoader", (0, 0), [unet, "default"], models=[models[0]])
    clip = g.add("DualCLIPLoader", (0, 130), [te1, te2, "hunyuan_video", "default"], models=models[1:3])
    vae = g.add("VAELoader", (0, 310), [vae_f], models=[models[3]])
    latent = g.add("EmptyHunyuanLatentVideo", (0, 420), [1280, 720, 129, 1])
    ms = g.add("ModelSamplingSD3", (420, 0), [7.0])
    patch = pisa(g, (420, 100), dense_steps=6)
    pos = text_encode(g, clip, (840, 0), VIDEO_PROMPT)
    guid = g.add("FluxGuidance", (840, 220), [6.0])
    neg = text_encode(g, clip, (840, 330), "", negative=True)
    ks = g.add("KSampler", (1320, 0), [SEED, "fixed", 30, 1.0, "euler", "simple", 1.0])
    dec = g.add("VAEDecodeTiled", (1320, 300), [256, 64, 64, 8])
    for a, b, name in [(unet_n, ms, "model"), (ms, patch, "model"), (patch, ks, "model"),
                       (pos, guid, "conditioning"), (guid, ks, "positive"), (neg, ks, "negative"),
                       (latent, ks, "latent_image"), (ks, dec, "samples"), (vae, dec, "vae")]:
        g.link(a, b, name)
    outs = video_out(g, dec, (1700, 0), 24, "pisa/hunyuan_video_t2v_720p")
    g.group("1 · Load models", [unet_n, clip, vae, latent])
    g.group("2 · PISA sparse attention", [ms, patch], color="#335")
    g.group("3 · Prompt, sample, save", [pos, guid, neg, ks, dec, *outs], color="#444")
    return g


def flux():
    """FLUX.1-dev 1024²: fewer tokens than video, so lower sparsity and a short dense warm-up."""
    g = Graph()
    models = FLUX_FILES
    note(g, "# PISA · FLUX.1-dev 1024²\n\n" + file_table(models) + "\n\nThe FLUX.1-dev repository is "
            "gated: accept its license on Hugging Face first.\n\n"
            "**Settings here.** 1024×1024, 20 steps, guidance 3.5. At 1024² FLUX attends over 4096 image tokens "
            "plus the prompt's text tokens, far fewer than a video, so this uses a milder `sparsity` 0.75 and keeps the "
            "first 4 steps dense. `min_tokens` 8192 keeps **1024² itself dense**: at 4,352 tokens dense "
            "attention is faster than any sparse call (measured on an H100, see the README), so the patch "
            "only acts on larger images (1536² and up; at 2048², 16,896 tokens, PISA's attention is 2-3x "
            "faster). Set the latent to 2048×2048 to see it work.\n\n" + WIDGETS + "\n\n" + SPEED)
    unet_n = g.add("UNETLoader", (0, 0), [models[0][0], "default"], models=[models[0]])
    clip = g.add("DualCLIPLoader", (0, 130), [models[1][0], models[2][0], "flux", "default"], models=models[1:3])
    vae = g.add("VAELoader", (0, 310), [models[3][0]], models=[models[3]])
    latent = g.add("EmptySD3LatentImage", (0, 420), [1024, 1024, 1])
    patch = pisa(g, (420, 0), sparsity=0.75, dense_steps=4, min_tokens=8192)
    pos = text_encode(g, clip, (840, 0), IMAGE_PROMPT)
    guid = g.add("FluxGuidance", (840, 220), [3.5])
    neg = text_encode(g, clip, (840, 330), "", negative=True)
    ks = g.add("KSampler", (1320, 0), [SEED, "fixed", 20, 1.0, "euler", "simple", 1.0])
    dec = g.add("VAEDecode", (1320, 300), [])
    save = g.add("SaveImage", (1700, 0), ["pisa/flux1_dev"])
    for a, b, name in [(unet_n, patch, "model"), (patch, ks, "model"), (pos, guid, "conditioning"),
                       (guid, ks, "positive"), (neg, ks, "negative"), (latent, ks, "latent_image"),
                       (ks, dec, "samples"), (vae, dec, "vae"), (dec, save, "images")]:
        g.link(a, b, name)
    g.group("1 · Load models", [unet_n, clip, vae, latent])
    g.group("2 · PISA sparse attention", [patch], color="#335")
    g.group("3 · Prompt, sample, save", [pos, guid, neg, ks, dec, save], color="#444")
    return g


def ab():
    """Dense vs PISA from one loader with the same seed, stitched side by side (Wan2.1 1.3B, cheap)."""
    g = Graph()
    unet = "wan2.1_t2v_1.3B_fp16.safetensors"
    models = [split_file("Wan_2.1_ComfyUI_repackaged", unet, "diffusion_models"), UMT5, WAN_VAE]
    note(g, "# PISA · A/B: dense vs PISA, same seed\n\nOne model, two samplers with the **same seed and "
            "settings**: the top one runs plain dense attention, the bottom one runs through PISA Patch. "
            "The two videos are stitched side by side (left dense, right PISA) so you can judge the "
            "quality yourself; ComfyUI's console prints each sampler's time, and the PISA node shows its "
            "stats. Keep both seeds equal when you change one.\n\nWan2.1 T2V 1.3B at 832×480 is used "
            "because it is the cheapest supported model; swap in any other loader the same way.\n\n"
            + file_table(models) + "\n\n" + WIDGETS + "\n\n" + SPEED)
    unet_n = g.add("UNETLoader", (0, 0), [unet, "default"], models=[models[0]])
    clip = g.add("CLIPLoader", (0, 130), [UMT5[0], "wan", "default"], models=[UMT5])
    vae = g.add("VAELoader", (0, 290), [WAN_VAE[0]], models=[WAN_VAE])
    latent = g.add("EmptyHunyuanLatentVideo", (0, 400), [832, 480, 81, 1])
    pos = text_encode(g, clip, (420, 0), VIDEO_PROMPT)
    neg = text_encode(g, clip, (420, 220), WAN_NEGATIVE, negative=True)
    ms = g.add("ModelSamplingSD3", (900, 0), [8.0])
    patch = pisa(g, (900, 380), dense_steps=6, verbose=True)
    k_dense = g.add("KSampler", (1320, 0), [SEED, "fixed", 30, 6.0, "uni_pc", "simple", 1.0],
                    title="KSampler A: dense (reference)")
    k_pisa = g.add("KSampler", (1320, 380), [SEED, "fixed", 30, 6.0, "uni_pc", "simple", 1.0],
                   title="KSampler B: PISA", color=("#335", "#446"))
    d_dense = g.add("VAEDecode", (1700, 0), [])
    d_pisa = g.add("VAEDecode", (1700, 380), [])
    stitch = g.add("ImageStitch", (1700, 100), ["right", True, 16, "white"], title="Side by side: A | B")
    for a, b, name in [(unet_n, ms, "model"), (ms, k_dense, "model"), (ms, patch, "model"), (patch, k_pisa, "model"),
                       (pos, k_dense, "positive"), (neg, k_dense, "negative"), (latent, k_dense, "latent_image"),
                       (pos, k_pisa, "positive"), (neg, k_pisa, "negative"), (latent, k_pisa, "latent_image"),
                       (k_dense, d_dense, "samples"), (vae, d_dense, "vae"), (k_pisa, d_pisa, "samples"),
                       (vae, d_pisa, "vae"), (d_dense, stitch, "image1"), (d_pisa, stitch, "image2")]:
        g.link(a, b, name)
    outs = video_out(g, stitch, (2040, 0), 16, "pisa/ab_dense_vs_pisa")
    g.group("1 · Load models", [unet_n, clip, vae, latent])
    g.group("2 · Prompt", [pos, neg], color="#444")
    g.group("3 · Dense reference (A) and PISA (B)", [ms, patch, k_dense, k_pisa], color="#335")
    g.group("4 · Compare", [d_dense, d_pisa, stitch, *outs], color="#444")
    return g


WAN14_INTRO = ("Wan2.1's 14B text-to-video model at 720p: about 75k video tokens per step, where attention "
               "dominates the step time and PISA helps most.")
WAN13_INTRO = ("Wan2.1's 1.3B text-to-video model at 480p: about 32k tokens per step; the smallest supported "
               "video model and the quickest to try.")

WORKFLOWS = {
    "pisa_wan2.1_t2v_14B_720p.json": lambda: wan21("14B 720p", "wan2.1_t2v_14B_fp16.safetensors", 1280, 720,
                                                    8.0, 30, 6.0, "pisa/wan21_t2v_14B_720p", WAN14_INTRO),
    "pisa_wan2.1_t2v_1.3B_480p.json": lambda: wan21("1.3B 480p", "wan2.1_t2v_1.3B_fp16.safetensors", 832, 480,
                                                     8.0, 30, 6.0, "pisa/wan21_t2v_1.3B_480p", WAN13_INTRO),
    "pisa_wan2.2_t2v_14B_two_experts.json": wan22,
    "pisa_hunyuan_video_t2v_720p.json": hunyuan,
    "pisa_flux1_dev_1024.json": flux,
    "pisa_ab_dense_vs_pisa_wan2.1_1.3B.json": ab,
}


def render(name):
    """The exact file text for one bundled workflow."""
    return json.dumps(WORKFLOWS[name]().to_json(), indent=2, ensure_ascii=False) + "\n"


def main():
    OUT.mkdir(exist_ok=True)
    for name in WORKFLOWS:
        (OUT / name).write_text(render(name), encoding="utf-8")
        print("wrote", OUT / name)


if __name__ == "__main__":
    main()
