"""End-to-end speed of the PISA Patch node inside ComfyUI, at real model sizes (issue 6).

    COMFYUI_PATH=~/comfy/ComfyUI python -m pisa_comfy.e2e --json out/e2e.json --md out/e2e.md
    python -m pisa_comfy.e2e --toy                      # CPU, tiny models, reference backend (< 1 min)

Builds ComfyUI's own diffusion models (Wan2.1-14B and 1.3B, HunyuanVideo, FLUX.1-dev) with random
bf16 weights on the GPU and times one model forward, i.e. one sampling step, the way a sampler
calls it: ``BaseModel.apply_model`` with the conditioning run through the model's ``extra_conds``,
the patcher's wrappers and callbacks merged into ``transformer_options`` (as
``comfy.sampler_helpers.prepare_model_patcher`` does), ``sample_sigmas``, ``sigmas``,
``cond_or_uncond`` and ``uuids`` set as ``comfy.samplers._calc_cond_batch`` sets them.  The model
configurations are ComfyUI's own: a state dict with the real checkpoint's keys and shapes (built on
the meta device, no memory) goes through ``comfy.model_detection.model_config_from_unet``, which
picks the ``supported_models`` class and fills in the rest, exactly as when loading the checkpoint.

Per model, in one process:

* **dense**: the unpatched model, ComfyUI's default attention (``optimized_attention``: PyTorch SDPA
  on CUDA), with PyTorch's default SDPA priority and, unless ``--sdpa default``, once more with
  cuDNN attention first (ComfyUI's own priority list on Windows).  The faster is the baseline.
* **gated**: the PISA-patched model (the node's own ``patch`` at its default widgets) at a step it
  keeps dense (``dense_steps``): must cost what dense costs.
* **sparse**: the patched model at its first sparse step.
* **no-attention**: every attention call replaced by zeros, i.e. the time of everything else, so
  ``1 - no_attention / dense`` is the share of the step spent in attention.

It reports the per-step speed-up, the share of attention, the attention time PISA's own run
statistics measured (CUDA events around every call), and projects full runs: the bundled workflow's
steps and dense steps, and the issue's 50 steps / 10 dense.  ``--compile`` checks that a patched
model still works under ``torch.compile`` the way ComfyUI's TorchCompileModel node applies it, and
counts graph breaks against the unpatched model.

Each model runs in its own ``try``: an error is recorded and the next model runs.  The JSON and
markdown files are rewritten after every model, so a run cut short still leaves what it measured.
See docs/e2e.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.abc
import importlib.util
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import types
import uuid
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
#: The name ComfyUI would import the repository under (its folder name); tests use the same one.
PACK_NAME = "ComfyUI-PISA"
#: The issue's full-run setting (Wan2.1-14B and HunyuanVideo bars).
ISSUE_STEPS, ISSUE_DENSE_STEPS = 50, 10

log = logging.getLogger("pisa.e2e")


# ---- what is measured --------------------------------------------------------------------------

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
_DEPTH_KEYS = {"wan": ("num_layers",), "flux": ("depth", "depth_single_blocks"),
               "hunyuan_video": ("depth", "depth_single_blocks")}
COMPILE_TOY_SPECS = {s.family: s for s in TOY_SPECS.values()}


# ---- ComfyUI -----------------------------------------------------------------------------------

class _UnavailableModule(types.ModuleType):
    """Stand-in for an optional package that ComfyUI imports at module level but this script never
    uses: any attribute access fails loudly, so it cannot silently change what is measured."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self.__name__}.{name}: {self.__name__.split('.')[0]} is not installed; "
                             f"pisa_comfy.e2e put a stub in its place (see _STUBBED_IF_MISSING)")


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


# ---- building a model --------------------------------------------------------------------------

def _family_class(family: str):
    module = {"wan": "comfy.ldm.wan.model", "flux": "comfy.ldm.flux.model",
              "hunyuan_video": "comfy.ldm.hunyuan_video.model"}[family]
    name = {"wan": "WanModel", "flux": "Flux", "hunyuan_video": "HunyuanVideo"}[family]
    return getattr(importlib.import_module(module), name)


def _known_kwargs(family: str, structure: dict) -> dict:
    """FLUX / HunyuanVideo take a params dataclass whose fields differ between ComfyUI versions."""
    if family == "wan":
        return dict(structure)
    mod = importlib.import_module({"flux": "comfy.ldm.flux.model", "hunyuan_video": "comfy.ldm.hunyuan_video.model"}[family])
    params = getattr(mod, {"flux": "FluxParams", "hunyuan_video": "HunyuanVideoParams"}[family])
    known = {f.name for f in dataclasses.fields(params)}
    return {k: v for k, v in structure.items() if k in known}


def detect_model_config(C, spec: Spec, dtype: torch.dtype):
    """ComfyUI's own model config for a checkpoint of ``spec``'s structure: the parameter names and
    shapes (meta tensors, no memory) go through ``model_detection.model_config_from_unet``, as when
    ComfyUI loads the checkpoint.  Returns ``(model_config, overrides)``: where this ComfyUI's
    detection hard-codes a size instead of reading it (v0.3.64 FLUX: hidden 3072, text 4096), the
    requested value is put back and listed in ``overrides`` (never the case at real sizes)."""
    kwargs = _known_kwargs(spec.family, spec.structure)
    meta = _family_class(spec.family)(**kwargs, device="meta", dtype=dtype, operations=C.ops.disable_weight_init)
    state_dict = meta.state_dict()
    del meta
    model_config = C.model_detection.model_config_from_unet(state_dict, "")
    if model_config is None:
        raise RuntimeError(f"ComfyUI's model detection did not recognise the {spec.family} state dict")
    overrides = {}
    for key, want in kwargs.items():
        have = model_config.unet_config.get(key, want)
        if _normalise(have) != _normalise(want):
            overrides[key] = {"detected": have, "used": want}
            model_config.unet_config[key] = want
    return model_config, overrides


def _normalise(v):
    return list(v) if isinstance(v, tuple) else v


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """comfy.ops layers are created with ``torch.empty``; give them small random values in place
    (milliseconds on the GPU, even for 14B parameters; the speed does not depend on the values)."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for p in module.parameters():
        if p.is_floating_point():
            p.normal_(0.0, 0.02, generator=gen)


def build(C, spec: Spec, device: torch.device, dtype: torch.dtype):
    """(ModelPatcher, model_config, detection overrides) of a random-weight model of ``spec``,
    resident on ``device``."""
    model_config, overrides = detect_model_config(C, spec, dtype)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    init_weights(model.diffusion_model)
    model.to(device)  # the rest of the BaseModel (model_sampling), as loading it for sampling does
    model.eval()
    patcher = C.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    return patcher, model_config, overrides


# ---- one sampling step the way the sampler runs it ---------------------------------------------

def simple_schedule(model_sampling, steps: int) -> torch.Tensor:
    """``comfy.samplers.simple_scheduler`` (imported from there it would pull torchsde)."""
    sigmas = model_sampling.sigmas
    ss = len(sigmas) / steps
    return torch.FloatTensor([float(sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])


def make_inputs(model, spec: Spec, device: torch.device, latent=None, seed: int = 0):
    """(x, processed conds) as the sampler hands them to ``apply_model``: the latent batch (cond and
    uncond share it under CFG) and the model's ``extra_conds`` of each prompt, concatenated."""
    g = torch.Generator().manual_seed(seed)
    latent = tuple(spec.latent if latent is None else latent)
    noise = torch.randn((1,) + latent, generator=g).to(device)
    ctx_dim = _context_dim(model)
    prompts = []
    for _ in range(2 if spec.cfg else 1):
        kwargs = {"cross_attn": torch.randn(1, spec.text_tokens, ctx_dim, generator=g).to(device)}
        if spec.family in ("flux", "hunyuan_video"):
            vec = getattr(getattr(model.diffusion_model, "vector_in", None), "in_layer", None)
            if vec is not None:
                kwargs["pooled_output"] = torch.randn(1, vec.in_features, generator=g).to(device)
        if spec.text_valid is not None and spec.text_valid < spec.text_tokens:
            mask = torch.zeros(1, spec.text_tokens, dtype=torch.long)
            mask[:, :spec.text_valid] = 1
            kwargs["attention_mask"] = mask.to(device)
        kwargs.update(device=device, noise=noise, width=latent[-1] * 8, height=latent[-2] * 8, prompt_type="positive")
        conds = model.extra_conds(**kwargs)
        prompts.append({k: v.process_cond(batch_size=1, area=None) for k, v in conds.items()})
    if spec.cfg:
        prompts.reverse()  # the sampler batches [uncond, cond]: cond_or_uncond == [1, 0]
    merged = {k: prompts[0][k].concat([p[k] for p in prompts[1:]]) for k in prompts[0]}
    x = torch.cat([noise] * len(prompts))
    return x, merged


def _context_dim(model) -> int:
    dm = model.diffusion_model
    for path in ("text_embedding.0", "txt_in.input_embedder", "txt_in"):
        mod = dm
        for part in path.split("."):
            mod = getattr(mod, part, None) if not part.isdigit() else (mod[int(part)] if mod is not None else None)
        if mod is not None and hasattr(mod, "in_features"):
            return mod.in_features
    raise RuntimeError(f"cannot tell the text width of {type(dm).__name__}")


class StepRunner:
    """Model evaluations of one sampling run of one patcher, as ``comfy.samplers`` makes them:
    ``pre_run``, wrappers and callbacks merged into the run's ``transformer_options`` with
    ``sample_sigmas``; per evaluation ``prepare_state``, fresh per-call options (``apply_hooks`` +
    ``merge_nested_dicts``) with ``cond_or_uncond``, ``uuids`` and ``sigmas``; ``cleanup`` at the end
    (PISA publishes its run statistics there)."""

    def __init__(self, C, patcher, sample_sigmas: torch.Tensor, x, conds):
        self.C, self.patcher, self.x, self.conds = C, patcher, x, conds
        self.model = patcher.model
        self.options = C.model_patcher.create_model_options_clone(patcher.model_options)
        self.options.setdefault("transformer_options", {})
        C.sampler_helpers.prepare_model_patcher(patcher, {}, self.options)
        self.options["transformer_options"]["sample_sigmas"] = sample_sigmas.to(x.device)
        self.chunks = x.shape[0]
        self.cond_or_uncond = [1, 0] if self.chunks == 2 else [0]
        self.uuids = [uuid.uuid4() for _ in range(self.chunks)]
        patcher.pre_run()
        self.closed = False

    def __call__(self, sigma: float):
        timestep = torch.tensor([sigma], dtype=torch.float32, device=self.x.device)
        self.patcher.prepare_state(timestep)
        to = self.patcher.apply_hooks(hooks=None)
        to = self.C.patcher_extension.merge_nested_dicts(to, self.options["transformer_options"], copy_dict1=False)
        to["cond_or_uncond"] = self.cond_or_uncond[:]
        to["uuids"] = self.uuids[:]
        to["sigmas"] = timestep
        c = dict(self.conds)
        c["transformer_options"] = to
        return self.model.apply_model(self.x, torch.cat([timestep] * self.chunks), **c)

    def close(self):
        if not self.closed:
            self.closed = True
            self.patcher.cleanup()


def noop_attention(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                   skip_output_reshape=False, **kwargs):
    """An attention override that computes nothing (zeros of the right shape): the rest of the step."""
    if skip_reshape:
        b, h, n, _ = q.shape
        dv = v.shape[-1]
    else:
        b, n, _ = q.shape
        h, dv = heads, v.shape[-1] // heads
    return q.new_zeros((b, h, n, dv)) if skip_output_reshape else q.new_zeros((b, n, h * dv))


def with_override(patcher, override):
    m = patcher.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return m


# ---- timing ------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Budget:
    """Wall-clock budget of the whole run (``--budget-s``).  Optional passes (the cuDNN-first
    baseline, the no-attention pass, the compile check) are skipped, with a note, when they would
    eat into the time the models still to come are expected to need (``ESTIMATE_S``)."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.reserved = 0.0  # expected time of what is still to come

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.left() - self.reserved > estimate_s


#: Rough H100 seconds of each case's essential passes with --quick (for --budget-s only).
ESTIMATE_S = {"wan2.1-14b-720p": 130, "hunyuan-video-720p": 130, "hunyuan-video-720p-nomask": 100,
              "wan2.1-1.3b-480p": 25, "flux1-dev-1024": 15, "flux1-dev-2048": 25, "compile": 90}


def sdpa_context(name: str):
    """``default``: PyTorch's own SDPA priority (what ComfyUI uses on Linux); ``cudnn``: cuDNN
    attention first, then flash, efficient, math (the priority ComfyUI sets on Windows)."""
    if name == "default":
        return nullcontext()
    import inspect

    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(order, set_priority=True)
    return sdpa_kernel(order)


def time_pass(run, sigma: float, device, *, min_reps: int, target_s: float, max_reps: int = 20, warm=None,
              after_warmup=None):
    """Wall time (ms, median) of full evaluations: at least ``min_reps``, more while less than
    ``target_s`` has been timed (short steps), at most ``max_reps``; after one warm-up evaluation
    (``warm``, e.g. a runner on a short latent, else ``run`` itself).  Also the peak memory of the
    timed evaluations and the last output."""
    (warm or run)(sigma)
    _sync(device)
    if after_warmup is not None:
        after_warmup()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, out = [], None
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < target_s * 1000.0):
        out = None
        _sync(device)
        t0 = time.perf_counter()
        out = run(sigma)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms": statistics.median(times), "all_ms": [round(t, 2) for t in times], "peak_gb": peak}, out


def _stats_per_forward(payload: dict | None, forwards: int) -> dict | None:
    if not payload:
        return None
    return {"attn_ms": payload["attn_ms"] / forwards, "calls": payload["calls"] // forwards,
            "pisa_calls": payload["pisa_calls"] // forwards, "density": payload["density"], "text": payload["text"]}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- one model ---------------------------------------------------------------------------------

def short_latent(spec: Spec) -> tuple:
    """A small latent of the same width/height (video: 2 frames; images: a quarter of the area),
    for warm-up: compiles and loads the kernels of the real shapes' code paths at little cost."""
    if len(spec.latent) == 4:
        c, f, h, w = spec.latent
        return (c, min(f, 2), h, w)
    c, h, w = spec.latent
    return (c, max(2, h // 2), max(2, w // 2))


def tokens_of(spec: Spec, patch) -> int:
    if len(spec.latent) == 4:
        c, f, h, w = spec.latent
        return math.prod(math.ceil(s / p) for s, p in zip((f, h, w), patch))
    c, h, w = spec.latent
    return math.ceil(h / patch) * math.ceil(w / patch)


def bench_model(C, pack, spec: Spec, opts, budget: Budget) -> dict:
    device, dtype = opts.device, opts.dtype
    node_cls = pack.NODE_CLASS_MAPPINGS["PISAPatch"]
    res: dict = {"model": spec.name, "title": spec.title, "family": spec.family, "notes": []}
    t_start = time.perf_counter()

    workflow = read_workflow(spec.workflow, node_cls)
    widgets = node_defaults(node_cls)
    res["settings_source"] = "node defaults"
    if opts.settings == "workflow" and workflow and workflow.get("pisa"):
        widgets, res["settings_source"] = dict(workflow["pisa"]), f"workflow {workflow['file']}"
    widgets.update(opts.widget_overrides)
    if opts.widget_overrides:
        res["settings_source"] += " + " + ", ".join(f"{k}={v}" for k, v in opts.widget_overrides.items())
    res["settings"], res["workflow"] = widgets, workflow

    t0 = time.perf_counter()
    patcher, model_config, overrides = build(C, spec, device, dtype)
    _sync(device)
    if overrides:
        res["detection_overrides"] = overrides
        res["notes"].append(f"ComfyUI's detection hard-codes {sorted(overrides)} here; used the requested values")
    model = patcher.model
    dm = model.diffusion_model
    opts.last_model = weakref.ref(model)  # main() checks that it is gone before the next case
    res.update(build_s=time.perf_counter() - t0, supported_model=type(model_config).__name__,
               model_class=type(model).__name__, diffusion_class=type(dm).__name__,
               unet_config={k: v for k, v in model_config.unet_config.items() if k != "dtype"},
               params_b=sum(p.numel() for p in dm.parameters()) / 1e9,
               image_tokens=tokens_of(spec, dm.patch_size), text_tokens=spec.text_tokens,
               text_valid=spec.text_valid, batch=2 if spec.cfg else 1, latent=list(spec.latent))
    if device.type == "cuda":
        res["weights_gb"] = torch.cuda.memory_allocated(device) / 2**30

    dense_steps = int(widgets["dense_steps"])
    steps = max(ISSUE_STEPS, dense_steps + 1)
    sample_sigmas = simple_schedule(model.model_sampling, steps)
    dense_sigma, sparse_sigma = float(sample_sigmas[0]), float(sample_sigmas[dense_steps])
    res["schedule"] = {"steps": steps, "dense_step": 0, "dense_step_sigma": dense_sigma, "sparse_step": dense_steps,
                       "sparse_step_sigma": sparse_sigma}

    def pass_s(step_ms: float) -> float:  # expected seconds of one more pass of this model
        return step_ms / 1000.0 * (1.3 if opts.quick else 1 + max(opts.reps, opts.target_s * 1000.0 / step_ms))

    x, conds = make_inputs(model, spec, device)
    wx, wconds = make_inputs(model, spec, device, latent=short_latent(spec), seed=1) if opts.quick else (x, conds)
    (pisa_patcher,) = node_cls().patch(patcher, unique_id="e2e", **widgets)
    state = pisa_patcher.model_options["transformer_options"]["optimized_attention_override"].pisa_state
    pin_backend(state, opts, res)
    variants = {"dense": patcher, "pisa": pisa_patcher, "noop": with_override(patcher, noop_attention)}

    def measure(name: str, sigma: float, ctx: str):
        """One pass: a sampling run of its own (StepRunner), warm-up, timed evaluations.  The
        warm-up runs at full size, except with --quick for steps slower than 3 s (known after the
        first dense pass), which warm up on a short latent instead."""
        run = StepRunner(C, variants[name], sample_sigmas, x, conds)
        slow = not res.get("dense") or min(t["ms"] for t in res["dense"].values()) > 3000.0
        warm = StepRunner(C, variants[name], sample_sigmas, wx, wconds) if opts.quick and slow else None
        try:
            with sdpa_context(ctx):
                result, out = time_pass(run, sigma, device, min_reps=opts.reps, target_s=opts.target_s,
                                        warm=warm, after_warmup=state.finish_run)
            if name == "pisa":  # PISA's own statistics of the timed evaluations (CUDA events per call)
                result["pisa_stats"] = _stats_per_forward(state.finish_run(), len(result["all_ms"]))
            return result, out
        finally:
            for r in (warm, run):
                if r is not None:
                    r.close()

    outputs = {}
    contexts = ["default"] if device.type != "cuda" or opts.sdpa == "default" else \
        ["default", "cudnn"] if opts.sdpa == "both" else ["cudnn"]
    with torch.inference_mode():
        if opts.quick:
            res["prime_s"] = prime(C, patcher, sample_sigmas, x, conds, dense_sigma, contexts, device)
        # Dense under each SDPA priority; the faster is the baseline and the context of the rest.
        res["dense"] = {}
        for ctx in contexts:
            if res["dense"] and not budget.allows(pass_s(min(t["ms"] for t in res["dense"].values()))):
                res["notes"].append(f"dense with SDPA priority '{ctx}' skipped: time budget")
                continue
            try:
                res["dense"][ctx], outputs[ctx] = measure("dense", dense_sigma, ctx)
            except Exception as exc:  # e.g. no kernel for a mask under this priority: keep the other
                res["notes"].append(f"dense with SDPA priority '{ctx}' failed: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
                del exc
                free(device)
        if not res["dense"]:
            raise RuntimeError("no dense measurement succeeded: " + "; ".join(res["notes"]))
        best = min(res["dense"], key=lambda k: res["dense"][k]["ms"])
        res["dense_best"], dense_ms = best, res["dense"][best]["ms"]

        res["gated"], out_gated = measure("pisa", dense_sigma, best)
        res["sparse"], out_sparse = measure("pisa", sparse_sigma, best)
        if budget.allows(pass_s(dense_ms)):
            res["noop"], _ = measure("noop", dense_sigma, best)
        else:
            res["notes"].append("no-attention pass skipped: time budget")

        ref = outputs[best]
        res["checks"] = {
            "finite_dense": bool(torch.isfinite(ref).all()), "finite_sparse": bool(torch.isfinite(out_sparse).all()),
            # the dense step of the patched model calls ComfyUI's attention exactly as the model did
            "gated_max_abs_diff_vs_dense": float((out_gated.float() - ref.float()).abs().max()),
            # random weights: only a sanity check that the sparse step computes something close
            "sparse_rel_l2_vs_dense": rel_l2(out_sparse, ref)}

    gs, ss = res["gated"].get("pisa_stats") or {}, res["sparse"].get("pisa_stats") or {}
    if gs.get("pisa_calls"):
        res["notes"].append("the dense step ran PISA calls: step gating did not hold")
    if not ss.get("pisa_calls"):
        res["notes"].append("the sparse step ran no PISA call (see sparse.pisa_stats.text)")
    res["summary"] = summarize(res, dense_ms, workflow)
    res["wall_s"] = time.perf_counter() - t_start
    return res


def pin_backend(state, opts, res: dict) -> None:
    """--toy: the node runs Triton or stays dense; on the CPU the toy pins PISA's PyTorch reference
    (as the node-layer tests do), so that the sparse path runs at all."""
    if opts.toy and getattr(state.settings, "backend", None) != "reference":
        state.settings = dataclasses.replace(state.settings, backend="reference")
        res["backend_pinned"] = "reference"


def prime(C, patcher, sample_sigmas, x, conds, sigma: float, contexts, device) -> float:
    """--quick: warm everything up at the full size at the cost of about one step without attention:
    one full-size forward whose attention calls are only recorded (one per distinct call shape),
    then each recorded call once through ComfyUI's dense backend under each SDPA priority (cuDNN
    builds its plans per shape).  The passes after it then warm up on a short latent only."""
    t0 = time.perf_counter()
    calls: dict[tuple, tuple] = {}

    def recording(func, *args, **kwargs):
        key = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args[:4]) + tuple(
            (k, tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in sorted(kwargs.items())
            if k in ("mask", "skip_reshape", "skip_output_reshape", "heads"))
        calls.setdefault(key, (func, args, kwargs))
        return noop_attention(func, *args, **kwargs)

    run = StepRunner(C, with_override(patcher, recording), sample_sigmas, x, conds)
    try:
        run(sigma)
    finally:
        run.close()
    for ctx in contexts:
        with sdpa_context(ctx):
            for func, args, kwargs in calls.values():
                try:
                    func(*args, **kwargs)
                except Exception:  # noqa: BLE001 - the dense pass under this priority reports it
                    break
    _sync(device)
    calls.clear()
    return time.perf_counter() - t0


def summarize(res: dict, dense_ms: float, workflow: dict | None) -> dict:
    gated_ms, sparse_ms = res["gated"]["ms"], res["sparse"]["ms"]
    s = {"dense_ms": dense_ms, "dense_sdpa": res["dense_best"], "gated_ms": gated_ms,
         "gated_over_dense": gated_ms / dense_ms, "sparse_ms": sparse_ms, "step_speedup": dense_ms / sparse_ms}
    if "noop" in res:
        rest = res["noop"]["ms"]
        s["no_attention_ms"] = rest
        s["attention_share"] = max(0.0, dense_ms - rest) / dense_ms
        # attention and everything PISA adds around it (layouts, routing, permutations)
        s["sparse_attention_ms"] = max(0.0, sparse_ms - rest)
        if dense_ms > rest and sparse_ms > rest:
            s["attention_speedup"] = (dense_ms - rest) / (sparse_ms - rest)
    ga, sa = res["gated"].get("pisa_stats") or {}, res["sparse"].get("pisa_stats") or {}
    if ga:
        s["attn_events_ms_dense"] = ga["attn_ms"]
    if sa:
        s["attn_events_ms_sparse"] = sa["attn_ms"]
        s["pisa_calls"] = f"{sa['pisa_calls']}/{sa['calls']}"
        s["density"] = sa["density"]
    runs = {}
    if workflow and workflow.get("steps") and workflow.get("pisa"):
        runs["workflow"] = (workflow["steps"], int(workflow["pisa"]["dense_steps"]))
    runs["issue"] = (ISSUE_STEPS, ISSUE_DENSE_STEPS)
    for key, (steps, dense_steps) in runs.items():
        dense_steps = min(dense_steps, steps)
        full_dense = steps * dense_ms / 1000.0
        full_pisa = (dense_steps * gated_ms + (steps - dense_steps) * sparse_ms) / 1000.0
        s[f"run_{key}"] = {"steps": steps, "dense_steps": dense_steps, "dense_s": full_dense, "pisa_s": full_pisa,
                           "speedup": full_dense / full_pisa}
    return s


# ---- torch.compile -----------------------------------------------------------------------------

def _skip_transformer_options_guards(guard_entries):
    """What ComfyUI's TorchCompileModel (v0.19.3) passes as ``guard_filter_fn``."""
    return [("transformer_options" not in entry.name) for entry in guard_entries]


def _compile_kwargs(C, backend: str) -> dict:
    """The arguments TorchCompileModel of this ComfyUI passes to ``set_torch_compile_wrapper``."""
    node = C.root / "comfy_extras" / "nodes_torch_compile.py"
    kwargs = {"backend": backend}
    if node.is_file() and "guard_filter_fn" in node.read_text():
        kwargs["options"] = {"guard_filter_fn": _skip_transformer_options_guards}
    return kwargs


class GraphBreakLog(logging.Handler):
    """Collects dynamo's graph-break records (the ``graph_breaks`` log artifact, quietly): where
    each break happened, why, and the user stack that led there."""

    LOGGER = "torch._dynamo.symbolic_convert.__graph_breaks"
    _AT = re.compile(r"in user code at (.+?):(\d+)")
    _FRAME = re.compile(r'File "(.+?)", line (\d+), in (\S+)')

    LIMIT_LOGGER = "torch._dynamo.convert_frame"  # "torch._dynamo hit config.recompile_limit (8)"

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[dict] = []
        self.limit_hits: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if "hit config." in text:  # a frame recompiled too often: dynamo runs it eagerly from now on
            self.limit_hits.append(" ".join(text.splitlines()[:2])[:240])
            return
        lines = text.splitlines()
        m = self._AT.search(lines[0] if lines else "")
        if not m:
            return
        reason = next((ln.strip() for ln in lines[1:] if ln.strip() and not ln.startswith(
            ("Graph Break Reason", "User code"))), "")
        stack = text.split("User code traceback:", 1)[1] if "User code traceback:" in text else ""
        self.records.append({"path": m.group(1), "line": int(m.group(2)), "reason": reason,
                             "opaque_pisa": "pisa_attention_override" in text,
                             "frames": [(f, int(n), fn) for f, n, fn in self._FRAME.findall(stack)]})

    @contextmanager
    def capture(self):
        logger, limits = logging.getLogger(self.LOGGER), logging.getLogger(self.LIMIT_LOGGER)
        chatty = logging.getLogger("torch._dynamo.variables.tensor")  # "Graph break from Tensor.item()" advice
        saved = logger.level, logger.propagate, chatty.level
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(self)
        limits.addHandler(self)
        chatty.setLevel(logging.ERROR)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            limits.removeHandler(self)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
            chatty.setLevel(saved[2])

    def classified(self) -> dict:
        """Distinct break sites, by kind: ``opaque_override`` (the call of PISA's override: one per
        attention call, expected), ``per_forward`` (PISA's DIFFUSION_MODEL wrapper bookkeeping),
        ``inside_attention`` (PISA code inside an attention call: must not happen),
        ``outside_pisa`` (ComfyUI's or torch's own; present unpatched too)."""
        sites: dict[tuple[str, int], dict] = {}
        for r in self.records:
            key = (r["path"], r["line"])
            site = sites.get(key)
            if site is None:
                site = sites[key] = {"at": f"{_short(r['path'])}:{r['line']}", "count": 0, "reason": r["reason"][:160],
                                     "kind": None}
            site["count"] += 1
            if site["kind"] is None or (site["kind"] == "unknown" and r["frames"]):
                site["kind"] = _break_kind(r)
        out = {"opaque_override": [], "per_forward": [], "inside_attention": [], "outside_pisa": []}
        for site in sites.values():
            kind = site.pop("kind")
            out["per_forward" if kind == "unknown" else kind].append(site)
        return out


def _short(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except (ValueError, OSError):
        return path


def _in_repo(path: str) -> bool:
    try:
        Path(path).resolve().relative_to(REPO)
        return True
    except (ValueError, OSError):
        return False


def _break_kind(record: dict) -> str:
    """Which kind of break site a record is (see :meth:`GraphBreakLog.classified`)."""
    if record["opaque_pisa"]:
        return "opaque_override"
    frames = record["frames"] or [(record["path"], record["line"], "?")]
    if not any(_in_repo(f) for f, _, _ in frames):
        return "outside_pisa"
    if any(f.replace("\\", "/").endswith("comfy/ldm/modules/attention.py") and fn == "wrapper" for f, _, fn in frames):
        return "inside_attention"
    return "per_forward" if record["frames"] else "unknown"


def compile_check(C, pack, spec: Spec, opts) -> dict:
    """Compile the diffusion model the way ComfyUI's TorchCompileModel node does
    (``comfy_api.torch_helpers.set_torch_compile_wrapper``: an APPLY_MODEL wrapper that swaps in
    ``torch.compile(diffusion_model)``), unpatched and PISA-patched (dense_steps 1, min_tokens 0,
    so the small model's self-attention runs PISA from step 1), run step 0 (dense), step 1 and
    step 2 (sparse), and count dynamo's graph breaks and graphs.  Patched, each attention call
    may add one break (the override is one opaque call); a repeated sparse step must add no graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from comfy_api.torch_helpers import set_torch_compile_wrapper

    device, dtype = opts.device, opts.dtype
    node_cls = pack.NODE_CLASS_MAPPINGS["PISAPatch"]
    kwargs = _compile_kwargs(C, opts.compile_backend)
    res = {"model": spec.name, "backend": opts.compile_backend, "torch": torch.__version__,
           "guard_filter_fn": "options" in kwargs}
    patcher, _, _ = build(C, spec, device, dtype)
    model = patcher.model
    widgets = dict(node_defaults(node_cls), min_tokens=0, dense_steps=1)
    (pisa_patcher,) = node_cls().patch(patcher, unique_id="e2e-compile", **widgets)
    pin_backend(pisa_patcher.model_options["transformer_options"]["optimized_attention_override"].pisa_state,
                opts, res)
    sample_sigmas = simple_schedule(model.model_sampling, 10)
    x, conds = make_inputs(model, spec, device)
    res["attention_calls_per_forward"] = attention_calls_per_forward(C, pisa_patcher, sample_sigmas, x, conds)
    eager = {}
    try:
        for name, base in (("unpatched", patcher), ("pisa", pisa_patcher)):
            m = base.clone()
            set_torch_compile_wrapper(model=m, **kwargs)
            torch._dynamo.reset()
            counters.clear()
            run = StepRunner(C, m, sample_sigmas, x, conds)
            forwards = []
            t_all = time.perf_counter()
            breaks = GraphBreakLog()
            try:
                with torch.inference_mode(), breaks.capture():
                    for step in (0, 1, 2):
                        t0 = time.perf_counter()
                        y = run(float(sample_sigmas[step]))
                        _sync(device)
                        forwards.append({"step": step, "s": round(time.perf_counter() - t0, 3),
                                         "graph_breaks": sum(counters["graph_break"].values()),
                                         "unique_graphs": counters["stats"].get("unique_graphs", 0),
                                         "finite": bool(torch.isfinite(y).all())})
                    eager[name] = y
            finally:
                run.close()
            reasons = sorted(counters["graph_break"].items(), key=lambda kv: -kv[1])
            res[name] = {"forwards": forwards, "total_s": round(time.perf_counter() - t_all, 2),
                         "graph_breaks": forwards[-1]["graph_breaks"], "unique_graphs": forwards[-1]["unique_graphs"],
                         "break_reasons": [[r[:200], n] for r, n in reasons[:8]],
                         "break_sites": breaks.classified(), "recompile_limit_hits": breaks.limit_hits}
    finally:
        torch._dynamo.reset()
    # the compiled patched model computes what the eager patched model computes
    run = StepRunner(C, pisa_patcher, sample_sigmas, x, conds)
    try:
        with torch.inference_mode():
            res["compiled_vs_eager_rel_l2"] = rel_l2(eager["pisa"], run(float(sample_sigmas[2])))
    finally:
        run.close()
    up, pi = res["unpatched"], res["pisa"]
    where = pi["break_sites"]
    res["extra_graph_breaks"] = pi["graph_breaks"] - up["graph_breaks"]
    res["graphs_added_by_repeated_sparse_step"] = pi["forwards"][2]["unique_graphs"] - pi["forwards"][1]["unique_graphs"]
    res["breaks_inside_attention"] = len(where["inside_attention"])
    res["per_forward_break_sites"] = len(where["per_forward"])
    # usable: inside an attention call nothing but the one opaque override breaks the graph, a
    # repeated sparse step reuses the compiled graphs, and the output is finite
    res["ok"] = bool(not where["inside_attention"] and res["graphs_added_by_repeated_sparse_step"] == 0
                     and not pi["recompile_limit_hits"] and all(f["finite"] for f in pi["forwards"]))
    return res


def attention_calls_per_forward(C, patcher, sample_sigmas, x, conds) -> int:
    """Calls of ComfyUI's attention function in one forward (all of them, self and cross)."""
    seen = []

    def counting(func, *args, **kwargs):
        seen.append(1)
        return noop_attention(func, *args, **kwargs)

    run = StepRunner(C, with_override(patcher, counting), sample_sigmas, x, conds)
    try:
        with torch.inference_mode():
            run(float(sample_sigmas[0]))
    finally:
        run.close()
    return len(seen)


# ---- reporting ---------------------------------------------------------------------------------

def environment(C, opts) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, "-m", "pisa_comfy.e2e"] + sys.argv[1:]),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "comfyui": C.version, "comfyui_path": str(C.root), "stubbed_modules": C.stubbed,
           "dense_attention": getattr(C.attention.optimized_attention, "__name__", str(C.attention.optimized_attention)),
           "device": str(opts.device), "dtype": str(opts.dtype).replace("torch.", "")}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if opts.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(opts.device)
        env["cudnn"] = torch.backends.cudnn.version()
    env["commit"] = os.environ.get("PISA_COMMIT")  # the device's copy of the tree has no .git
    if not env["commit"]:
        try:
            env["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
        except Exception:  # noqa: BLE001
            env["commit"] = None
    return env


def _f(v, fmt="{:.2f}", none="–"):
    return none if v is None else fmt.format(v)


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "tokens x batch", "dense s/step (SDPA)", "gated (x dense)", "sparse s/step", "step speedup",
            "attn share", "PISA calls, density", "workflow run dense -> PISA", "50/10 run", "peak GB"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], "", "ERROR: " + r["error"].splitlines()[0][:90]] + [""] * (len(head) - 3))
            continue
        s = r["summary"]
        wf, iss = s.get("run_workflow"), s["run_issue"]
        peak = max((v.get("peak_gb") or 0) for v in [*r["dense"].values(), r["gated"], r["sparse"]])
        rows.append([
            r["model"], (f"{r['image_tokens']} x{r['batch']}" if r["family"] == "wan" else
                         f"{r['image_tokens']}+{r['text_tokens']} x{r['batch']}"),
            f"{s['dense_ms'] / 1000:.2f} ({s['dense_sdpa']})",
            f"{s['gated_ms'] / 1000:.2f} ({s['gated_over_dense']:.3f})", f"{s['sparse_ms'] / 1000:.2f}",
            f"{s['step_speedup']:.2f}x", _f(s.get("attention_share"), "{:.0%}"),
            f"{s.get('pisa_calls', '–')}, {_f(s.get('density'), '{:.3f}')}",
            (f"{wf['steps']}/{wf['dense_steps']}: {wf['dense_s']:.0f}s -> {wf['pisa_s']:.0f}s ({wf['speedup']:.2f}x)"
             if wf else "–"),
            f"{iss['dense_s']:.0f}s -> {iss['pisa_s']:.0f}s ({iss['speedup']:.2f}x)",
            _f(peak or None, "{:.1f}")])
    return head, rows


def header_lines(report: dict) -> list[str]:
    env = report["environment"]
    return [f"# PISA Patch end to end ({env.get('gpu') or env['device']})", "",
            f"- date {env['date']}, command `{env['command']}`",
            f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env.get('cudnn')}, triton {env['triton']}, "
            f"ComfyUI {env['comfyui']}, dense attention `{env['dense_attention']}`, commit {env['commit']}",
            f"- {report['settings_note']}"]


def note_lines(report: dict) -> list[str]:
    lines = [f"- {r['model']}: {n}" for r in report["results"] for n in r.get("notes", [])]
    for c in report.get("compile", []):
        if "error" in c:
            lines.append(f"- torch.compile {c['model']}: {c['error'].splitlines()[0]}")
            continue
        w = c["pisa"]["break_sites"]
        lines.append(
            f"- torch.compile ({c['backend']}) {c['model']}: {'OK' if c['ok'] else 'NOT OK'}; graph breaks "
            f"{c['unpatched']['graph_breaks']} unpatched, {c['pisa']['graph_breaks']} patched "
            f"({c['attention_calls_per_forward']} attention calls per forward); PISA break sites: "
            f"{len(w['opaque_override'])} opaque override, {len(w['per_forward'])} per forward "
            f"({', '.join(x['at'] for x in w['per_forward']) or '-'}), {len(w['inside_attention'])} inside attention; "
            f"graphs {c['unpatched']['unique_graphs']} -> {c['pisa']['unique_graphs']}, new on a repeated sparse "
            f"step {c['graphs_added_by_repeated_sparse_step']}; recompile-limit hits "
            f"{len(c['unpatched']['recompile_limit_hits'])} unpatched, {len(c['pisa']['recompile_limit_hits'])} patched; "
            f"step s (compiled, 3rd step) {c['unpatched']['forwards'][-1]['s']:.3f} unpatched, "
            f"{c['pisa']['forwards'][-1]['s']:.3f} patched; compiled vs eager rel L2 {c['compiled_vs_eager_rel_l2']:.1e}")
    return lines


def markdown(report: dict) -> str:
    head, rows = table_rows(report["results"])
    lines = header_lines(report) + ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    notes = note_lines(report)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def compact_table(report: dict) -> str:
    head, rows = table_rows(report["results"])
    keep = [0, 2, 3, 4, 5, 6, 7, 8, 9]
    cols = [[head[i]] + [r[i] for r in rows] for i in keep]
    widths = [max(len(c) for c in col) for col in cols]
    out = []
    for j in range(len(rows) + 1):
        out.append("  ".join(col[j].ljust(w) for col, w in zip(cols, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out + note_lines(report))


def write_outputs(report: dict, opts) -> None:
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(report, indent=1, default=str))
    if opts.md:
        Path(opts.md).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.md).write_text(markdown(report))


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- main --------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pisa_comfy.e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None,
                    help="comma-separated names or 'all' (default: the issue's five). Real: " + ", ".join(SPECS)
                         + ". Toy: " + ", ".join(TOY_SPECS))
    ap.add_argument("--toy", action="store_true", help="tiny models on the CPU (fp32, PISA reference backend)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer timed steps (1 for slow steps); steps over 3 s warm up on a short latent (2 latent frames / "
                         "a quarter of the image)")
    ap.add_argument("--reps", type=int, default=None, help="least timed steps per pass (default 3; --quick 1)")
    ap.add_argument("--target-s", type=float, default=None,
                    help="time short steps until this many seconds per pass (default 10; --quick 2)")
    ap.add_argument("--sdpa", choices=["both", "default", "cudnn"], default="both",
                    help="dense baseline SDPA priority: PyTorch default, cuDNN first, or both (the faster wins)")
    ap.add_argument("--settings", choices=["defaults", "workflow"], default="defaults",
                    help="PISA widgets: the node's defaults or the bundled workflow's")
    ap.add_argument("--compile", action="store_true", help="also check torch.compile (TorchCompileModel path)")
    ap.add_argument("--compile-only", action="store_true", help="only the torch.compile check")
    ap.add_argument("--compile-models", default="wan", help="families for --compile: wan,flux,hunyuan_video or all")
    ap.add_argument("--compile-blocks", type=int, default=None,
                    help="blocks of the --compile model (Wan layers; FLUX/HunyuanVideo double and single each)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; CPU: eager)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget: optional passes (cuDNN baseline, no-attention) are skipped when short")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    ap.add_argument("--comfy", default=None, help="ComfyUI checkout (default $COMFYUI_PATH, else ~/comfy/ComfyUI)")
    ap.add_argument("--device", default=None, help="default cuda if available (--toy: cpu)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for --toy (default 1)")
    ap.add_argument("-v", "--verbose", action="store_true", help="ComfyUI's and PISA's log lines too")
    opts = ap.parse_args(argv)
    opts.device = torch.device(opts.device or ("cpu" if opts.toy or not torch.cuda.is_available() else "cuda"))
    if opts.device.type == "cuda" and opts.device.index is None:
        opts.device = torch.device("cuda", torch.cuda.current_device())
    if opts.device.type != "cuda" and not opts.toy:
        ap.error("real model sizes need a CUDA GPU; use --toy on the CPU")
    opts.dtype = torch.bfloat16 if opts.device.type == "cuda" else torch.float32
    if opts.device.type == "cpu":
        # Tiny CPU models: threads only add contention (on a busy 2-core machine, 10-100x slower).
        torch.set_num_threads(opts.threads)
    opts.reps = opts.reps or (1 if opts.quick else 3)
    opts.target_s = opts.target_s if opts.target_s is not None else (2.0 if opts.quick or opts.toy else 10.0)
    opts.compile_backend = opts.compile_backend or ("inductor" if opts.device.type == "cuda" else "eager")
    # Toy sequences are a few hundred tokens: below the node's min_tokens, so let them run PISA.
    opts.widget_overrides = {"min_tokens": 0} if opts.toy else {}
    specs = TOY_SPECS if opts.toy else SPECS
    names = (DEFAULT_MODELS if not opts.toy else list(TOY_SPECS)) if not opts.models else (
        list(specs) if opts.models == "all" else [m.strip() for m in opts.models.split(",") if m.strip()])
    unknown = [n for n in names if n not in specs]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(specs)}")
    opts.specs = [specs[n] for n in names]
    fams = ["wan", "flux", "hunyuan_video"] if opts.compile_models == "all" else \
        [f.strip() for f in opts.compile_models.split(",") if f.strip()]
    pool = COMPILE_TOY_SPECS if opts.toy else COMPILE_SPECS
    if any(f not in pool for f in fams):
        ap.error(f"--compile-models: choose from {list(pool)}")
    opts.compile_specs = [pool[f] for f in fams] if (opts.compile or opts.compile_only) else []
    if opts.compile_blocks:
        opts.compile_specs = [dataclasses.replace(s, structure={**s.structure, **{
            k: opts.compile_blocks for k in _DEPTH_KEYS[s.family]}}) for s in opts.compile_specs]
    if opts.compile_only:
        opts.specs = []
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING, format="%(message)s")
    if not opts.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    t0 = time.perf_counter()
    C = import_comfy(comfy_root(opts.comfy), cpu=opts.device.type == "cpu")
    pack = load_pack()
    budget = Budget(opts.budget_s - (time.perf_counter() - t0) if opts.budget_s else None)
    torch.manual_seed(0)
    report = {"environment": environment(C, opts), "results": [], "compile": [],
              "settings_note": ("PISA at the node's default widgets" if opts.settings == "defaults" else
                                "PISA at the bundled workflows' widgets")
              + (" (toy: min_tokens 0, PISA reference backend)" if opts.toy else "") + "; runs projected as workflow steps/dense steps and "
              f"the issue's {ISSUE_STEPS}/{ISSUE_DENSE_STEPS}"}
    print(f"[e2e] ComfyUI {C.version} at {C.root}; {report['environment'].get('gpu') or opts.device}; "
          f"torch {torch.__version__}; import {time.perf_counter() - t0:.1f}s", flush=True)
    compile_estimate = ESTIMATE_S["compile"] * len(opts.compile_specs)
    for i, spec in enumerate(opts.specs):
        budget.reserved = sum(ESTIMATE_S.get(s.name, 10) for s in opts.specs[i + 1:]) + compile_estimate
        print(f"[e2e] {spec.name}: {spec.title}", flush=True)
        try:
            res = bench_model(C, pack, spec, opts, budget)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next model
            res = {"model": spec.name, "title": spec.title, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()}
            print(res["traceback"], file=sys.stderr, flush=True)
        report["results"].append(res)
        free(opts.device)
        if getattr(opts, "last_model", None) is not None:
            res["model_freed"] = opts.last_model() is None
            opts.last_model = None
            if not res["model_freed"]:
                print(f"[e2e]   warning: {spec.name} is still referenced after its run", flush=True)
        if opts.device.type == "cuda":
            res["gpu_gb_after_free"] = torch.cuda.memory_allocated(opts.device) / 2**30
            s = res["summary"]
            print(f"[e2e]   dense {s['dense_ms'] / 1000:.3f}s ({s['dense_sdpa']}), gated {s['gated_ms'] / 1000:.3f}s, "
                  f"sparse {s['sparse_ms'] / 1000:.3f}s, step x{s['step_speedup']:.2f}, "
                  f"attention {_f(s.get('attention_share'), '{:.0%}')}, {res['wall_s']:.0f}s", flush=True)
        write_outputs(report, opts)
    for i, spec in enumerate(opts.compile_specs):
        budget.reserved = ESTIMATE_S["compile"] * (len(opts.compile_specs) - i - 1)
        if opts.specs and not budget.allows(ESTIMATE_S["compile"]):
            report["compile"].append({"model": spec.name, "error": "skipped: time budget"})
            continue
        print(f"[e2e] torch.compile check: {spec.name}", flush=True)
        try:
            res = compile_check(C, pack, spec, opts)
        except Exception as exc:  # noqa: BLE001
            res = {"model": spec.name, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(res["traceback"], file=sys.stderr, flush=True)
        report["compile"].append(res)
        free(opts.device)
        write_outputs(report, opts)
    report["total_s"] = time.perf_counter() - t0
    write_outputs(report, opts)
    print("\n" + "\n".join(header_lines(report)[2:]) + "\n" + compact_table(report), flush=True)
    print(f"[e2e] total {report['total_s']:.0f}s", flush=True)
    failed = [r for r in report["results"] + report["compile"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
