"""What the end-to-end benchmark measures: ComfyUI's models at real sizes (and toy and compile-
check sizes), as the constructor arguments that give the real checkpoints' parameter names and
shapes.
"""

from __future__ import annotations

import dataclasses
import math


#: The issue's full-run setting (Wan2.1-14B and HunyuanVideo bars).
ISSUE_STEPS, ISSUE_DENSE_STEPS = 50, 10


@dataclasses.dataclass(frozen=True)
class Spec:
    """One benchmark case: a model at one resolution."""

    name: str
    family: str  # "wan" | "hunyuan_video" | "flux"
    #: Constructor arguments that give the checkpoint's parameter names and shapes; ComfyUI's model
    #: detection reads the configuration back from them.
    structure: dict
    latent: tuple  # per batch element: (C, F, H, W) for video, (C, H, W) for images
    text_tokens: int
    cfg: bool  # True: cond and uncond in one batch of 2 (CFG); False: batch 1 (guidance-distilled)
    text_valid: int | None = None  # HunyuanVideo: valid text tokens (the rest is padding, masked)
    workflow: str | None = None  # bundled workflow with its steps / dense steps / PISA widgets
    title: str = ""


_WAN = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, out_dim=16, freq_dim=256,
            text_dim=4096, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)


_HUNYUAN = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=20, depth_single_blocks=40, axes_dim=[16, 56, 56], theta=256,
                patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
                use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)


_FLUX = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
             num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
             qkv_bias=True, guidance_embed=True, txt_ids_dims=[])


SPECS = {s.name: s for s in [
    Spec("wan2.1-14b-720p", "wan", dict(_WAN, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
         (16, 21, 90, 160), 512, True, workflow="pisa_wan2.1_t2v_14B_720p.json",
         title="Wan2.1-14B T2V 1280x720x81"),
    Spec("wan2.1-1.3b-480p", "wan", dict(_WAN, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
         (16, 21, 60, 104), 512, True, workflow="pisa_wan2.1_t2v_1.3B_480p.json",
         title="Wan2.1-1.3B T2V 832x480x81"),
    Spec("hunyuan-video-720p", "hunyuan_video", _HUNYUAN, (16, 33, 90, 160), 256, False, text_valid=128,
         workflow="pisa_hunyuan_video_t2v_720p.json", title="HunyuanVideo T2V 1280x720x129, text mask"),
    Spec("flux1-dev-1024", "flux", _FLUX, (16, 128, 128), 256, False, workflow="pisa_flux1_dev_1024.json",
         title="FLUX.1-dev 1024x1024"),
    Spec("flux1-dev-2048", "flux", _FLUX, (16, 256, 256), 512, False, workflow="pisa_flux1_dev_1024.json",
         title="FLUX.1-dev 2048x2048"),
    # Not in the default set: HunyuanVideo without a text mask (ComfyUI's HunyuanVideo text encoder
    # drops the mask when the cropped prompt has no padding left, comfy/text_encoders/hunyuan_video.py).
    Spec("hunyuan-video-720p-nomask", "hunyuan_video", _HUNYUAN, (16, 33, 90, 160), 256, False,
         workflow="pisa_hunyuan_video_t2v_720p.json", title="HunyuanVideo T2V 1280x720x129, no text mask"),
]}


DEFAULT_MODELS = ["wan2.1-14b-720p", "hunyuan-video-720p", "wan2.1-1.3b-480p", "flux1-dev-1024", "flux1-dev-2048"]


#: ``--toy``: the same families at tiny sizes (head dim 128 as in the real models), CPU-friendly.
_TOY_WAN = dict(_WAN, dim=256, ffn_dim=512, num_heads=2, num_layers=2)


_TOY_JOINT = dict(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=64)


TOY_SPECS = {s.name: s for s in [
    Spec("toy-wan", "wan", _TOY_WAN, (16, 3, 16, 16), 16, True, workflow="pisa_wan2.1_t2v_14B_720p.json",
         title="toy Wan (2 layers, 192 tokens)"),
    Spec("toy-hunyuan-video", "hunyuan_video", dict(_HUNYUAN, **_TOY_JOINT), (16, 3, 16, 16), 16, False,
         text_valid=10, workflow="pisa_hunyuan_video_t2v_720p.json", title="toy HunyuanVideo (1+1 blocks, mask)"),
    Spec("toy-flux", "flux", dict(_FLUX, **_TOY_JOINT, vec_in_dim=32), (16, 32, 32), 8, False,
         workflow="pisa_flux1_dev_1024.json", title="toy FLUX (1+1 blocks)"),
]}


#: ``--compile``: small configurations with the real head dim, one per family, with more blocks
#: than dynamo's recompile limit (8), so that per-block recompilation would show.
COMPILE_SPECS = {
    "wan": Spec("compile-wan", "wan", dict(_WAN, dim=1536, ffn_dim=8960, num_heads=12, num_layers=10),
                (16, 3, 32, 48), 512, True),
    "flux": Spec("compile-flux", "flux", dict(_FLUX, depth=5, depth_single_blocks=5), (16, 64, 64), 256, False),
    "hunyuan_video": Spec("compile-hunyuan-video", "hunyuan_video",
                          dict(_HUNYUAN, depth=5, depth_single_blocks=5), (16, 3, 32, 48), 256, False,
                          text_valid=128),
}


DEPTH_KEYS = {"wan": ("num_layers",), "flux": ("depth", "depth_single_blocks"),
               "hunyuan_video": ("depth", "depth_single_blocks")}


COMPILE_TOY_SPECS = {s.family: s for s in TOY_SPECS.values()}


#: Rough H100/H200 seconds of each case's essential passes with --quick (for --budget-s only; the
#: 720p cases measured 143 s and 156 s on an H200 with the full-size sparse warm-up, --profile on).
ESTIMATE_S = {"wan2.1-14b-720p": 150, "hunyuan-video-720p": 160, "hunyuan-video-720p-nomask": 130,
              "wan2.1-1.3b-480p": 25, "flux1-dev-1024": 15, "flux1-dev-2048": 25, "compile": 90}


def short_latent(spec: Spec) -> tuple:
    """A small latent of the same width/height (video: 2 frames; images: a quarter of the area),
    for warm-up: compiles and loads the kernels of the real shapes' code paths at little cost."""
    if len(spec.latent) == 4:
        c, f, h, w = spec.latent
        return (c, min(f, 2), h, w)
    c, h, w = spec.latent
    return (c, max(2, h // 2), max(2, w // 2))


def tokens_of(spec: Spec, patch) -> int:
    """Image/video tokens of ``spec``'s latent after the model's patching (``patch``: its patch size)."""
    if len(spec.latent) == 4:
        c, f, h, w = spec.latent
        return math.prod(math.ceil(s / p) for s, p in zip((f, h, w), patch))
    c, h, w = spec.latent
    return math.ceil(h / patch) * math.ceil(w / patch)
