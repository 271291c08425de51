"""Capture round trip without ComfyUI: the capture override called the way ComfyUI's attention
wrapper calls it (fake ``transformer_options`` with a forward context), files read back by the
evaluation."""

import json

import torch

from pisa_comfy.capture import CaptureSettings, CaptureState
from pisa_comfy.forward_context import ForwardContext
from pisa_comfy.token_layout import END, START, TokenLayout
from pisa_lab import eval as E
from pisa_lab import workloads as W
from pisa_kernels.capture_format import read_capture
from pisa_kernels.tiling import joint_permutation


def sdpa(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """A dense backend with ComfyUI's signature (``func`` of the override)."""
    b, n, hd = q.shape
    qh, kh, vh = (t.view(b, t.shape[1], heads, hd // heads).transpose(1, 2) for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    return o.transpose(1, 2).reshape(b, n, hd)


def forward_options(state, layout, step, sigma):
    to = {"sigmas": torch.tensor([sigma]), "sample_sigmas": torch.tensor([1.0, 0.8, 0.6, 0.4, 0.0])}
    to[state.forward_key] = ForwardContext(layout=layout, step=step, double_blocks=0, whole_forward=True)
    return to


def run_forward(override, state, w, layout, step, blocks, sigma):
    """One model forward: ``blocks`` self-attention calls ((B, N, H*D), heads as keyword, as Wan)
    with a cross-attention call between them, which the capture must skip."""
    b, n, h, d = w.q.shape
    q, k, v = (t.float().reshape(b, n, h * d) for t in (w.q, w.k, w.v))
    to = forward_options(state, layout, step, sigma)
    outs = []
    for _ in range(blocks):
        outs.append(override(sdpa, q, k, v, heads=h, transformer_options=to))
        override(sdpa, q, k[:, :7], v[:, :7], heads=h, transformer_options=to)  # cross-attention: skipped
    return q, outs


def test_capture_round_trip_video(tmp_path):
    w = W.generate(W.get_set("wan-video", "tiny"))
    grid = w.spec.grid
    state = CaptureState(CaptureSettings(folder=str(tmp_path), prefix="wan", blocks=frozenset({1, 2}),
                                         steps=frozenset({1}), max_calls=1))
    override = state.make_override(None)
    layout = TokenLayout("wan", (grid,), END)
    q, outs = run_forward(override, state, w, layout, step=0, blocks=3, sigma=1.0)  # step 0: not chosen
    assert not list(tmp_path.iterdir())
    q, outs = run_forward(override, state, w, layout, step=1, blocks=3, sigma=0.8)
    dense = sdpa(*(t.float().reshape(q.shape) for t in (w.q, w.k, w.v)), w.spec.heads)
    for out in outs:  # the capture never changes an output
        assert torch.equal(out, dense)
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["wan_00001_block1_step1.safetensors"]  # max_calls = 1
    cap = read_capture(str(files[0]))
    assert torch.equal(cap.q, w.q.float()) and torch.equal(cap.v, w.v.float())
    m = cap.meta
    assert (m["family"], m["block"], m["step"], m["heads"], m["head_dim"]) == ("wan", 1, 1, w.spec.heads, 128)
    assert m["grids"] == [[0, list(grid)]] and m["exact"] == [] and m["text_tokens"] == 0
    assert abs(m["sigma"] - 0.8) < 1e-6 and m["source_layout"] == "BNHD"
    assert torch.equal(cap.token_perm, joint_permutation(w.spec.tokens, grid, 0))
    state.finish_run()
    run_forward(override, state, w, layout, step=1, blocks=3, sigma=0.8)  # a new run: the serial continues
    assert max(f.name for f in tmp_path.iterdir()) == "wan_00002_block1_step1.safetensors"


def test_capture_joint_text_and_eval_reads_it(tmp_path):
    w = W.generate(W.get_set("flux-image", "tiny"))
    s = w.spec
    state = CaptureState(CaptureSettings(folder=str(tmp_path), prefix="flux", max_calls=2))
    override = state.make_override(None)
    run_forward(override, state, w, TokenLayout("flux", (s.grid,), START), step=2, blocks=1, sigma=0.6)
    (path,) = tmp_path.iterdir()
    cap = read_capture(str(path))
    assert cap.meta["exact"] == [[0, s.text]] and cap.meta["grids"] == [[s.text, list(s.grid)]]
    assert cap.meta["text_side"] == "start" and cap.token_perm[:s.text].tolist() == list(range(s.text))

    out = tmp_path / "report"
    assert E.main(["--capture", str(tmp_path), "--sparsities", "0.875", "--orders", "1", "drop", "--no-sol",
                   "--out", str(out), "--json", str(out / "r.json")]) == 0
    report = json.loads((out / "r.json").read_text())
    names = {r["case"] for r in report["rows"]}
    assert names == {path.stem}
    assert {r["token_order"] for r in report["rows"]} == {"tiled", "raster"}
    assert {r["routing"] for r in report["rows"]} == {"cov"}  # 2-D grid only: the node's "auto" is cov
    assert (out / "fidelity.md").read_text().count(path.stem) >= 2
