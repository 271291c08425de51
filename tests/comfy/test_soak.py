"""Soak: 50 sampling runs in one process leave nothing behind that grows.

A ComfyUI server runs for days: every prompt samples again with the same patched models (the node's
output is cached), LoRA loaders clone the model and add weight patches, and ComfyUI unloads models
(restoring their weights) when memory runs short.  Anything the pack keeps per call, per run or per
model clone (its objects, the API's plan and permutation caches, launch fits, CUDA graphs, tensors)
must stop growing after the first runs, or a long session ends out of memory.

The runs alternate two models patched by two PISA Patch nodes of different settings: Wan through
its sparse steps with a LoRA-style weight patch (``ModelPatcher.add_patches``) on a fresh clone
each run, and FLUX, and every run ends with ComfyUI unloading every model (the unpatch).  PISA runs
on the CPU through the PyTorch reference (``PISA_BACKEND=reference``, tests/comfy/conftest.py),
with ``min_tokens`` 0 so every self-attention call of the tiny models runs PISA.
"""

import gc
import importlib
import os

import pytest
import torch

from pisa_lab.e2e.soak import live_tensors, pack_objects

RUNS = 50
WARM_UP = 10  # runs before the baseline: the first runs fill caches up to their working set
LORA_KEY = "diffusion_model.blocks.1.self_attn.q.weight"
#: RSS may drift by allocator noise (measured: under 1 MiB over 40 runs), not by a copy of the tiny
#: FLUX's weights (21 MiB; live tensors are counted exactly as well).
RSS_SLACK = 16 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _lora_delta(weight: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(weight.shape, generator=g) * 0.05


@pytest.fixture
def one_cpu_thread():
    """The tiny models' tensors are far too small for several threads: on a loaded CI machine the
    OpenMP threads' spin-waiting made each run ~10x as expensive (see tests/kernels/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fifty_runs_grow_nothing(comfy, pack, tiny, sample, one_cpu_thread):
    import comfy.model_management as mm

    prefix = pack.__name__ + "."
    api = importlib.import_module(prefix + "pisa_kernels.api")
    graphs = importlib.import_module(prefix + "pisa_kernels.graphs")
    node = pack.NODE_CLASS_MAPPINGS["PISAPatch"]
    wan, flux = tiny("wan"), tiny("flux")
    base = {"dense_blocks": "", "min_tokens": 0, "verbose": False}
    (wan_pisa,) = node().patch(wan.patcher, unique_id="11", sparsity=0.5, block_size="64", taylor_order="1",
                               dense_steps=1, token_order="auto", routing="topk", **base)
    (flux_pisa,) = node().patch(flux.patcher, unique_id="12", sparsity=0.75, block_size="128", taylor_order="0",
                                dense_steps=0, token_order="raster", routing="covariance", **base)
    weight = wan.patcher.model.state_dict()[LORA_KEY]
    original = weight.clone()
    delta = _lora_delta(weight)

    def state(model):
        return model.model_options["transformer_options"]["optimized_attention_override"].pisa_state

    def run(i):
        if i % 2 == 0:
            lora = wan_pisa.clone()  # what a LoRA loader gives: a new clone with weight patches, per run
            assert lora.add_patches({LORA_KEY: (delta,)}, strength_patch=0.5) == [LORA_KEY]
            out, st = sample(wan, lora, steps=2), state(lora)
        else:
            out, st = sample(flux, flux_pisa, steps=2), state(flux_pisa)
        mm.unload_all_models()  # unpatches: the weights are the model's own again
        assert torch.equal(weight, original)
        return out, st.last_summary

    def snapshot():
        gc.collect()
        caches = {"perm": len(api._PERM_CACHE), "plan": len(api._PLAN_CACHE), "graphs": len(graphs._GRAPHS),
                  "loaded_models": len(mm.current_loaded_models)}
        return {"objects": pack_objects(prefix), "tensors": live_tensors(), "rss": _rss(), "caches": caches}

    first = [run(0), run(1)]
    for out, summary in first:
        assert summary["pisa_calls"] > 0, summary["text"]
    without_lora = sample(wan, wan_pisa, steps=2)
    mm.unload_all_models()
    assert not torch.equal(first[0][0], without_lora), "the weight patch had no effect"
    del without_lora
    for i in range(2, WARM_UP):
        run(i)
    before = snapshot()
    for i in range(WARM_UP, RUNS):
        out, summary = run(i)
        want_out, want_summary = first[i % 2]
        assert torch.equal(out, want_out), f"run {i} sampled something else than run {i % 2}"
        assert summary["pisa_calls"] == want_summary["pisa_calls"]
    del out  # the last output is no leak
    after = snapshot()

    grown = {k: (before["objects"].get(k, 0), n) for k, n in after["objects"].items()
             if n > before["objects"].get(k, 0)}
    assert grown == {}, f"pack objects grew over {RUNS - WARM_UP} runs: {grown}"
    assert after["caches"] == before["caches"], (before["caches"], after["caches"])
    assert after["caches"]["graphs"] == 0  # CPU: never a CUDA graph
    assert after["tensors"][0] <= before["tensors"][0], (before["tensors"], after["tensors"])
    assert after["tensors"][1] <= before["tensors"][1], (before["tensors"], after["tensors"])
    assert after["rss"] - before["rss"] < RSS_SLACK, (before["rss"] >> 20, after["rss"] >> 20)
    print(f"soak: {RUNS} runs; pack objects {sum(after['objects'].values())}, tensors {after['tensors']}, "
          f"caches {after['caches']}, RSS {before['rss'] >> 20} -> {after['rss'] >> 20} MiB")
