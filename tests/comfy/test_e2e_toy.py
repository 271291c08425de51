"""The end-to-end benchmark (``python -m pisa_lab.e2e``, issue 6) on the CPU.

* Its real-size configurations are what ComfyUI's own model detection makes of the checkpoints'
  parameter shapes (meta tensors: nothing is allocated).
* ``--toy`` runs through a copy of ComfyUI stripped by ``scripts/prepare_comfy_for_device.sh`` (the
  copy that travels to the GPU machine), in a process where the packages that machine lacks cannot
  be imported, and reports sane numbers: the dense step of the patched model runs no PISA call and
  gives exactly the unpatched output, the sparse step runs PISA.  It runs under
  ``torch.inference_mode()`` as ComfyUI does.
* ``--compile-only`` (slow): the patched model under TorchCompileModel's ``torch.compile`` breaks
  the graph inside attention only at the one opaque override call.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pisa_lab.e2e import comfy_host, models, specs

REPO = Path(__file__).resolve().parents[2]

#: Imported by some ComfyUI module somewhere, but absent on the GPU machine (or may be).
ABSENT_ON_DEVICE = ["comfy_aimdo", "comfy_kitchen", "av", "torchsde", "spandrel", "kornia", "alembic",
                    "sqlalchemy", "aiohttp", "comfyui_frontend_package", "comfyui_workflow_templates"]

_RUN_WITHOUT = """
import importlib.abc, runpy, sys
BLOCKED = set(sys.argv[1].split(","))
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (test: absent on the GPU machine)", name=name)
        return None
sys.meta_path.insert(0, Absent())
sys.argv = ["pisa_lab.e2e"] + sys.argv[2:]
runpy.run_module("pisa_lab.e2e", run_name="__main__", alter_sys=True)
"""


def run_e2e(comfy_root: Path, *args: str, blocked=(), timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "COMFYUI_PATH": str(comfy_root), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", _RUN_WITHOUT, ",".join(blocked) or "-", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def device_copy(comfy_checkout, tmp_path_factory) -> Path:
    """ComfyUI as ``scripts/prepare_comfy_for_device.sh`` copies it for the GPU machine."""
    dest = tmp_path_factory.mktemp("device") / "ComfyUI"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "prepare_comfy_for_device.sh"), str(comfy_checkout),
                           str(dest)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"the device copy is {size / 2**20:.1f} MB"
    assert (dest / "comfy" / "model_patcher.py").is_file()
    assert not any(dest.rglob("tokenizer.json")) and not (dest / "tests").exists()
    return dest


def test_real_sizes_are_what_comfyui_detects(comfy):
    """Each real-size case, as ComfyUI's model detection reads its checkpoint: the supported model,
    the dims the issue names, and the token counts of the issue's resolutions."""
    C = comfy_host.import_comfy(comfy_host.comfy_root(None), cpu=True)
    expect = {
        "wan2.1-14b-720p": ("WAN21_T2V", dict(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824), 21 * 45 * 80),
        "wan2.1-1.3b-480p": ("WAN21_T2V", dict(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960), 21 * 30 * 52),
        "hunyuan-video-720p": ("HunyuanVideo", dict(hidden_size=3072, num_heads=24, depth=20, depth_single_blocks=40,
                                                    guidance_embed=True), 33 * 45 * 80),
        "flux1-dev-1024": ("Flux", dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38,
                                        guidance_embed=True), 64 * 64),
        "flux1-dev-2048": ("Flux", dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38,
                                        guidance_embed=True), 128 * 128),
    }
    assert set(expect) == set(specs.DEFAULT_MODELS)
    for name, (supported, dims, tokens) in expect.items():
        spec = specs.SPECS[name]
        model_config, overrides = models.detect_model_config(C, spec, torch.bfloat16)
        assert overrides == {}, (name, overrides)
        assert type(model_config).__name__ == supported
        for key, value in dims.items():
            assert model_config.unet_config[key] == value, (name, key)
        assert specs.tokens_of(spec, model_config.unet_config["patch_size"]) == tokens
    assert (specs.SPECS["flux1-dev-1024"].text_tokens, specs.SPECS["flux1-dev-2048"].text_tokens) == (256, 512)
    assert specs.SPECS["wan2.1-14b-720p"].cfg and not specs.SPECS["hunyuan-video-720p"].cfg


def test_workflow_steps_and_node_defaults(pack):
    node = pack.NODE_CLASS_MAPPINGS["PISAPatch"]
    defaults = comfy_host.node_defaults(node)
    required = node.INPUT_TYPES()["required"]
    assert defaults == {k: v[1]["default"] for k, v in required.items() if k != "model"}
    assert {"sparsity", "dense_steps", "dense_blocks", "min_tokens"} <= set(defaults)
    wf = comfy_host.read_workflow("pisa_wan2.1_t2v_14B_720p.json", node)
    assert wf["steps"] > wf["pisa"]["dense_steps"] >= 0 and set(wf["pisa"]) == set(defaults)


def test_toy_run_on_the_device_copy_without_optional_packages(device_copy, tmp_path):
    out_json, out_md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    proc = run_e2e(device_copy, "--toy", "--json", str(out_json), "--md", str(out_md), blocked=ABSENT_ON_DEVICE)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    report = json.loads(out_json.read_text())
    assert report["environment"]["comfyui_path"] == str(device_copy.resolve())
    if (device_copy / "comfy" / "pinned_memory.py").is_file():  # cores that import comfy_aimdo
        assert report["environment"]["stubbed_modules"] == ["comfy_aimdo"]
    results = {r["model"]: r for r in report["results"]}
    assert set(results) == {"toy-wan", "toy-hunyuan-video", "toy-flux"}
    for name, r in results.items():
        assert "error" not in r, (name, r.get("traceback"))
        gated, sparse = r["gated"]["pisa_stats"], r["sparse"]["pisa_stats"]
        assert gated["pisa_calls"] == 0, (name, gated["text"])
        # every main-sequence block but the dense block 0 runs PISA in the sparse step
        blocks = {"toy-wan": 2, "toy-hunyuan-video": 2, "toy-flux": 2}[name]
        assert sparse["pisa_calls"] == blocks - 1, (name, sparse["text"])
        assert 0.0 < sparse["density"] < 1.0
        checks = r["checks"]
        assert checks["finite_dense"] and checks["finite_sparse"]
        assert checks["gated_max_abs_diff_vs_dense"] == 0.0, name  # the dense step is ComfyUI's attention
        assert checks["sparse_rel_l2_vs_dense"] < 0.5
        # PISA's calls of the timed sparse evaluations, grouped by configuration, each timed again alone
        (ct,) = r["call_times"]  # one configuration of the main sequence's call per toy model
        assert ct["calls"] == sparse["pisa_calls"] * len(r["sparse"]["all_ms"]), (name, ct)
        assert ct["in_step_ms"] > 0 and ct["bench_ms"] > 0 and math.isclose(
            ct["ratio"], ct["in_step_ms"] / ct["bench_ms"], rel_tol=1e-2)
        assert ("token_perm" in ct["call"]) and (("sink_kv" in ct["call"]) == (name != "toy-wan")), ct["call"]
        s = r["summary"]
        assert s["in_step_over_bench"] == ct["ratio"]
        assert s["dense_ms"] > 0 and s["sparse_ms"] > 0 and 0.0 <= s["attention_share"] <= 1.0
        assert s["run_issue"]["steps"] == 50 and s["run_issue"]["dense_steps"] == 10
        wf = s["run_workflow"]
        assert math.isclose(wf["pisa_s"], (wf["dense_steps"] * s["gated_ms"]
                                          + (wf["steps"] - wf["dense_steps"]) * s["sparse_ms"]) / 1000.0)
    md = out_md.read_text()
    assert "| toy-wan |" in md and "step speedup" in md
    assert "toy-wan: PISA call " in md and "alone in the benchmark" in md
    assert "toy-flux" in proc.stdout  # the compact table at the end


@pytest.mark.slow
def test_toy_compile_breaks_only_at_the_opaque_override(device_copy, tmp_path):
    out_json = tmp_path / "compile.json"
    proc = run_e2e(device_copy, "--toy", "--compile-only", "--compile-models", "wan", "--json", str(out_json),
                   blocked=ABSENT_ON_DEVICE)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    (check,) = json.loads(out_json.read_text())["compile"]
    assert "error" not in check, check.get("traceback")
    sites = check["pisa"]["break_sites"]
    assert sites["inside_attention"] == [], sites
    assert sites["opaque_override"], sites  # the override is called, as one opaque call
    assert check["graphs_added_by_repeated_sparse_step"] == 0
    assert check["compiled_vs_eager_rel_l2"] < 1e-4
    assert check["pisa"]["recompile_limit_hits"] == []
    assert check["ok"]
    assert "capture_scalar_outputs" not in proc.stderr  # dynamo's advice on PISA's per-forward .item() stays quiet
