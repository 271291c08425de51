"""Tokens beyond the latent grid: FLUX Kontext reference images and Wan reference frames.

They must not break the layout: reference images are tiled as grids of their own, other extra
tokens are kept exact, and at sparsity 0 the result still equals dense attention.
"""

import torch


def test_flux_reference_image_is_tiled_as_its_own_grid(tiny, sample, patch, call_log):
    tm = tiny("flux")
    ref = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))  # 4 x 4 = 16 tokens
    positive = [[c, {**extra, "reference_latents": [ref]}] for c, extra in tm.positive]
    kontext = type(tm)(**{**tm.__dict__, "positive": positive, "negative": positive,
                          "main_tokens": tm.main_tokens + 16})
    before = sample(kontext, call_log.install(tm.patcher), steps=2)
    patched, state = patch(call_log.install(tm.patcher), sparsity=0.0, dense_steps=0, dense_blocks="",
                           min_tokens=0)
    out = sample(kontext, patched, steps=2)
    torch.testing.assert_close(out, before, atol=2e-4, rtol=1e-3)
    assert state.last_summary["pisa_calls"] == 2 * tm.blocks
    n = kontext.main_tokens
    for kw in call_log.kernel_kwargs:
        assert kw["sink_kv"] == [(0, 7)]  # text only: the reference image is not forced exact
        order = kw["token_perm"].tolist()
        assert sorted(order) == list(range(n)) and order[:7] == list(range(7))
        assert sorted(order[-16:]) == list(range(n - 16, n))  # reference tokens tiled after the image
        assert kw["routing"] == "cov"  # images: covariance routing under "auto"


def test_wan_reference_frame_tokens_stay_exact(comfy, pack, pc, call_log):
    """A Wan model with ``ref_conv`` prepends the reference latent's tokens to the video tokens."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    torch.manual_seed(0)
    wan = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=256, ffn_dim=512,
                   freq_dim=256, text_dim=64, out_dim=16, num_heads=2, num_layers=2, in_dim_ref_conv=16,
                   device="cpu", dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for p in wan.parameters():
            p.normal_(std=0.02)
    x, t, ctx = torch.randn(1, 16, 3, 8, 12), torch.tensor([0.5]), torch.randn(1, 16, 64)
    ref = torch.randn(1, 16, 8, 12)  # one frame: 4 x 6 = 24 tokens before the 72 video tokens
    dense = wan(x, t, ctx, reference_latent=ref, transformer_options={})

    state = pc.patch_state.PisaState(pack.pisa_comfy.PisaSettings(sparsity=0.0, dense_steps=0, dense_blocks=frozenset(),
                                                            min_tokens=0))
    wrappers = {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"pisa": [state.diffusion_model_wrapper]}}
    options = {"optimized_attention_override": state.make_override(None), "wrappers": wrappers}
    call_log.forwards.append({"sigma": 0.5, "calls": []})
    out = wan(x, t, ctx, reference_latent=ref, transformer_options=options)
    torch.testing.assert_close(out, dense, atol=2e-4, rtol=1e-3)
    assert len(call_log.kernel_kwargs) == 2
    for kw in call_log.kernel_kwargs:
        assert kw["sink_kv"] == [(0, 24)] and kw["dense_q"] == [(0, 24)]
        assert kw["token_perm"][:24].tolist() == list(range(24))
