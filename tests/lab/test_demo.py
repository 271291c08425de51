"""The README's main job (``scripts/demo.sh`` -> ``python -m pisa_lab.demo``) on the CPU: the node's
configuration is the first line, every line says its tail and token order, the numbers are real
errors, and the plot and JSON are written."""

import json
import math

import pytest
import torch


from pisa_lab import demo


def test_demo_lines_name_what_they_run(tmp_path):
    rc = demo.main(["--out", str(tmp_path), "--size", "tiny"])
    assert rc == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    labels = list(dict.fromkeys(r["method"] for r in result["rows"]))
    assert labels == [m.label for m in demo.METHODS]  # no Sol-Attn line on the CPU
    assert labels[0].startswith("PISA, the node") and "log-normal" in labels[0] and "tiled" in labels[0]
    first = demo.METHODS[0]
    assert (first.order, first.tail, first.token_order) == (1, "lognormal", "tiled")  # what the node runs
    for r in result["rows"]:
        assert 0.0 < r["rel_l2"] < 1.0 and math.isfinite(r["cosine"])
        assert r["tail"] in ("lognormal", "plain") and r["token_order"] in ("tiled", "raster")
    by = {(r["method"], r["sparsity"]): r["rel_l2"] for r in result["rows"]}
    for sp in demo.SPARSITIES:  # the same exact blocks: approximating the rest beats dropping it
        assert by[(labels[0], sp)] < by[(demo.METHODS[3].label, sp)]
    assert result["timed"] is False and result["backend"] == "reference"




def test_the_sol_line_where_a_peer_runs():
    """Where Sol-Attn runs (a GPU with comfy_kitchen), its line comes last, at every sparsity, called
    with the tiled order and the density of that sparsity (a stand-in peer with its signature)."""
    calls = []

    def peer(q, k, v, topk_ratio=None, **kwargs):
        calls.append(topk_ratio)
        return torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)

    result = demo.run("wan-video", "tiny", torch.device("cpu"), sparsities=(0.75, 0.875), sol=(peer, "stand-in"))
    labels = list(dict.fromkeys(r["method"] for r in result["rows"]))
    assert labels[-1] == demo.SOL.label and labels[0] == demo.METHODS[0].label
    assert calls[::2] == pytest.approx([0.25, 0.125], abs=1e-9) and result["sol"] == "stand-in"
    assert all(r["rel_l2"] < 1e-3 for r in result["rows"] if r["method"] == demo.SOL.label)  # dense stand-in
