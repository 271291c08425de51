"""The override called directly, as ComfyUI's ``wrap_attn`` calls it: layouts, masks, fallbacks,
stats.  No ComfyUI needed; ``sdpa`` stands in for ComfyUI's dense backend (``func``)."""

import logging
import sys
import threading
import types

import pytest
import torch

NEG = -torch.finfo(torch.float32).max


def make(pc, pack, previous=None, **settings):
    settings = {"min_tokens": 0, "dense_steps": 0, "dense_blocks": frozenset(), "backend": "reference", **settings}
    state = pc.patch_state.PisaState(pack.pisa_comfy.PisaSettings(**settings), node_id="5")
    return state, state.make_override(previous)


def qkv(b=1, h=2, n=200, d=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))


def test_wan_layout_at_sparsity_zero_matches_dense(pc, pack, sdpa):
    state, override = make(pc, pack, sparsity=0.0)
    q, k, v = (t.transpose(1, 2).reshape(1, 200, 128) for t in qkv())  # (B, N, H*D), heads as keyword
    out = override(sdpa, q, k, v, heads=2, transformer_options={}, _inside_attn_wrapper=True)
    assert out.shape == (1, 200, 128)
    torch.testing.assert_close(out, sdpa(q, k, v, heads=2), atol=1e-5, rtol=1e-4)
    assert state.finish_run()["pisa_calls"] == 1


def test_flux_layout_with_output_reshape_choices(pc, pack, sdpa):
    _, override = make(pc, pack, sparsity=0.0)
    q, k, v = qkv()
    for keep in (False, True):
        out = override(sdpa, q, k, v, 2, skip_reshape=True, skip_output_reshape=keep, transformer_options={})
        ref = sdpa(q, k, v, 2, skip_reshape=True, skip_output_reshape=keep)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_scale_argument_is_honoured(pc, pack, sdpa):
    _, override = make(pc, pack, sparsity=0.0)
    q, k, v = qkv()
    out = override(sdpa, q, k, v, 2, skip_reshape=True, scale=0.05, transformer_options={})
    torch.testing.assert_close(out, sdpa(q, k, v, 2, skip_reshape=True, scale=0.05), atol=1e-5, rtol=1e-4)


def test_padding_mask_is_honoured_inside_pisa(pc, pack, sdpa, monkeypatch):
    """Padded keys get exactly zero weight in the sparse path too: changing them changes nothing."""
    calls = []
    real = pc.dispatch.run_pisa
    monkeypatch.setattr(pc.dispatch, "run_pisa", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    _, override = make(pc, pack, sparsity=0.5)
    q, k, v = qkv(n=300)
    mask = torch.zeros(1, 1, 300)
    mask[..., 290:] = NEG
    out = override(sdpa, q, k, v, 2, mask=mask, skip_reshape=True, transformer_options={})
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 290:] += 50.0
    v2[:, :, 290:] = 1e4
    out2 = override(sdpa, q, k2, v2, 2, mask=mask, skip_reshape=True, transformer_options={})
    assert len(calls) == 2 and calls[0]["kv_valid"][:, 290:].any().item() is False
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case, reason", [
    ("gqa", "grouped-query attention"),
    ("cross", "cross-attention"),
    ("kwarg", "unsupported argument window"),
    ("head_dim", "head dim 96"),
    ("dtype", "dtype torch.float64"),
    ("mask", "mask"),
    ("short", "short sequence"),
])
def test_unsupported_calls_run_dense_with_one_log_line(pc, pack, sdpa, caplog, case, reason):
    state, override = make(pc, pack, sparsity=0.5, min_tokens=64 if case == "short" else 0)
    q, k, v = qkv(n=200)
    kwargs = {"skip_reshape": True, "transformer_options": {}}
    if case == "gqa":
        k, v = k[:, :1], v[:, :1]
        kwargs["enable_gqa"] = True
    elif case == "cross":
        k, v = k[:, :, :50], v[:, :, :50]
    elif case == "kwarg":
        kwargs["window"] = 8
    elif case == "head_dim":
        q, k, v = (t[..., :48].repeat(1, 1, 1, 2) for t in (q, k, v))
    elif case == "dtype":
        q, k, v = (t.double() for t in (q, k, v))
    elif case == "mask":
        kwargs["mask"] = torch.zeros(1, 1, 200, 200)
    elif case == "short":
        q, k, v = (t[:, :, :32] for t in (q, k, v))
    captured = []

    def dense(*args, **kw):
        captured.append(kw)
        return sdpa(*args, **{n: x for n, x in kw.items() if n not in ("enable_gqa", "window")}) \
            if case != "gqa" else torch.zeros(1, 2, q.shape[2], 64)

    with caplog.at_level(logging.INFO, logger="pisa"):
        for _ in range(3):
            override(dense, q, k, v, 2, **kwargs)
    assert len(captured) == 3 and all(kw.get("transformer_options") is kwargs["transformer_options"] for kw in captured)
    run = state.finish_run()
    assert run["pisa_calls"] == 0 and run["dense_calls"] == 3 and run["density"] == 1.0
    lines = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    expected = 0 if case in ("short", "cross") else 1  # normal reasons are only logged when verbose
    assert len(lines) == expected, [r.getMessage() for r in caplog.records]


def test_out_of_memory_falls_back_to_dense_for_that_call(pc, pack, sdpa, monkeypatch, caplog):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(pc.dispatch, "run_pisa", oom)
    state, override = make(pc, pack, sparsity=0.5)
    q, k, v = qkv()
    with caplog.at_level(logging.INFO, logger="pisa"):
        out = [override(sdpa, q, k, v, 2, skip_reshape=True, transformer_options={}) for _ in range(2)]
    torch.testing.assert_close(out[0], sdpa(q, k, v, 2, skip_reshape=True))
    assert state.finish_run()["dense_calls"] == 2
    assert len([r for r in caplog.records if "out of memory" in r.getMessage()]) == 1


def test_kernel_that_does_not_fit_the_gpu_runs_dense(pc, pack, sdpa, monkeypatch, caplog):
    """No launch configuration fits (e.g. fp32 of head dim 128 on an RTX 30/40): those calls run
    dense, with one warning, and the run goes on."""
    def does_not_fit(*args, **kwargs):
        raise pc.library.KernelDoesNotFit("no launch configuration of _pisa_fwd_kernel fits (test)")

    monkeypatch.setattr(pc.dispatch, "run_pisa", does_not_fit)
    state, override = make(pc, pack, sparsity=0.5)
    q, k, v = qkv()
    with caplog.at_level(logging.INFO, logger="pisa"):
        out = [override(sdpa, q, k, v, 2, skip_reshape=True, transformer_options={}) for _ in range(3)]
    for o in out:
        torch.testing.assert_close(o, sdpa(q, k, v, 2, skip_reshape=True))
    run = state.finish_run()
    assert run["dense_calls"] == 3 and run["pisa_calls"] == 0
    assert len([r for r in caplog.records if "do not fit" in r.getMessage()
                and r.levelno == logging.WARNING]) == 1


class Container:
    """Late-2026 ``AttentionTensorContainer``: single-owner, ``peek()`` / ``take()``."""

    def __init__(self, t):
        self._t = t

    def peek(self):
        return self._t

    def take(self):
        t, self._t = self._t, None
        return t


def test_tensor_containers_are_unwrapped(pc, pack, sdpa):
    _, override = make(pc, pack, sparsity=0.0)
    q, k, v = qkv()
    ref = sdpa(q, k, v, 2, skip_reshape=True)
    out = override(sdpa, Container(q), Container(k), Container(v), 2, skip_reshape=True, transformer_options={})
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # The dense path gets the tensors too (the containers are empty once taken).
    dense = override(sdpa, Container(q), Container(k[:, :, :10]), Container(v[:, :, :10]), 2, skip_reshape=True,
                     transformer_options={})
    assert dense.shape == (1, 200, 128)


def test_no_container_function_so_wrap_attn_hands_over_tensors(pc, pack):
    """Late-2026 ``wrap_attn`` calls ``override.container_function`` when present (without ``func``);
    PISA needs ``func`` as its dense path, so it must not advertise one."""
    _, override = make(pc, pack)
    assert not hasattr(override, "container_function")


def test_run_summary_follows_the_ui_contract(pc, pack, sdpa, monkeypatch):
    sent = []
    server = types.SimpleNamespace(PromptServer=types.SimpleNamespace(
        instance=types.SimpleNamespace(send_sync=lambda event, data: sent.append((event, data)))))
    state, override = make(pc, pack, sparsity=0.5)
    q, k, v = qkv(n=256)
    override(sdpa, q, k, v, 2, skip_reshape=True, transformer_options={})
    override(sdpa, q, k[:, :, :8], v[:, :, :8], 2, skip_reshape=True, transformer_options={})
    monkeypatch.setitem(sys.modules, "server", server)
    payload = state.finish_run()
    assert sent == [("pisa.stats", payload)]
    assert set(payload) == {"node", "text", "calls", "pisa_calls", "dense_calls", "density", "attn_ms"}
    assert payload["node"] == "5" and payload["calls"] == 2 and payload["pisa_calls"] == 1
    assert 0.0 < payload["density"] < 1.0 and payload["attn_ms"] > 0
    assert "1/2 attention calls sparse" in payload["text"] and "1 cross-attention" in payload["text"]
    assert state.finish_run() is None  # nothing ran since: no second report


def test_without_a_server_stats_are_only_logged(pc):
    assert "server" not in sys.modules or not hasattr(sys.modules["server"], "PromptServer")
    assert pc.run_stats.send_to_ui({"text": "x"}) is False


def test_concurrent_calls_are_all_counted(pc, pack, sdpa):
    """Late-2026 cores run per-GPU conds in a thread pool: one state, many threads."""
    state, override = make(pc, pack, sparsity=0.5)
    q, k, v = qkv(n=256)

    def worker():
        for _ in range(5):
            override(sdpa, q, k, v, 2, skip_reshape=True, transformer_options={})
            override(sdpa, q, k[:, :, :8], v[:, :, :8], 2, skip_reshape=True, transformer_options={})

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run = state.finish_run()
    assert (run["calls"], run["pisa_calls"], run["dense_calls"]) == (40, 20, 20)
