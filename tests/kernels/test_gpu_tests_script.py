"""scripts/gpu_tests.py, the GPU suite in groups: its groups cover test_gpu.py exactly, it counts
what a group did, and a group cut off by the budget is reported as not run (all on the CPU, with
stand-in test files)."""

import importlib.util
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def gpu_tests():
    spec = importlib.util.spec_from_file_location("gpu_tests", os.path.join(ROOT, "scripts", "gpu_tests.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_tests"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        del sys.modules["gpu_tests"]


@pytest.fixture(scope="module")
def ids(gpu_tests):
    return gpu_tests.collect_gpu_file()


def test_groups_cover_test_gpu_once(gpu_tests, ids):
    groups = gpu_tests.build_groups(ids)
    selected = [a for g in groups for a in g.args if a.startswith(gpu_tests.GPU_FILE + "::")]
    assert len(selected) == len(set(selected))
    for node in ids:  # each collected test is selected by exactly one group's node-id prefix
        owners = [a for a in selected if node == a or node.startswith(a + "[")]
        assert len(owners) == 1, (node, owners)
    assert sum(g.shard for g in groups) == sum("::test_gpu_fuzz[" in i for i in ids) >= 2


def test_a_test_function_left_out_of_the_groups_is_refused(gpu_tests, ids, monkeypatch):
    monkeypatch.setattr(gpu_tests, "GPU_GROUPS", gpu_tests.GPU_GROUPS[1:])
    with pytest.raises(SystemExit, match="out of date"):
        gpu_tests.build_groups(ids)


def test_counts_and_fuzz_cases(gpu_tests, tmp_path):
    (tmp_path / "conftest.py").write_text(
        "def pytest_terminal_summary(terminalreporter):\n"
        "    terminalreporter.write_line('stand-in fuzz: 7 generated cases')\n"
        "    terminalreporter.write_line('total: 7 cases')\n")
    (tmp_path / "test_standin.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): pass\n"
        "def test_c(): assert 1 == 2\n"
        "def test_d(): pytest.skip('no')\n")
    r = gpu_tests.run_group(3, gpu_tests.Group("standin", [str(tmp_path)], 1), None, on_gpu=False)
    assert r["counts"] == dict(tests=4, passed=2, failures=1, errors=0, skipped=1)
    assert r["cases"] == {"stand-in fuzz": 7} and r["status"] == "FAILED"
    assert "group 3 standin: 2 passed, 1 failed, 0 errors, 1 skipped; fuzz cases: stand-in fuzz 7" in \
        gpu_tests.report_line(r)
    (tmp_path / "test_standin.py").write_text("import pytest\ndef test_d(): pytest.skip('no')\n")
    assert gpu_tests.run_group(0, gpu_tests.Group("standin", [str(tmp_path)], 1), None, on_gpu=True)["status"] \
        == "FAILED: nothing passed on a GPU"


def test_a_group_past_the_budget_is_cut_off(gpu_tests, tmp_path):
    (tmp_path / "test_slow.py").write_text("import time\ndef test_slow(): time.sleep(120)\n")
    start = time.monotonic()
    r = gpu_tests.run_group(0, gpu_tests.Group("slow", [str(tmp_path)], 1), 3.0, on_gpu=False)
    assert r["status"] == "cut off by the budget" and r["counts"] is None
    assert time.monotonic() - start < 60


def test_budget_names_the_next_group(gpu_tests, capsys):
    assert gpu_tests.main(["--from", "1", "--budget", "30"]) == 1  # group 1's estimate does not fit
    out = capsys.readouterr().out
    assert "not run: [1, 2, 3" in out and "(python scripts/gpu_tests.py --group 1 2 3 " in out


def test_jobs_run_groups_at_once(gpu_tests, tmp_path, monkeypatch, capsys):
    """With --jobs 2 two groups run side by side: each waits for the other's mark (with one job at a
    time the first would wait in vain), and each group's output comes whole."""
    for me, other in (("a", "b"), ("b", "a")):
        (tmp_path / me).mkdir()
        (tmp_path / me / f"test_{me}.py").write_text(
            "import os, time\n"
            f"def test_{me}():\n"
            f"    open({str(tmp_path / me)!r} + '.mark', 'w').close()\n"
            "    end = time.monotonic() + 60\n"
            f"    while not os.path.exists({str(tmp_path / other)!r} + '.mark'):\n"
            "        assert time.monotonic() < end, 'the other group never ran alongside'\n"
            "        time.sleep(0.1)\n")
    groups = [gpu_tests.Group(n, [str(tmp_path / n)], 1) for n in ("a", "b")]
    monkeypatch.setattr(gpu_tests, "build_groups", lambda ids: groups)
    monkeypatch.setattr(gpu_tests, "collect_gpu_file", lambda: [])
    assert gpu_tests.main(["--from", "0", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "group 0 a: 1 passed" in out and "group 1 b: 1 passed" in out
    assert "not run: none" in out
