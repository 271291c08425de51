"""One rank of the gloo test in test_raylight.py: Ulysses attention around PISA, as raylight runs it.

Each rank holds ``N / P`` tokens of every head; the all-to-all (``all_to_all_single``, which gloo
implements on CPU) gives it all ``N`` tokens of ``H / P`` heads, the same exchange as yunchang's
``SeqAllToAll4D`` (scatter heads, gather the sequence); PISA runs there; the reverse all-to-all
returns the output to the sequence split, and an all-gather lets every rank compare the whole
output with PISA run in one process over all heads.  A plain module (no pytest fixtures) because
``torch.multiprocessing.spawn`` imports it in every rank.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

B, H, D = 2, 4, 64
TEXT, GRID = 32, (20, 24)  # 32 text tokens first, then a 20 x 24 image: N = 512 (4 query tiles)
N = TEXT + GRID[0] * GRID[1]
TOLERANCE = 1e-5


def inputs():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, N, H, D, generator=g) for _ in range(3))
    k[:, TEXT:] += 0.5 * torch.randn(1, N - TEXT, 1, D, generator=g)  # some structure to route on
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[0, 24:TEXT] = False  # batch 0: its last 8 text tokens are padding
    valid[1, 28:TEXT] = False
    return q, k, v, valid


def seq_to_heads(x: torch.Tensor, world: int) -> torch.Tensor:
    """``(B, N/P, H, D)`` -> ``(B, N, H/P, D)``: rank r receives heads ``[r H/P, (r+1) H/P)``."""
    b, s, h, d = x.shape
    send = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)  # chunk j came from rank j: its tokens, our heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)


def heads_to_seq(x: torch.Tensor, world: int) -> torch.Tensor:
    """``(B, N, H/P, D)`` -> ``(B, N/P, H, D)``, the reverse exchange."""
    b, n, hl, d = x.shape
    send = x.reshape(b, world, n // world, hl, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)  # chunk j came from rank j: our tokens, its heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, n // world, world * hl, d)


def gather_seq(x: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=1)


def ulysses(fn, q, k, v, rank: int, world: int):
    """``fn(q, k, v)`` on this rank's heads, between the two all-to-alls; the whole output."""
    s = N // world
    local = [seq_to_heads(t[:, rank * s:(rank + 1) * s], world) for t in (q, k, v)]
    return gather_seq(heads_to_seq(fn(*local), world), world)


def _state():
    from pisa_comfy.patch_state import PisaState
    from pisa_comfy.settings import PisaSettings

    return PisaState(PisaSettings(sparsity=0.75, dense_steps=2, dense_blocks=frozenset({0}), min_tokens=256,
                                  backend="reference"))


def _options(state, block: int):
    from pisa_comfy.forward_context import ForwardContext
    from pisa_comfy.token_layout import START, TokenLayout

    ctx = ForwardContext(layout=TokenLayout("flux", (GRID,), START), step=5, double_blocks=0, whole_forward=True)
    return {state.forward_key: ctx, "block_index": block}


#: The keyword arguments xDiT's attention passes its ring function (xFuserLongContextAttention.forward).
RING_KWARGS = {"dropout_p": 0.0, "softmax_scale": None, "causal": False, "window_size": (-1, -1),
               "alibi_slopes": None, "deterministic": False, "return_attn_probs": False, "group": None,
               "attn_type": None, "attn_processor": None, "attn_layer": None, "joint_tensor_key": None,
               "joint_tensor_value": None, "joint_strategy": "none", "q_descale": None, "k_descale": None,
               "v_descale": None}


def _no_dense(*args, **kwargs):
    raise AssertionError("the processor went dense on a call PISA handles")


def processor_call(processor, to, raylight_dispatch):
    """``fn(q, k, v)``: the processor as raylight calls it, through raylight's real dispatcher when
    ``raylight_dispatch`` (a module) is given, else directly."""
    if raylight_dispatch is None:
        return lambda q, k, v: processor(_no_dense, q, k, v, transformer_options=to, **RING_KWARGS)

    class XFuserAttention:  # what InnerAttentionDispatcher wraps: xDiT's attention with its ring group
        ring_attn_fn = staticmethod(_no_dense)

    attention = XFuserAttention()
    # Ulysses only: each rank is its own ring group (new_group is collective: every rank makes each).
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    attention.ring_pg = groups[dist.get_rank()]
    dispatcher = raylight_dispatch.InnerAttentionDispatcher(attention)

    def fn(q, k, v):
        with dispatcher.scope(processor, to):
            return attention.ring_attn_fn(q, k, v, **RING_KWARGS)

    return fn


def rank_main(rank: int, world: int, port: int, raylight_src: str | None):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from pisa_comfy import dispatch
        from pisa_comfy.library import run_pisa
        from pisa_comfy.raylight import PisaInnerAttention

        api = None
        if raylight_src:
            sys.path.insert(0, raylight_src)
            from raylight.distributed_modules import inner_attention as api
        kernel_kwargs = []

        def spy(q, k, v, **kwargs):
            kernel_kwargs.append(kwargs)
            return run_pisa(q, k, v, **kwargs)

        dispatch.run_pisa = spy  # this process only
        q, k, v, valid = inputs()

        # 1. The processor (PISA Patch's decision: text first and exact, tiled image, covariance routing).
        sharded_state, single_state = _state(), _state()
        sharded = ulysses(processor_call(PisaInnerAttention(sharded_state), _options(sharded_state, 3), api),
                          q, k, v, rank, world)
        single = PisaInnerAttention(single_state)(_no_dense, q, k, v, transformer_options=_options(single_state, 3),
                                                  **RING_KWARGS)
        err = (sharded - single).abs().max().item()
        assert err <= TOLERANCE, f"processor: sharded PISA differs from single-process PISA by {err:.3g}"
        local, full = kernel_kwargs[0], kernel_kwargs[-1]
        assert local["sink_kv"] == local["dense_q"] == [(0, TEXT)], local["sink_kv"]
        assert local["token_perm"] is not None and local["routing"] == "cov"
        assert torch.equal(local["token_perm"], full["token_perm"])
        assert sharded_state._run.pisa_calls == 1 and single_state._run.pisa_calls == 1

        # 2. The library directly with a key-padding mask (raylight's xDiT path drops masks, the
        #    kernels do not): kv_valid is per token, so every rank applies it unchanged.
        kw = {"sparsity": 0.75, "block_size": 64, "layout": "BNHD", "sink_kv": [(0, TEXT)],
              "dense_q": [(0, TEXT)], "kv_valid": valid, "backend": "reference"}
        sharded = ulysses(lambda a, b, c: run_pisa(a, b, c, **kw)[0], q, k, v, rank, world)
        single = run_pisa(q, k, v, **kw)[0]
        err = (sharded - single).abs().max().item()
        assert err <= TOLERANCE, f"kv_valid: sharded PISA differs from single-process PISA by {err:.3g}"
    finally:
        dist.destroy_process_group()
