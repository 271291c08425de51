"""The DiT-like workload generator: shapes, determinism, RoPE bands, and attention that is
concentrated the way DiT attention is (not flat like random Gaussian q/k)."""

import math

import pytest
import torch

from pisa_lab import workloads as W


@pytest.fixture(scope="module")
def tiny():
    return {name: W.generate(W.get_set(name, "tiny")) for name in W.SETS}


def test_shapes_dtype_and_text_placement(tiny):
    for name, w in tiny.items():
        s = w.spec
        assert w.q.shape == w.k.shape == w.v.shape == (s.batch, s.tokens, s.heads, s.head_dim), name
        assert w.q.dtype == torch.bfloat16 and torch.isfinite(w.q.float()).all()
        assert len(w.heads) == s.heads
        perm = w.token_perm()
        assert sorted(perm.tolist()) == list(range(s.tokens))
        if s.text:  # the node's order: text first, in input order
            lo, hi = s.text_range
            assert perm[:s.text].tolist() == list(range(lo, hi))
    assert tiny["hunyuan-joint"].spec.text_range[1] == tiny["hunyuan-joint"].spec.tokens  # [img | txt]
    assert tiny["flux-image"].spec.text_range[0] == 0  # [txt | img]


def test_deterministic_per_seed():
    spec = W.get_set("wan-video", "tiny")
    a, b, c = W.generate(spec, seed=3), W.generate(spec, seed=3), W.generate(spec, seed=4)
    assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert not torch.equal(a.q, c.q)


def test_rope_bands_follow_the_models():
    assert W.rope_axes("wan", 128) == ((44, 42, 42), 10000.0)
    assert W.rope_axes("hunyuan_video", 128) == ((16, 56, 56), 256.0)
    assert W.rope_axes("flux", 128) == ((16, 56, 56), 10000.0)
    omega, axis = W.rope_frequencies("wan", 128)
    assert omega.numel() == 64 and axis.tolist() == [0] * 22 + [1] * 21 + [2] * 21
    x = torch.randn(1, 5, 2, 128)
    pos = torch.arange(15, dtype=torch.float64).view(5, 3)
    y = W.apply_rope(x, pos, omega, axis)
    pairs = lambda t: t.view(1, 5, 2, 64, 2).norm(dim=-1)
    torch.testing.assert_close(pairs(y), pairs(x))
    torch.testing.assert_close(W.apply_rope(x, torch.zeros(5, 3, dtype=torch.float64), omega, axis), x)


def test_attention_is_concentrated_and_varied(tiny):
    """Top-12.5 % block mass: well above flat attention on average, spread over heads, flat heads
    below local ones; random Gaussian q/k stay near the flat share."""
    for name, w in tiny.items():
        mass = W.top_block_mass(w.q, w.k, token_perm=w.token_perm())
        nb = math.ceil(w.spec.tokens / 64)
        flat = round(0.125 * nb) / nb
        assert mass.mean() > flat + 0.25, (name, mass)
        assert mass.max() - mass.min() > 0.2, (name, mass)
        assert mass[w.heads.index("local")] > mass[w.heads.index("flat")] + 0.2, (name, mass)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 768, 2, 128, generator=g) for _ in range(2))
    assert W.top_block_mass(q, k).max() < 0.3


def test_bench_inputs_any_length():
    for n in (4608, 5000):
        qkv = W.bench_inputs(1, 2, n, 64, seed=0, device="cpu")
        assert all(t.shape == (1, n, 2, 64) and t.dtype == torch.bfloat16 for t in qkv)
    assert W.spec_for_length(75600, 40, 128).grid == (21, 45, 80)
    hv = W.spec_for_length(119056, 24, 128)
    assert (hv.grid, hv.text, hv.text_side) == ((33, 45, 80), 256, "end")
    odd = W.spec_for_length(12345, 8, 128)
    assert odd.tokens == 12345 and odd.video and odd.text < math.prod(odd.grid[1:])
