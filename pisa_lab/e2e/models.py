"""Building a ComfyUI model with random weights through ComfyUI's own model detection, and calling
one model step the way a sampler calls it.
"""

from __future__ import annotations

import dataclasses
import importlib
import uuid

import torch

from .specs import Spec


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
