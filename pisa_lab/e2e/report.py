"""The end-to-end report: environment, markdown table, compact console table and the JSON/markdown
files.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .call_times import IN_STEP_BAR
from .comfy_host import REPO


def environment(C, opts) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, "-m", "pisa_lab.e2e"] + sys.argv[1:]),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "comfyui": C.version, "comfyui_path": str(C.root), "stubbed_modules": C.stubbed,
           "dense_attention": getattr(C.attention.optimized_attention, "__name__", str(C.attention.optimized_attention)),
           "device": str(opts.device), "dtype": str(opts.dtype).replace("torch.", "")}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if opts.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(opts.device)
        env["cudnn"] = torch.backends.cudnn.version()
    env["commit"] = os.environ.get("PISA_COMMIT")  # the device's copy of the tree has no .git
    if not env["commit"]:
        try:
            env["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
        except Exception:  # noqa: BLE001
            env["commit"] = None
    return env


def fmt_number(v, fmt="{:.2f}", none="–"):
    return none if v is None else fmt.format(v)


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "tokens x batch", "dense s/step (SDPA)", "gated (x dense)", "sparse s/step", "step speedup",
            "attn share", "PISA calls, density", "workflow run dense -> PISA", "50/10 run", "peak GB"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], "", "ERROR: " + r["error"].splitlines()[0][:90]] + [""] * (len(head) - 3))
            continue
        s = r["summary"]
        wf, iss = s.get("run_workflow"), s["run_issue"]
        peak = max((v.get("peak_gb") or 0) for v in [*r["dense"].values(), r["gated"], r["sparse"]])
        rows.append([
            r["model"], (f"{r['image_tokens']} x{r['batch']}" if r["family"] == "wan" else
                         f"{r['image_tokens']}+{r['text_tokens']} x{r['batch']}"),
            f"{s['dense_ms'] / 1000:.2f} ({s['dense_sdpa']})",
            f"{s['gated_ms'] / 1000:.2f} ({s['gated_over_dense']:.3f})", f"{s['sparse_ms'] / 1000:.2f}",
            f"{s['step_speedup']:.2f}x", fmt_number(s.get("attention_share"), "{:.0%}"),
            f"{s.get('pisa_calls', '–')}, {fmt_number(s.get('density'), '{:.3f}')}",
            (f"{wf['steps']}/{wf['dense_steps']}: {wf['dense_s']:.0f}s -> {wf['pisa_s']:.0f}s ({wf['speedup']:.2f}x)"
             if wf else "–"),
            f"{iss['dense_s']:.0f}s -> {iss['pisa_s']:.0f}s ({iss['speedup']:.2f}x)",
            fmt_number(peak or None, "{:.1f}")])
    return head, rows


def header_lines(report: dict) -> list[str]:
    env = report["environment"]
    return [f"# PISA Patch end to end ({env.get('gpu') or env['device']})", "",
            f"- date {env['date']}, command `{env['command']}`",
            f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env.get('cudnn')}, triton {env['triton']}, "
            f"ComfyUI {env['comfyui']}, dense attention `{env['dense_attention']}`, commit {env['commit']}",
            f"- {report['settings_note']}"]


def call_time_lines(report: dict) -> list[str]:
    """PISA's calls inside the timed sparse step against the benchmark of the same call."""
    return [f"- {r['model']}: PISA call {c['call']}: {c['calls']} calls, {c['in_step_ms']:.2f} ms each in the step "
            f"(median {c['in_step_median_ms']:.2f}), {c['bench_ms']:.2f} ms alone in the benchmark: "
            f"{c['ratio']:.3f}x ({'within' if c['within_bar'] else 'OVER'} the {IN_STEP_BAR:.2f}x bar)"
            for r in report["results"] for c in r.get("call_times", [])]


def profile_lines(report: dict) -> list[str]:
    """``--profile``: GPU kernel time of one sparse step, by group, and its largest kernels."""
    lines = []
    for r in report["results"]:
        p = r.get("profile")
        if not p:
            continue
        groups = ", ".join(f"{g} {ms / 1000:.2f} s" for g, ms in p["groups_ms"].items())
        lines.append(f"- {r['model']}: profile of one sparse step: GPU kernels {p['total_kernel_ms'] / 1000:.2f} s "
                     f"({groups}); largest: " + "; ".join(f"{k['kernel'][:60]} x{k['count']} {k['ms']:.0f} ms"
                                                          for k in p["top"][:6]))
    return lines


def note_lines(report: dict) -> list[str]:
    lines = call_time_lines(report) + profile_lines(report) + [f"- {r['model']}: {n}" for r in report["results"] for n in r.get("notes", [])]
    for c in report.get("compile", []):
        if "error" in c:
            lines.append(f"- torch.compile {c['model']}: {c['error'].splitlines()[0]}")
            continue
        w = c["pisa"]["break_sites"]
        lines.append(
            f"- torch.compile ({c['backend']}) {c['model']}: {'OK' if c['ok'] else 'NOT OK'}; graph breaks "
            f"{c['unpatched']['graph_breaks']} unpatched, {c['pisa']['graph_breaks']} patched "
            f"({c['attention_calls_per_forward']} attention calls per forward); PISA break sites: "
            f"{len(w['opaque_override'])} opaque override, {len(w['per_forward'])} per forward "
            f"({', '.join(x['at'] for x in w['per_forward']) or '-'}), {len(w['inside_attention'])} inside attention; "
            f"graphs {c['unpatched']['unique_graphs']} -> {c['pisa']['unique_graphs']}, new on a repeated sparse "
            f"step {c['graphs_added_by_repeated_sparse_step']}; recompile-limit hits "
            f"{len(c['unpatched']['recompile_limit_hits'])} unpatched, {len(c['pisa']['recompile_limit_hits'])} patched; "
            f"step s (compiled, 3rd step) {c['unpatched']['forwards'][-1]['s']:.3f} unpatched, "
            f"{c['pisa']['forwards'][-1]['s']:.3f} patched; compiled vs eager rel L2 {c['compiled_vs_eager_rel_l2']:.1e}")
    return lines


def markdown(report: dict) -> str:
    head, rows = table_rows(report["results"])
    lines = header_lines(report) + ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    notes = note_lines(report)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def compact_table(report: dict) -> str:
    head, rows = table_rows(report["results"])
    keep = [0, 2, 3, 4, 5, 6, 7, 8, 9]
    cols = [[head[i]] + [r[i] for r in rows] for i in keep]
    widths = [max(len(c) for c in col) for col in cols]
    out = []
    for j in range(len(rows) + 1):
        out.append("  ".join(col[j].ljust(w) for col, w in zip(cols, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out + note_lines(report))


def write_outputs(report: dict, opts) -> None:
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(report, indent=1, default=str))
    if opts.md:
        Path(opts.md).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.md).write_text(markdown(report))
