"""Pure pieces of the node layer: masks, step lookup, token layouts, override chains, call parsing."""

import functools
import math

import pytest
import torch

NEG = -torch.finfo(torch.float32).max


# ---- key-padding masks -------------------------------------------------------------------------

def test_hunyuan_padding_mask_becomes_kv_valid(pc):
    mask = torch.zeros(1, 1, 10)
    mask[..., 7:] = NEG
    valid = pc.masks.key_padding_valid(mask, batch=2, n=10)
    assert valid.shape == (2, 10) and valid.dtype == torch.bool
    assert valid[:, :7].all() and not valid[:, 7:].any()


@pytest.mark.parametrize("mask", [
    torch.zeros(1, 1, 10, 10),  # per-query mask (HunyuanVideo token refiner)
    torch.full((1, 1, 10), -0.5),  # a soft bias, not padding
    torch.zeros(3, 1, 10),  # batch of 3 for a batch of 2
    torch.zeros(4, 10),  # (queries, keys) with 4 queries
    torch.zeros(1, 1, 9),  # wrong key count
])
def test_other_masks_are_not_key_padding(pc, mask):
    assert pc.masks.key_padding_valid(mask, batch=2, n=10) is None


def test_bool_masks_keep_true_keys(pc):
    mask = torch.tensor([[[True] * 6 + [False] * 4]])
    assert pc.masks.key_padding_valid(mask, batch=1, n=10)[0].tolist() == [True] * 6 + [False] * 4


# ---- steps -------------------------------------------------------------------------------------

def test_step_lookup_matches_exactly_first_then_brackets(pc):
    schedule = [1.0, 0.75, 0.5, 0.25, 0.0]
    find = pc.steps.step_in_schedule
    assert [find(s, schedule) for s in schedule[:-1]] == [0, 1, 2, 3]
    assert find(0.6, schedule) == 1  # a heun-style intermediate evaluation belongs to the step before
    assert find(1.5, schedule) is None


def test_split_schedule_continues_counting(pc):
    tracker = pc.steps.ScheduleTracker()
    first = [1.0, 0.9, 0.7]  # steps 0-1, stops with leftover noise at 0.7
    assert tracker.offset_for(first) == 0
    tracker.finished(first, 0)
    assert tracker.offset_for([0.7, 0.4, 0.0]) == 2
    tracker.finished([0.7, 0.4, 0.0], 2)
    assert tracker.offset_for([1.0, 0.5, 0.0]) == 0  # fully denoised before: a new schedule


# ---- token layouts -----------------------------------------------------------------------------

def test_text_first_layout_keeps_text_exact_and_tiles_the_image(pc):
    tl = pc.token_layout
    layout = tl.TokenLayout("flux", ((4, 6),), tl.START)
    placement = tl.place(layout, 24 + 5, None)
    assert placement.exact == ((0, 5),)
    assert placement.grids == ((5, (4, 6)),)


def test_unknown_text_side_keeps_both_ends_exact_in_raster_order(pc):
    tl = pc.token_layout
    layout = tl.TokenLayout("hunyuan_video", ((2, 4, 4),), None)
    assert tl.place(layout, 32 + 3, None) == tl.Placement(exact=((0, 3), (32, 35)), grids=())
    assert tl.place(layout, 32 + 3, tl.END) == tl.Placement(exact=((32, 35),), grids=((0, (2, 4, 4)),))


def test_text_side_evidence(pc):
    tl = pc.token_layout
    valid = torch.ones(1, 35, dtype=torch.bool)
    valid[0, 33:] = False  # padded text at the very end: [img | txt]
    assert tl.side_from_padding(valid, n_extra=3) == tl.END
    valid = torch.ones(1, 35, dtype=torch.bool)
    valid[0, 1:3] = False  # padded text inside the first 3 tokens: [txt | img]
    assert tl.side_from_padding(valid, n_extra=3) == tl.START
    assert tl.side_from_padding(torch.ones(1, 35, dtype=torch.bool), n_extra=3) is None
    assert tl.side_from_img_slice([3, 35], n=35, n_extra=3) == tl.START
    assert tl.side_from_img_slice(None, n=35, n_extra=3) is None


def test_tiled_order_is_a_permutation_with_extras_first(pc):
    order = pc.token_layout.tiled_order(3 + 2 * 8 * 8 + 4, ((3, (2, 8, 8)),), 64, pc.library.tile_permutation)
    n = 3 + 128 + 4
    assert sorted(order.tolist()) == list(range(n))
    assert order[:7].tolist() == [0, 1, 2, 131, 132, 133, 134]
    # The grid in the kernel library's own tile order, shifted to where the grid starts.
    assert torch.equal(order[7:], pc.library.tile_permutation((2, 8, 8), block_size=64) + 3)


# ---- override chains ---------------------------------------------------------------------------

def test_chain_search_sees_through_other_packs_closures(pc, pack):
    state = pc.patch_state.PisaState(pack.pisa_comfy.PisaSettings())
    ours = state.make_override(None)

    def other_pack(previous):
        def override(func, *args, **kwargs):
            return previous(func, *args, **kwargs)
        return override

    wrapped = other_pack(functools.partial(other_pack(ours)))
    assert pc.override.chain_contains(wrapped, state)
    assert not pc.override.chain_contains(other_pack(None), state)
    assert not pc.override.chain_contains(ours, pc.patch_state.PisaState(pack.pisa_comfy.PisaSettings()))


# ---- call parsing ------------------------------------------------------------------------------

def test_call_parsing_handles_both_layouts(pc):
    parse = pc.attention_call.AttentionCall.parse
    q = torch.randn(2, 10, 3 * 64)
    wan = parse((q, q, q), {"heads": 3, "transformer_options": {}})
    assert wan.layout == "BNHD" and (wan.b, wan.h, wan.n, wan.d, wan.n_k) == (2, 3, 10, 64, 10)
    assert wan.kernel_inputs()[0].shape == (2, 10, 3, 64)
    out = torch.randn(2, 10, 3, 64)
    assert torch.equal(wan.shape_output(out), out.reshape(2, 10, 192))

    q4 = torch.randn(2, 3, 10, 64)
    flux = parse((q4, q4, q4, 3), {"skip_reshape": True, "mask": None})
    assert flux.layout == "BHND" and flux.heads == 3
    assert flux.shape_output(q4).shape == (2, 10, 192)
    keep = parse((q4, q4, q4, 3), {"skip_reshape": True, "skip_output_reshape": True})
    assert keep.shape_output(q4) is q4
    assert math.prod((keep.b, keep.h, keep.n, keep.d)) == q4.numel() and keep.n_k == 10


def test_call_parsing_binds_like_python(pc):
    """The hand-written binding (every dense call pays for it) accepts what ComfyUI's backend
    signature accepts and refuses what Python's own binding refuses."""
    parse = pc.attention_call.AttentionCall.parse
    q = torch.randn(1, 4, 2 * 64)
    call = parse((q, q, q, 2, None, None, False, False), {"transformer_options": {"x": 1}, "scale": 0.5})
    assert call.heads == 2 and call.extra == {"transformer_options": {"x": 1}, "scale": 0.5}
    assert call.transformer_options == {"x": 1}
    kw = parse((), {"q": q, "k": q, "v": q, "heads": 2, "mask": "m"})
    assert kw.mask == "m" and kw.n == 4 and kw.args == ()
    for args, kwargs in (((q, q, q), {}), ((q, q, q, 2), {"heads": 2}), ((q,) * 3 + (2,) * 6, {})):
        with pytest.raises(TypeError):
            parse(args, kwargs)


# ---- the backend the node asks for -------------------------------------------------------------

@pytest.mark.parametrize("setting,asked", [("auto", "auto"), ("triton", "triton")])
def test_a_gpu_call_lets_the_library_pick_its_forward_kernel(pc, monkeypatch, setting, asked):
    """Where the node resolved the Triton backend it asks pisa_attention for ``"auto"`` under the
    default setting, so the library picks the forward kernel (the Hopper one on sm90; ``"triton"``
    would pin the portable kernel); a pinned setting is passed as it is."""
    state = pc.patch_state.PisaState(pc.settings.PisaSettings(sparsity=0.875, dense_steps=0, dense_blocks=frozenset(),
                                                              min_tokens=0, backend=setting))
    monkeypatch.setattr(state, "backend_for", lambda device: "triton")
    layout = pc.token_layout.TokenLayout("wan", ((2, 4, 8),), pc.token_layout.END)
    ctx = pc.forward_context.ForwardContext(layout, step=None, double_blocks=0, whole_forward=False)
    q = torch.randn(1, 64, 2 * 64)
    call = pc.attention_call.AttentionCall.parse((q, q, q), dict(heads=2, transformer_options={state.forward_key: ctx}))
    plan = pc.dispatch.decide(state, call)
    assert not isinstance(plan, str), plan
    assert plan.kwargs["backend"] == asked


# ---- run stats ---------------------------------------------------------------------------------

def test_tile_spread_over_a_runs_adaptive_calls(pc):
    """Adaptive routing's per-tile density (issue 17): mean, spread and range over every tile of
    every adaptive call of the run, in the summary; a run without adaptive calls has none."""
    run = pc.run_stats.RunStats(0, None)
    run.record(work=1.0, density=0.2, reason=None, timing=0.001)  # top-k: no tile counts
    assert "tile_density" not in run.summary(None)
    first, second = torch.tensor([[1, 3], [2, 2]], dtype=torch.int32), torch.tensor([[8]], dtype=torch.int32)
    run.record(work=1.0, density=0.2, reason=None, timing=0.001, tile_counts=first, blocks=10)
    run.record(work=1.0, density=0.8, reason=None, timing=0.001, tile_counts=second, blocks=10)
    run.record(work=1.0, density=1.0, reason="dense step", timing=0.001)
    d = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.8], dtype=torch.float64)
    payload = run.summary("reference")
    spread = payload["tile_density"]
    assert spread["mean"] == pytest.approx(float(d.mean()), abs=1e-4)
    assert spread["std"] == pytest.approx(float(d.std(unbiased=False)), abs=1e-4)
    assert (spread["min"], spread["max"]) == (pytest.approx(0.1), pytest.approx(0.8))
    assert "adaptive routing: per-tile density 0.320 ± 0.248 (0.100–0.800)" in payload["text"]
    assert payload["text"].startswith("PISA: 3/4 attention calls sparse (dense: 1 dense step), effective density")
