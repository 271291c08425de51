"""Full sampling (comfy.sample.sample) of tiny random-weight models with the PISA Patch node.

Which calls ran PISA is read independently of the node's own bookkeeping (see ``CallLog``):
kernel calls through a spy on the kernel entry point, dense calls through a delegating override
installed before the node, forwards through a test wrapper.
"""

import pytest
import torch

FAMILIES = ["wan", "flux", "hunyuan_video"]
EVERYTHING_SPARSE = dict(dense_steps=0, dense_blocks="", min_tokens=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsity_zero_matches_the_unpatched_model(tiny, sample, patch, family):
    """At sparsity 0 every block is exact: the whole path (layouts, tiling, text ranges, padding
    mask) must reproduce dense attention.  The input model stays unpatched."""
    tm = tiny(family)
    before = sample(tm)
    patched, state = patch(tm.patcher, sparsity=0.0, **EVERYTHING_SPARSE)
    out = sample(tm, patched)
    stats = state.last_summary
    assert stats["pisa_calls"] == 3 * tm.blocks, stats["text"]  # every block of every step ran PISA
    torch.testing.assert_close(out, before, atol=2e-4, rtol=1e-3)
    after = sample(tm)
    assert torch.equal(after, before), "the unpatched model changed after the patched clone ran"
    options = tm.patcher.model_options.get("transformer_options", {})
    assert "optimized_attention_override" not in options
    assert not any(tm.patcher.get_wrappers(w, "pisa") for w in tm.patcher.wrappers)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("token_order", ["auto", "raster"])
def test_log_normal_tail_in_every_token_order(tiny, sample, patch, call_log, family, token_order):
    """The node runs the log-normal tail (measured more faithful in both token orders)."""
    tm = tiny(family)
    patched, _ = patch(call_log.install(tm.patcher), sparsity=0.5, token_order=token_order, **EVERYTHING_SPARSE)
    sample(tm, patched, steps=1)
    assert call_log.kernel_kwargs
    for kw in call_log.kernel_kwargs:
        assert (kw["token_perm"] is not None) == (token_order == "auto")
        assert kw["tail"] == "lognormal"


def test_pisa_runs_in_sparse_steps_and_blocks_only(tiny, sample, patch, call_log):
    """Wan, 3 steps, CFG batch: step 0 dense (dense_steps 1), block 0 always dense, block 1 PISA in
    steps 1-2; cross-attention (12 text keys) always dense."""
    tm = tiny("wan")
    patched, state = patch(call_log.install(tm.patcher), sparsity=0.5, dense_steps=1, dense_blocks="0",
                           min_tokens=0)
    sample(tm, patched)
    assert len(call_log.forwards) == 3
    kinds = [call_log.main_calls(f, tm.main_tokens) for f in call_log.forwards]
    assert kinds == [["dense", "dense"], ["dense", "pisa"], ["dense", "pisa"]]
    for forward in call_log.forwards:
        cross = [c for c in forward["calls"] if c[0] == "dense" and c[2] != c[1]]
        assert len(cross) == 2 and all(c[2] == 12 for c in cross)
    stats = state.last_summary
    assert (stats["calls"], stats["pisa_calls"], stats["dense_calls"]) == (12, 2, 10)
    assert "6 cross-attention" in stats["text"] and "2 dense step" in stats["text"]
    assert 0.0 < stats["density"] < 1.0


def test_two_sampler_split_continues_the_step_count(comfy, tiny, sample, patch, call_log):
    """KSamplerAdvanced-style split of a 4-step schedule into steps 0-1 and 2-3 on one patched model,
    dense_steps 3: the second sampler's first step is the schedule's step 2, still dense."""
    tm = tiny("wan")
    patched, state = patch(call_log.install(tm.patcher), sparsity=0.5, dense_steps=3, dense_blocks="",
                           min_tokens=0)
    half = sample(tm, patched, steps=4, last_step=2, force_full_denoise=False)
    first_run = state.last_summary
    sample(tm, patched, steps=4, latent=half, noise=torch.zeros_like(half), start_step=2)
    second_run = state.last_summary
    sigmas = comfy.samplers.KSampler(tm.patcher, steps=4, device="cpu", sampler="euler", scheduler="simple",
                                     model_options=tm.patcher.model_options).sigmas.tolist()
    steps = [min(range(4), key=lambda i: abs(sigmas[i] - f["sigma"])) for f in call_log.forwards]
    assert steps == [0, 1, 2, 3]
    kinds = [call_log.main_calls(f, tm.main_tokens) for f in call_log.forwards]
    assert kinds == [["dense", "dense"]] * 3 + [["pisa", "pisa"]]
    assert first_run["pisa_calls"] == 0 and second_run["pisa_calls"] == 2


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_dense_blocks_count_single_blocks_after_double_blocks(tiny, sample, patch, call_log, family):
    """2 double + 2 single blocks; "0, 3" keeps the first double and the last single block dense,
    whether the core publishes block_index (v0.19.3) or not (v0.3.64: counted per forward)."""
    tm = tiny(family)
    patched, _ = patch(call_log.install(tm.patcher), sparsity=0.5, dense_steps=0, dense_blocks="0, 3",
                       min_tokens=0)
    sample(tm, patched, steps=2)
    for forward in call_log.forwards:
        assert call_log.main_calls(forward, tm.main_tokens) == ["dense", "pisa", "pisa", "dense"]


def test_short_sequences_run_dense(tiny, sample, patch):
    tm = tiny("flux")
    patched, state = patch(tm.patcher, sparsity=0.5, dense_steps=0, dense_blocks="", min_tokens=4096)
    sample(tm, patched, steps=2)
    stats = state.last_summary
    assert stats["pisa_calls"] == 0 and stats["dense_calls"] == 2 * tm.blocks
    assert f"{2 * tm.blocks} short sequence" in stats["text"]


def test_hunyuan_refiner_dense_text_exact_and_padding_from_the_data(tiny, sample, patch, call_log):
    """The token refiner (7 text tokens, per-query mask) stays dense.  The joint blocks run PISA with
    the padding mask as kv_valid, and the text range exact, on the side the core puts it: where the
    padded (masked) keys are in the mask the core built."""
    tm = tiny("hunyuan_video")
    patched, _ = patch(call_log.install(tm.patcher), sparsity=0.5, **EVERYTHING_SPARSE)
    sample(tm, patched, steps=2)
    n = tm.main_tokens
    for forward in call_log.forwards:
        refiner = [c for c in forward["calls"] if c[0] == "dense"]
        assert refiner and all(c[1] == c[2] == 7 for c in refiner)
        assert call_log.main_calls(forward, n) == ["pisa"] * 4
    masks = [m for m in call_log.dense_masks if m is not None and m.dim() == 4]
    assert masks, "the refiner's per-query mask reached the dense path"
    # Where the core put the text: its padded keys are the last two of the 7 text tokens.
    padded = [kw["kv_valid"] for kw in call_log.kernel_kwargs]
    removed = (~padded[0][0]).nonzero().flatten().tolist()
    text_first = removed == [5, 6]
    assert removed in ([5, 6], [n - 2, n - 1])
    text = (0, 7) if text_first else (n - 7, n)
    for kw in call_log.kernel_kwargs:
        assert kw["sink_kv"] == [text] and kw["dense_q"] == [text]
        assert kw["token_perm"] is not None and kw["routing"] == "topk" and kw["tail"] == "lognormal"
        assert torch.equal(kw["kv_valid"], padded[0])


def test_hunyuan_text_side_without_padding(comfy, tiny, sample, patch, call_log):
    """No padding: v0.19.3+ single blocks say where the image is (img_slice); the double blocks of
    the first forward, with no evidence yet, keep both ends exact.  v0.3.64 gives no evidence."""
    tm = tiny("hunyuan_video")
    no_padding = [[c, {**extra, "attention_mask": torch.ones(1, 7, dtype=torch.long)}] for c, extra in tm.positive]
    model = tm.patcher
    patched, _ = patch(call_log.install(model), sparsity=0.5, **EVERYTHING_SPARSE)
    comfy.sample.sample(patched, torch.zeros_like(tm.latent), 2, 1.0, "euler", "simple", no_padding, no_padding,
                        tm.latent, disable_pbar=True, seed=0)
    n = tm.main_tokens
    sinks = [kw["sink_kv"] for kw in call_log.kernel_kwargs]
    assert len(sinks) == 8
    both_ends = [(0, 7), (n - 7, n)]
    if comfy.version.startswith("0.3."):
        assert sinks == [both_ends] * 8
    else:
        assert sinks[:2] == [both_ends] * 2  # double blocks, first forward
        assert sinks[2:] == [[(0, 7)]] * 6  # then known: [txt | img]


def test_composes_with_an_override_installed_before(tiny, sample, patch, call_log):
    """The previous override is PISA's dense path: it sees exactly the dense calls, and at sparsity
    0 the result equals running the previous override alone."""
    tm = tiny("flux")
    base = call_log.install(tm.patcher)
    alone = sample(tm, base, steps=2)
    alone_calls = sum(len(f["calls"]) for f in call_log.forwards)
    call_log.forwards.clear()
    patched, state = patch(base, sparsity=0.0, dense_steps=1, dense_blocks="", min_tokens=0)
    out = sample(tm, patched, steps=2)
    torch.testing.assert_close(out, alone, atol=2e-4, rtol=1e-3)
    dense_seen = sum(c[0] == "dense" for f in call_log.forwards for c in f["calls"])
    assert dense_seen == state.last_summary["dense_calls"] == tm.blocks  # step 0
    assert state.last_summary["pisa_calls"] == tm.blocks and alone_calls == 2 * tm.blocks


def test_a_second_pisa_patch_replaces_the_first(tiny, sample, patch):
    tm = tiny("wan")
    first, first_state = patch(tm.patcher, sparsity=0.5, **EVERYTHING_SPARSE)
    second, second_state = patch(first, sparsity=0.25, **EVERYTHING_SPARSE)
    top = second.model_options["transformer_options"]["optimized_attention_override"]
    assert top.pisa_state is second_state and top.pisa_previous is None
    sample(tm, second, steps=2)
    assert second_state.last_summary["pisa_calls"] == 2 * tm.blocks
    assert first_state.last_summary is None


def test_adaptive_routing_from_the_widget(tiny, sample, patch, call_log):
    """routing = adaptive (issue 17): the node passes it on, and a run's effective density is the
    top-k routing's within the rounding of the budget (the same number of exact blocks on average)."""
    density = {}
    for routing in ("topk", "adaptive"):
        tm = tiny("wan")
        patched, state = patch(call_log.install(tm.patcher), sparsity=0.5, routing=routing, **EVERYTHING_SPARSE)
        sample(tm, patched, steps=2)
        assert call_log.kernel_kwargs[-1]["routing"] == routing
        stats = state.last_summary
        assert stats["pisa_calls"] > 0, stats["text"]
        density[routing] = stats["density"]
        spread = stats.get("tile_density")
        if routing == "topk":
            assert spread is None and "per-tile" not in stats["text"], stats
        else:  # the stats show the spread of the per-tile budget around its mean (issue 17)
            assert 0.0 < spread["min"] <= spread["mean"] <= spread["max"] <= 1.0 and spread["std"] >= 0.0, spread
            assert "adaptive routing: per-tile density" in stats["text"], stats["text"]
    assert density["adaptive"] < 1.0 and abs(density["adaptive"] - density["topk"]) < 0.1, density
