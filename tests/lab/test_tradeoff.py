"""Error against time (pisa_lab.tradeoff): the matched-time rule on known points, and the CLI on a
tiny set on the CPU."""

import importlib.util
import json

import pytest

from pisa_lab import tradeoff as T


def _row(method, param, ms, err, case="c"):
    return dict(case=case, method=method, param=param, ms=ms, rel_l2=err)


def test_matched_time_takes_the_most_accurate_point_no_slower():
    rows = [_row("pisa", 0.9, 10.0, 0.05), _row("pisa", 0.8, 14.0, 0.03), _row("pisa", 0.94, 8.0, 0.08),
            _row("pisa", 0.85, 12.5, 0.031),  # slower than 12 ms: not a match for the 12 ms rival
            _row("sol-tau", 1.3, 12.0, 0.06), _row("sol-tau", 2.2, 5.0, 0.2), _row("sol-tau", 0.8, 30.0, 0.01),
            _row("pisa", 0.9, 1.0, 0.5, case="other")]
    got = {(m["rival"], m["rival_param"]): m for m in T.matched_time(rows) if m["case"] == "c"}
    assert set(got) == {("sol-tau", 1.3), ("sol-tau", 2.2), ("sol-tau", 0.8)}
    at12 = got[("sol-tau", 1.3)]
    assert (at12["pisa_param"], at12["pisa_ms"], at12["pisa_err"]) == (0.9, 10.0, 0.05)
    assert at12["ratio"] == pytest.approx(0.05 / 0.06)
    assert got[("sol-tau", 2.2)]["pisa_param"] is None and got[("sol-tau", 2.2)]["ratio"] is None
    assert got[("sol-tau", 0.8)]["pisa_param"] == 0.8  # every PISA point is as fast: the most accurate
    one_case = [r for r in rows if r["case"] == "c"]
    assert T.best_within(one_case, "pisa", 7.9) is None and T.best_within(one_case, "pisa", 8.0)["param"] == 0.94


def test_cli_on_a_tiny_set(tmp_path):
    argv = ["--sets", "wan-video:tiny", "--sparsities", "0.8", "0.96", "--taus", "1.3", "--topk-ratios", "0.125",
            "--backend", "reference", "--device", "cpu", "--json", str(tmp_path / "t.json"),
            "--md", str(tmp_path / "t.md"), "--plot", str(tmp_path / "t.png")]
    assert T.main(argv) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    pisa = {(r["method"], r["param"]): r for r in report["rows"] if r["method"].startswith("pisa")}
    assert set(pisa) == {(m, sp) for m in ("pisa", "pisa@adaptive") for sp in (0.8, 0.96)}
    for r in report["rows"]:
        assert r["ms"] > 0 and 0.0 < r["rel_l2"] < 1.0, r
    for method in ("pisa", "pisa@adaptive"):  # more exact blocks, less error; the mean density is the widget's
        assert pisa[(method, 0.8)]["rel_l2"] < pisa[(method, 0.96)]["rel_l2"]
        assert pisa[(method, 0.8)]["density"] > pisa[(method, 0.96)]["density"]
    assert pisa[("pisa", 0.8)]["density"] == pytest.approx(0.2, abs=0.05)
    if importlib.util.find_spec("comfy_kitchen") is not None:  # its eager reference runs on the CPU
        assert {r["method"] for r in report["rows"]} >= {"sol-tau", "sol-topk"}
        assert {m["rival"] for m in report["matched"]} >= {"sol-tau", "sol-topk", "pisa@adaptive", "pisa"}
    md = (tmp_path / "t.md").read_text()
    assert "## Operating points" in md and "## At matched time" in md and "| wan-video/tiny | pisa |" in md
    assert (tmp_path / "t.png").stat().st_size > 10_000
