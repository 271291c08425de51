"""PISA as raylight's inner attention (pisa_comfy/raylight.py, docs/raylight.md), on the CPU.

* Ulysses semantics: 2 and 4 gloo ranks run the real all-to-all around PISA on their heads and
  match single-process PISA over all heads (text sinks, tiled order, a key-padding mask).
* The processor: raylight's calling convention, the dense fallbacks (each reason logged once),
  the per-forward options when a model does not pass them, the worker patch and its removal.
* raylight's real registry and dispatcher, when a raylight checkout with the inner-attention hook
  is found at ``$RAYLIGHT_PATH`` (default ``<repo>/.raylight``, git-ignored); skipped otherwise.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

if str(Path(__file__).parent) not in sys.path:  # the rank module: spawned ranks import it by name
    sys.path.insert(0, str(Path(__file__).parent))
import raylight_ranks as ranks

REPO = Path(__file__).resolve().parents[2]
RAYLIGHT = Path(os.environ.get("RAYLIGHT_PATH", REPO / ".raylight"))
_HOOK = RAYLIGHT / "src" / "raylight" / "distributed_modules" / "inner_attention" / "dispatcher.py"


def _raylight_src() -> str:
    if not _HOOK.is_file():
        pytest.skip(f"no raylight checkout with the inner-attention hook at {RAYLIGHT} "
                    "(set RAYLIGHT_PATH to a checkout of github.com/komikndr/raylight)")
    return str(RAYLIGHT / "src")


@pytest.fixture
def raylight_api(monkeypatch):
    """raylight's ``inner_attention`` module, imported from the checkout."""
    monkeypatch.syspath_prepend(_raylight_src())
    from raylight.distributed_modules import inner_attention

    return inner_attention


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, raylight_src: str | None):
    import torch.multiprocessing as mp

    mp.spawn(ranks.rank_main, args=(world, _free_port(), raylight_src), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_ranks_match_single_process_pisa(world):
    """With a raylight checkout, the 2-rank run calls the processor through raylight's own
    ``InnerAttentionDispatcher`` (the in-process tests below say when it is missing)."""
    _spawn(world, str(RAYLIGHT / "src") if world == 2 and _HOOK.is_file() else None)


# ---- the processor in one process ----------------------------------------------------------------

@pytest.fixture
def rl():
    from pisa_comfy import raylight

    return raylight


def _call(processor, to, **kwargs):
    q, k, v, _ = ranks.inputs()
    seen = []

    def dense(q_, k_, v_, **kw):
        seen.append(kw)
        return torch.zeros_like(q_)

    out = processor(dense, q, k, v, transformer_options=to, **{**ranks.RING_KWARGS, **kwargs})
    return out, seen


@pytest.mark.parametrize("kwargs, reason", [
    ({"causal": True}, "unsupported argument causal"),
    ({"dropout_p": 0.1}, "unsupported argument dropout_p"),
    ({"window_size": (128, 128)}, "unsupported argument window_size"),
    ({"joint_tensor_key": torch.zeros(1), "joint_tensor_value": torch.zeros(1)},
     "unsupported argument joint_tensor_key"),
    ({"q_descale": torch.ones(1)}, "unsupported argument q_descale"),
    ({"some_future_flag": 1}, "unsupported argument some_future_flag"),
])
def test_what_pisa_does_not_implement_goes_to_raylights_dense(rl, kwargs, reason, caplog):
    state = ranks._state()
    processor = rl.PisaInnerAttention(state)
    with caplog.at_level(logging.INFO, logger="pisa"):
        runs = [_call(processor, ranks._options(state, 3), **kwargs) for _ in range(2)]
    for out, seen in runs:  # raylight's dense ran, with its arguments unchanged
        assert out.abs().max() == 0 and seen == [{**ranks.RING_KWARGS, **kwargs}]
    assert state._run.pisa_calls == 0 and state._run.calls == 2
    assert sum(reason in r.getMessage() for r in caplog.records) == 1  # logged once


@pytest.mark.parametrize("block, step, dense", [(0, 5, True), (3, 1, True), (3, 5, False)])
def test_dense_blocks_and_steps_as_the_node(rl, block, step, dense):
    from pisa_comfy.forward_context import ForwardContext
    from pisa_comfy.token_layout import START, TokenLayout

    state = ranks._state()  # dense_steps 2, dense_blocks {0}
    ctx = ForwardContext(layout=TokenLayout("flux", (ranks.GRID,), START), step=step, double_blocks=0,
                         whole_forward=True)
    _, seen = _call(rl.PisaInnerAttention(state), {state.forward_key: ctx, "block_index": block})
    assert bool(seen) is dense


def test_options_of_the_forward_when_the_model_does_not_pass_them(rl):
    state = ranks._state()
    to = ranks._options(state, 0)  # block 0: dense, which only these options can tell
    seen = []

    def executor(x, transformer_options):
        _, dense = _call(rl.PisaInnerAttention(state), {})
        seen.extend(dense)
        return x

    assert rl._remember_options(executor, 1, to) == 1
    assert len(seen) == 1 and rl._FORWARD_OPTIONS.get() is None


def test_processor_is_one_object_across_deep_copies(rl):
    processor = rl.PisaInnerAttention(ranks._state())
    assert copy.deepcopy({"p": processor})["p"] is processor
    assert rl.PisaInnerAttention.supports_ring is False


# ---- the worker patch (ComfyUI) ------------------------------------------------------------------

def _settings(**kw):
    from pisa_comfy.settings import PisaSettings

    return PisaSettings(**{"min_tokens": 0, "backend": "reference", **kw})


def test_worker_patch_installs_processor_and_override_over_one_state(pack, tiny, monkeypatch):
    rl = importlib.import_module(f"{pack.__name__}.pisa_comfy.raylight")  # the pack as ComfyUI loads it
    monkeypatch.setattr(rl, "raylight_api", lambda: None)
    model = tiny("wan").patcher
    patched = rl.patch_worker_model(model, _settings())
    to = patched.model_options["transformer_options"]
    processor = to[rl.INNER_ATTENTION_KEY]
    assert isinstance(processor, rl.PisaInnerAttention)
    assert processor.state is to[rl.OVERRIDE_KEY].pisa_state
    assert rl.INNER_ATTENTION_KEY not in model.model_options.get("transformer_options", {})

    again = rl.patch_worker_model(patched, _settings(sparsity=0.5))  # a second run of the node replaces
    assert again.model_options["transformer_options"][rl.INNER_ATTENTION_KEY].state.settings.sparsity == 0.5

    off = rl.patch_worker_model(again, _settings(), enabled=False)
    to_off = off.model_options["transformer_options"]
    assert rl.INNER_ATTENTION_KEY not in to_off and rl.OVERRIDE_KEY not in to_off

    monkeypatch.setattr(rl, "ring_degree", lambda: 2)
    ring = rl.patch_worker_model(model, _settings())
    assert rl.INNER_ATTENTION_KEY not in ring.model_options["transformer_options"]


def test_worker_function_imports_the_pack_from_its_folder(pack, tiny, monkeypatch):
    """What a Ray worker does with the node's closure: it has no such package yet, so the closure
    loads it from the folder under the name it is given, then patches."""
    from pisa_comfy.raylight import worker_patch_function

    name = "PISA-pack-on-a-worker"
    monkeypatch.delitem(sys.modules, name, raising=False)
    fn = worker_patch_function(str(REPO), name, _settings(sparsity=0.625), "7")
    assert "<locals>" in fn.__qualname__  # cloudpickle sends it by value
    assert all(isinstance(c.cell_contents, (str, dict, bool, type(None))) for c in fn.__closure__)
    try:
        patched = fn(tiny("wan").patcher)
        processor = patched.model_options["transformer_options"]["raylight_inner_attention"]
        assert type(processor).__module__ == f"{name}.pisa_comfy.raylight"
        assert processor.state.settings.sparsity == 0.625 and processor.state.node_id == "7"
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_node_contract(pack):
    node = pack.NODE_CLASS_MAPPINGS["PISARaylightPatch"]
    required = node.INPUT_TYPES()["required"]
    pisa = pack.NODE_CLASS_MAPPINGS["PISAPatch"].INPUT_TYPES()["required"]
    assert list(required) == ["ray_actors", "enabled"] + [k for k in pisa if k != "model"]
    assert required["ray_actors"][0] == "RAY_ACTORS" and node.RETURN_TYPES == ("RAY_ACTORS",)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["PISARaylightPatch"] == "PISA Patch (Raylight)"


# ---- raylight's own code -------------------------------------------------------------------------

def test_registered_in_raylights_registry(raylight_api, rl):
    api = rl.raylight_api()
    assert api is raylight_api and rl.PROCESSOR_NAME in api.InnerAttentionRegistry.available()
    assert rl.raylight_api() is api  # registering twice would raise in raylight: it is done once
    processor = api.create_inner_attention(rl.PROCESSOR_NAME, state=ranks._state())
    assert isinstance(processor, rl.PisaInnerAttention)
    with pytest.raises(RuntimeError, match="ring"), api.inner_attention_scope(processor, {}, ring_world_size=2):
        pass  # raylight refuses it under ring attention


def test_raylights_dispatcher_runs_pisa_and_its_dense_fallback(raylight_api, rl):
    state = ranks._state()
    processor = rl.PisaInnerAttention(state)
    to = ranks._options(state, 3)
    dense_calls = []

    class XFuserAttention:
        @staticmethod
        def ring_attn_fn(q, k, v, **kw):
            dense_calls.append(kw)
            return torch.zeros_like(q)

    attention = XFuserAttention()
    dispatcher = raylight_api.InnerAttentionDispatcher(attention)
    q, k, v, _ = ranks.inputs()
    with dispatcher.scope(processor, to):
        out = attention.ring_attn_fn(q, k, v, **ranks.RING_KWARGS)
        dense_out = attention.ring_attn_fn(q, k, v, **{**ranks.RING_KWARGS, "causal": True})
    single = rl.PisaInnerAttention(ranks._state())(ranks._no_dense, q, k, v,
                                                   transformer_options=ranks._options(state, 3), **ranks.RING_KWARGS)
    assert (out - single).abs().max() <= ranks.TOLERANCE
    assert dense_out.abs().max() == 0 and dense_calls == [{**ranks.RING_KWARGS, "causal": True}]
    assert state._run.pisa_calls == 1 and state._run.calls == 2
