"""``python -m pisa_lab.e2e.soak``: consecutive sampling runs of two patched models in one process
(on the GPU: 20 real-size runs, docs/e2e.md), here on the CPU with the tiny models: nothing the
pack keeps grows, and a leak is caught."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from pisa_lab.e2e import comfy_host, soak, specs

REPO = Path(__file__).resolve().parents[2]


def test_toy_soak_grows_nothing(comfy, tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "-m", "pisa_lab.e2e.soak", "--toy", "--runs", "8", "--warm-up", "4",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["problems"] == []
    runs = report["runs"]
    assert [r["model"] for r in runs] == ["toy-wan", "toy-flux"] * 4
    assert all(r["same_output"] and r["pisa_calls"] > 0 for r in runs)
    # the two nodes have different settings, so each model has its own plan
    assert runs[-1]["plans"] == 2 and report["widgets"]["toy-flux"]["sparsity"] == soak.OTHER_NODE["sparsity"]
    assert "OK: nothing grew" in proc.stdout


def test_a_leak_is_reported(comfy, pack):
    C = comfy_host.import_comfy(comfy_host.comfy_root(None), cpu=True)
    leak = []

    def log(row):  # after each run's snapshot: from the baseline on, one more live tensor per run
        leak.append(torch.ones(1000))

    torch.set_num_threads(1)
    report = soak.soak(C, pack, [specs.TOY_SPECS["toy-wan"]], torch.device("cpu"), torch.float32, runs=4,
                       warm_up=2, slack_mib=16, widgets={"min_tokens": 0}, log=log)
    assert any(p.startswith("live tensors grew") for p in report["problems"]), report["problems"]
