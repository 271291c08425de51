"""The evaluation CLI on a tiny set, and its dense truth."""

import importlib.util
import json

import torch

from pisa_lab import eval as E


def test_cli_writes_table_plot_and_json(tmp_path):
    out = tmp_path / "report"
    argv = ["--sets", "hunyuan-joint:tiny", "--sparsities", "0.875", "--orders", "1", "drop",
            "--out", str(out), "--json", str(tmp_path / "r.json")]
    assert E.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    rows = [r for r in report["rows"] if r["method"].startswith("pisa")]
    assert len(rows) == 2 * 2  # orders x token orders (CPU default routing: auto = topk)
    # the node's tail (auto): log-normal
    assert {(r["method"], r["token_order"], r["routing"]) for r in rows} == {
        (m, t, "topk") for m in ("pisa-o1+ln", "pisa-drop") for t in ("tiled", "raster")}
    for r in report["rows"]:
        assert (0.0 < r["rel_l2"] < 1.0 and 0.5 < r["cos"] <= 1.0), r
    if importlib.util.find_spec("comfy_kitchen") is not None:  # its eager reference runs on the CPU
        sol = {r["method"] for r in report["rows"] if r["method"].startswith("sol")}
        assert sol == {"sol-topk", "sol-topk-matched", "sol-tau"}
    assert {b["bar"] for b in report["bars"]} >= {"pisa-o1+ln <= 0.5 x drop", "tiled <= raster (pisa-o1+ln)"}
    conc = report["concentration"]["hunyuan-joint/tiny"]
    assert len(conc["tiled"]) == len(conc["heads"]) == 6
    md = (out / "fidelity.md").read_text()
    assert "## Attention concentration" in md and "| tiled | topk | pisa-o1+ln |" in md and "## Bars" in md
    assert (out / "fidelity.png").stat().st_size > 10_000


def test_dense_reference_matches_sdpa_in_float64():
    case = E.cases_from_sets(["wan-video:tiny"], 0, torch.device("cpu"))[0]
    ref = E.dense_reference(case)
    exact = torch.nn.functional.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (case.q, case.k, case.v))).transpose(1, 2)
    assert E.metrics(ref, exact.float())[0] < 1e-5


def test_adaptive_routings_levels_and_density(tmp_path):
    """Adaptive routing in the eval (issue 17): it runs next to top-k, the achieved density is
    recorded (the widget's: 1 - sparsity of the chosen blocks; top-k's per-tile floor), the report
    has the concentration levels and the density table, and the level bars."""
    argv = ["--sets", "wan-video:tiny", "--sparsities", "0.875", "--orders", "1", "0", "drop", "--token-orders",
            "tiled", "--routings", "topk", "adaptive", "--no-sol", "--out", str(tmp_path / "r"),
            "--json", str(tmp_path / "r.json")]
    assert E.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {(r["routing"], r["method"]): r for r in report["rows"]}
    assert set(rows) == {(ro, m) for ro in ("topk", "adaptive") for m in ("pisa-o1+ln", "pisa-o0+ln", "pisa-drop")}
    topk, widget = (rows[(ro, "pisa-o1+ln")] for ro in ("topk", "adaptive"))
    assert "density_std" in widget and "density_std" not in topk
    assert abs(widget["density"] - 0.125) < 1e-9 and topk["density"] == 1 / 12  # 720 tokens: 12 blocks
    assert len(topk["head_err2"]) == len(topk["head_ref2"]) == 6
    md = (tmp_path / "r" / "fidelity.md").read_text()
    assert "## By concentration level" in md and "## Achieved density" in md
    assert any(b["bar"].endswith("(level)") and b["routing"] == "adaptive" for b in report["bars"])
