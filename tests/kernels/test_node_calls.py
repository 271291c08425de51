"""The node's calls as pisa_kernels.bench_node_calls builds them (the benchmark of issue 13): the
keyword arguments the node's decision gives for Wan and HunyuanVideo, and, on those exact calls at
a small size, the Triton kernels against the reference."""

import pytest
import torch

from pisa_lab import bench_node_calls as nc
from pisa_kernels import pisa_attention
from pisa_test_utils import max_err, rand_qkv


def small_call(name, dtype=torch.float32, backend="triton"):
    fam = nc.small(nc.FAMILIES[name])
    q, k, v = rand_qkv(fam.batch, fam.heads, fam.tokens, fam.head_dim, dtype=dtype, layout="BNHD", seed=3,
                       v_shift=0.5)
    return fam, nc.node_call(fam, q, k, v, backend=backend)


def test_wan_call_is_batched_bnhd_views_in_tiled_order():
    fam, call = small_call("wan720")
    kw = call.kwargs
    assert call.q.shape == (fam.batch, fam.tokens, fam.heads, fam.head_dim) and kw["layout"] == "BNHD"
    assert call.q.stride() == (fam.tokens * fam.heads * fam.head_dim, fam.heads * fam.head_dim, fam.head_dim, 1)
    perm = kw["token_perm"]
    assert sorted(perm.tolist()) == list(range(fam.tokens)) and perm.tolist() != list(range(fam.tokens))
    assert kw["kv_valid"] is None and kw["sink_kv"] is None and kw["dense_q"] is None
    assert kw["tail"] == "lognormal" and kw["routing"] == "topk" and kw["sparsity"] == 0.875


def test_hunyuan_call_has_padding_text_sinks_dense_rows_and_joint_order():
    fam, call = small_call("hunyuan720")
    kw = call.kwargs
    assert kw["layout"] == "BHND" and call.q.shape == (fam.batch, fam.heads, fam.tokens, fam.head_dim)
    assert kw["sink_kv"] == [(0, fam.text)] and kw["dense_q"] == [(0, fam.text)]
    valid = kw["kv_valid"]
    assert valid.shape == (fam.batch, fam.tokens)
    assert (~valid).nonzero()[:, 1].tolist() == list(range(fam.text - fam.padded, fam.text))
    assert kw["token_perm"][:fam.text].tolist() == list(range(fam.text))  # text first, then the tiled grid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(nc.FAMILIES))
def test_node_configuration_triton_equals_reference(name, dtype, triton_device):
    """Everything the node passes at once, both backends on the same inputs, and the padded keys'
    values (set to NaN) without any influence."""
    fam, call = small_call(name, dtype)
    q, k, v = (t.to(triton_device) for t in (call.q, call.k, call.v))
    kw = {a: (b.to(triton_device) if isinstance(b, torch.Tensor) else b) for a, b in call.kwargs.items()}
    ref = pisa_attention(q, k, v, **dict(kw, backend="reference"))
    tri = pisa_attention(q, k, v, **kw)
    assert max_err(tri, ref) <= (2e-5 if dtype == torch.float32 else 5e-3)
    if kw["kv_valid"] is not None:
        pad = ~kw["kv_valid"]  # [B, N]
        k2, v2 = k.clone(), v.clone()
        k2.transpose(1, 2)[pad] = float("nan")
        v2.transpose(1, 2)[pad] = float("nan")
        garbage = pisa_attention(q, k2, v2, **kw)
        assert bool(torch.isfinite(garbage).all()) and max_err(garbage, tri) == 0.0
