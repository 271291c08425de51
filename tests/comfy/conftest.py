"""Fixtures of the node-layer tests: the pack loaded the way ComfyUI loads it, the real ComfyUI
(``$COMFYUI_PATH``, default ``~/comfy/ComfyUI``; tests that need it are skipped with the reason
when it is missing, and fail under ``CI=true``: tests/prerequisites.py), tiny random-weight Wan / FLUX / HunyuanVideo models built from ComfyUI's own
classes, and a log of which attention calls ran PISA and which ran dense.

One pytest process can import only one ComfyUI, so ``scripts/test.sh`` runs this folder once per
checkout (e.g. ``COMFYUI_PATH=~/comfy/ComfyUI-v0.3.64 pytest tests/comfy``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from prerequisites import comfy_missing, comfy_paths, require_comfy

from pisa_lab.e2e import comfy_host

REPO = Path(__file__).resolve().parents[2]
# The node's "auto" backend keeps attention dense where Triton cannot run (CPU): these tests exercise
# the sparse path through the PyTorch reference instead (pisa_comfy.settings.PisaSettings.backend).
os.environ.setdefault("PISA_BACKEND", "reference")

COMFY_ROOT = comfy_paths()[0]
PACK_NAME = comfy_host.PACK_NAME


def comfy_version() -> str:
    return comfy_host.comfy_version(COMFY_ROOT)


def pytest_report_header(config):
    missing = comfy_missing(COMFY_ROOT)
    return f"ComfyUI for tests/comfy: {missing or f'v{comfy_version()} at {COMFY_ROOT}'}"


# ---- the pack ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pack():
    """The repository imported as a package, as ComfyUI's custom-node loader does (the loader the
    end-to-end tool uses too)."""
    return comfy_host.load_pack()


@pytest.fixture(scope="session")
def pc(pack):
    """``pisa_comfy`` modules of the loaded pack, by short name (``pc.dispatch``, ``pc.patch_state``, ...)."""
    names = ["attention_call", "dispatch", "forward_context", "library", "masks", "node_state", "override",
             "patch_state", "patching", "run_stats", "settings", "steps", "token_layout"]
    return types.SimpleNamespace(**{n: importlib.import_module(f"{PACK_NAME}.pisa_comfy.{n}") for n in names})


def widgets(**overrides) -> dict:
    """PISAPatch widget values (the node's defaults unless overridden)."""
    values = dict(sparsity=0.875, block_size="64", taylor_order="1", dense_steps=10, dense_blocks="0",
                  min_tokens=4096, token_order="auto", routing="auto", verbose=False)
    values.update(overrides)
    return values


@pytest.fixture(scope="session")
def node_widgets():
    return widgets


def _sdpa_backend(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                 **kwargs):
    """A dense attention backend with ComfyUI's signature and mask conventions (for direct tests)."""
    if skip_reshape:
        qh, kh, vh = q, k, v
    else:
        b, _, hd = q.shape
        qh, kh, vh = (t.view(b, -1, heads, hd // heads).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask is not None and mask.dim() == 3:
        mask = mask.unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=kwargs.get("scale"))
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[-1])


@pytest.fixture(scope="session")
def sdpa():
    """A dense backend with ComfyUI's signature: the ``func`` of direct override calls."""
    return _sdpa_backend


# ---- ComfyUI and tiny models -------------------------------------------------------------------

@pytest.fixture(scope="session")
def comfy_checkout() -> Path:
    """The ComfyUI checkout's root (for tests that start ComfyUI itself); a missing one skips, or
    fails under CI=true."""
    return require_comfy(COMFY_ROOT)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's modules (CPU); a missing checkout skips, or fails under CI=true."""
    require_comfy(COMFY_ROOT)
    if str(COMFY_ROOT) not in sys.path:
        sys.path.insert(0, str(COMFY_ROOT))
    from comfy.cli_args import args

    args.cpu = True  # before anything imports comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models

    return types.SimpleNamespace(model_patcher=comfy.model_patcher, patcher_extension=comfy.patcher_extension,
                                 sample=comfy.sample, samplers=comfy.samplers,
                                 supported_models=comfy.supported_models, version=comfy_version())


def _init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """comfy.ops layers start as torch.empty: give them small deterministic random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _only_known(params_cls, config: dict) -> dict:
    """Version-tolerant configs: keep the keys this core's params dataclass knows."""
    known = {f.name for f in dataclasses.fields(params_cls)}
    return {k: v for k, v in config.items() if k in known or k == "image_model"}


@dataclasses.dataclass
class TinyModel:
    """A random-weight model of one family plus everything needed to sample it."""

    family: str
    patcher: object  # comfy.model_patcher.ModelPatcher (never patched by tests)
    latent: torch.Tensor
    positive: list
    negative: list
    cfg: float
    main_tokens: int  # length of the main self-attention sequence
    blocks: int  # transformer blocks per forward (FLUX/HunyuanVideo: double + single)


def _build(comfy, family: str) -> TinyModel:
    import comfy.ldm.flux.model as flux_model
    import comfy.ldm.hunyuan_video.model as hunyuan_model

    joint = dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=256, mlp_ratio=2.0,
                 num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], qkv_bias=True,
                 guidance_embed=False)
    if family == "wan":
        config = dict(image_model="wan2.1", model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2,
                      in_dim=16, out_dim=16, text_dim=64, freq_dim=256, patch_size=(1, 2, 2), window_size=(-1, -1),
                      qk_norm=True, cross_attn_norm=True, eps=1e-6)
        model_config = comfy.supported_models.WAN21_T2V(config)
        latent, extra, cfg, main, blocks = torch.zeros(1, 16, 3, 8, 12), {}, 3.0, 3 * 4 * 6, 2
        text = (1, 12, 64)
    elif family == "flux":
        config = _only_known(flux_model.FluxParams, dict(joint, image_model="flux", theta=10000, patch_size=2,
                                                         txt_ids_dims=[]))
        model_config = comfy.supported_models.Flux(config)
        latent, extra, cfg, main, blocks = torch.zeros(1, 16, 16, 24), {"pooled_output": _randn(1, 32, seed=5)}, 1.0, \
            8 * 12 + 7, 4
        text = (1, 7, 64)
    elif family == "hunyuan_video":
        config = _only_known(hunyuan_model.HunyuanVideoParams,
                             dict(joint, image_model="hunyuan_video", theta=256, patch_size=[1, 2, 2], byt5=False,
                                  meanflow=False, use_cond_type_embedding=False, vision_in_dim=None,
                                  meanflow_sum=False))
        model_config = comfy.supported_models.HunyuanVideo(config)
        # Two padded text tokens: every joint block gets the additive (1, 1, N) padding mask.
        extra = {"pooled_output": _randn(1, 32, seed=5), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0]])}
        latent, cfg, main, blocks = torch.zeros(1, 16, 3, 8, 12), 1.0, 3 * 4 * 6 + 7, 4
        text = (1, 7, 64)
    else:
        raise ValueError(family)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device="cpu")
    _init_weights(model.diffusion_model)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    return TinyModel(family, patcher, latent, [[_randn(*text, seed=2), dict(extra)]],
                     [[_randn(*text, seed=3), dict(extra)]], cfg, main, blocks)


@pytest.fixture(scope="session")
def tiny(comfy):
    """``tiny("wan" | "flux" | "hunyuan_video")``: one shared instance per family."""
    cache = {}

    def get(family: str) -> TinyModel:
        if family not in cache:
            cache[family] = _build(comfy, family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def sample(comfy):
    """``sample(tm, model=None, steps=3, **kw)``: full sampling through comfy.sample.sample, with a
    fixed noise; ``kw`` as comfy.sample.sample takes them (start_step, last_step, ...)."""

    def run(tm: TinyModel, model=None, steps: int = 3, latent=None, noise=None, **kw):
        latent = tm.latent if latent is None else latent
        noise = _randn(*tm.latent.shape, seed=1) if noise is None else noise
        return comfy.sample.sample(model or tm.patcher, noise, steps, tm.cfg, "euler", "simple", tm.positive,
                                   tm.negative, latent, disable_pbar=True, seed=0, **kw)

    return run


@pytest.fixture
def patch(pack):
    """``patch(model, **widgets)`` through the PISAPatch node; returns (patched model, its PisaState)."""
    node = pack.NODE_CLASS_MAPPINGS["PISAPatch"]()

    def run(model, unique_id="1", **overrides):
        (patched,) = node.patch(model, unique_id=unique_id, **widgets(**overrides))
        return patched, state_of(patched)

    return run


def state_of(model):
    return model.model_options["transformer_options"]["optimized_attention_override"].pisa_state


# ---- which calls ran PISA ----------------------------------------------------------------------

class CallLog:
    """Attention calls in order, grouped by model forward: ``("pisa", n)`` for kernel calls,
    ``("dense", nq, nk)`` for calls that reached the override installed before PISA.

    Independent of the node's own bookkeeping: forwards are marked by a test wrapper, kernel calls
    by a spy on the kernel entry point, dense calls by a delegating override under PISA.
    """

    def __init__(self):
        self.forwards: list[dict] = []
        self.kernel_kwargs: list[dict] = []
        self.dense_masks: list = []

    def forward_wrapper(self, executor, *args, **kwargs):
        to = args[-1] if args and isinstance(args[-1], dict) else kwargs["transformer_options"]
        self.forwards.append({"sigma": float(to["sigmas"].max()), "calls": []})
        return executor(*args, **kwargs)

    def previous_override(self):
        """A delegating override that logs dense calls: PISA's dense path when installed before the
        node.  A plain function, because v0.3.64 deep-copies model_options on clone (a bound
        method would be copied together with this log)."""

        def override(func, q, k, v, *args, **kwargs):
            dim = 2 if kwargs.get("skip_reshape") else 1
            if self.forwards:
                self.forwards[-1]["calls"].append(("dense", q.shape[dim], k.shape[dim]))
            self.dense_masks.append(kwargs.get("mask"))
            return func(q, k, v, *args, **kwargs)

        return override

    def kernel_spy(self, real):
        def spy(q, k, v, **kwargs):
            n = q.shape[2] if kwargs.get("layout", "BHND") == "BHND" else q.shape[1]
            self.forwards[-1]["calls"].append(("pisa", n))
            self.kernel_kwargs.append(kwargs)
            return real(q, k, v, **kwargs)

        return spy

    def main_calls(self, forward: dict, n: int) -> list[str]:
        """Kinds ("pisa"/"dense") of the calls over the main sequence of ``n`` tokens, in block order."""
        return [c[0] for c in forward["calls"] if c[1] == n and (c[0] == "pisa" or c[2] == n)]


@pytest.fixture
def call_log(comfy, pc, monkeypatch):
    """``call_log.install(model)``: a clone of ``model`` with the logging override and wrapper; patch
    that clone with PISA (the kernel spy is active for the whole test)."""
    log = CallLog()
    monkeypatch.setattr(pc.dispatch, "run_pisa", log.kernel_spy(pc.dispatch.run_pisa))

    def install(model):
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
            log.previous_override()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.call_log",
                               log.forward_wrapper)
        return m

    log.install = install
    return log
