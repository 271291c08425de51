"""The GPU test suite in groups that each fit one device call (10 minutes at most).

    python scripts/gpu_tests.py --list                  # the groups and their pytest command lines
    python scripts/gpu_tests.py --group 3               # one group (or several: --group 3 4)
    python scripts/gpu_tests.py --from 0 --budget 580   # groups 0, 1, ... while they fit in 580 s
    python scripts/gpu_tests.py --from 0 --jobs 6 --budget 580   # six groups at a time

The suite: ``tests/kernels/test_gpu.py`` (its non-fuzz tests in four groups by test function, and
its 2,000-case fuzz in the shards ``test_gpu_fuzz[shardK]``, each of its own seed and share of the
cases) and the Triton fuzz of ``tests/kernels/test_fuzz.py`` on the GPU.  Every group runs as its own
pytest process (a failure or hang stays in its group; Triton's on-disk kernel cache carries over
between them).  After each group one line gives its counts and time; at the end a summary, and with
``--budget`` the groups to run in the next call (a group that would not fit, by its estimate or
by the time an earlier fuzz shard took, is not started; one cut off by the budget counts as not run).
``PISA_FUZZ_SCALE`` in the environment scales the fuzz shards as it scales the tests.
With ``--jobs N`` N groups run at once on the one GPU (most of a group's time is the host:
hypothesis, Triton's compiler, the reference's many small launches; each process measures its own
memory, and no test compares times), each group's output printed whole when it ends.
Exit status 0 only if every group run passed (on a GPU, a group in which everything was skipped
fails too).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import xml.etree.ElementTree as ET
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_FILE = "tests/kernels/test_gpu.py"
FUZZ_FILE = "tests/kernels/test_fuzz.py"
FUZZ_FUNCTION = "test_gpu_fuzz"

#: test_gpu.py's other test functions, in groups: (name, functions, estimated seconds on an H200
#: with a cold kernel cache; used by --budget to decide whether a group still fits).
GPU_GROUPS = [
    ("moderate-shapes", ["test_moderate_shapes"], 240),
    ("masks-perm-sinks-fallbacks", ["test_moderate_masks_perm_sinks", "test_fp32_and_large_head_dim_fallback",
                                    "test_auto_is_triton_on_gpu", "test_node_calls"], 180),
    ("layouts-routings-video", ["test_moderate_layout_routing_video_perm"], 300),
    ("graphs-sdpa-recompile-memory", ["test_cuda_graph_replay", "test_routing_capture_of_short_calls",
                                      "test_cuda_graph_of_expanded_inputs_and_across_inference_mode",
                                      "test_sparsity0_is_sdpa", "test_no_recompilation_for_new_lengths_and_sparsities",
                                      "test_extra_memory_is_small"], 240),
    # issue 17 (estimate, not yet timed: 16 compare cases of 3,000-3,600 tokens with graph checks, and
    # the Triton selection against the sorted one at Wan 720p and FLUX sizes)
    ("adaptive-routing", ["test_adaptive_routing", "test_adaptive_tile_order_only_reorders",
                          "test_adaptive_triton_selection_is_the_sorted_one"], 300),
]
#: Estimated seconds of one fuzz shard (250 cases at PISA_FUZZ_SCALE=1) until one has been timed
#: (2,000 cases took 466 s on an H100 before the graph checks were added).
SHARD_ESTIMATE = 150
#: Seconds kept in hand under --budget (process start-up, the transfer of the output).
SLACK = 10


@dataclass
class Group:
    name: str
    args: list[str]  # pytest arguments
    estimate: float
    shard: bool = False

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *self.args]


def collect_gpu_file() -> list[str]:
    """The node ids of test_gpu.py (collection needs no GPU)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", GPU_FILE],
                         cwd=ROOT, capture_output=True, text=True)
    ids = [line.strip() for line in out.stdout.splitlines() if line.startswith(GPU_FILE + "::")]
    if out.returncode != 0 or not ids:
        sys.exit(f"collecting {GPU_FILE} failed:\n{out.stdout}\n{out.stderr}")
    return ids


def build_groups(ids: list[str]) -> list[Group]:
    """The groups, after checking that they cover every test function of test_gpu.py exactly once."""
    functions = {i.split("::", 1)[1].split("[", 1)[0] for i in ids}
    grouped = [f for _, fs, _ in GPU_GROUPS for f in fs]
    missing = functions - set(grouped) - {FUZZ_FUNCTION}
    extra = set(grouped) - functions
    twice = {f for f in grouped if grouped.count(f) > 1}
    if missing or extra or twice:
        sys.exit(f"scripts/gpu_tests.py GPU_GROUPS is out of date: not grouped {sorted(missing)}, "
                 f"not in {GPU_FILE} {sorted(extra)}, in two groups {sorted(twice)}")
    shards = sorted((i for i in ids if i.startswith(f"{GPU_FILE}::{FUZZ_FUNCTION}[")),
                    key=lambda i: int(re.search(r"(\d+)\]$", i).group(1)))
    if not shards:
        sys.exit(f"no {FUZZ_FUNCTION} shards collected in {GPU_FILE}")
    groups = [Group("fuzz-triton-vs-reference", [FUZZ_FILE, "-k", "triton_vs_reference"], 120)]
    groups += [Group(name, [f"{GPU_FILE}::{f}" for f in fs], est) for name, fs, est in GPU_GROUPS]
    groups += [Group(f"gpu-fuzz-{i.rsplit('[', 1)[1][:-1]}", [i], SHARD_ESTIMATE, shard=True) for i in shards]
    return groups


def _counts(xml_path: str) -> dict[str, int]:
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    return c


CASES = re.compile(r"^(?!total:)(.+): (\d+) generated cases$")


def run_group(index: int, group: Group, timeout: float | None, on_gpu: bool, write=sys.stdout.write) -> dict:
    """Runs one group, passing its output line by line to ``write``; returns its counts, fuzz cases,
    seconds and status (``on_gpu``: a group in which nothing passed, all skipped, fails)."""
    write(f"\n[gpu_tests] group {index} {group.name}: {shlex.join(['python'] + group.command()[1:])}\n")
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = os.path.join(tmp, "junit.xml")
        start = time.monotonic()
        proc = subprocess.Popen(group.command() + [f"--junitxml={xml_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        cases: dict[str, int] = {}
        timed_out = threading.Event()

        def cut_off():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group's own process group (start_new_session)
            except ProcessLookupError:  # it ended just now
                pass

        timer = threading.Timer(max(1.0, timeout), cut_off) if timeout is not None else None
        if timer is not None:
            timer.start()
        try:
            for line in proc.stdout:
                write(line)
                m = CASES.match(line.strip())
                if m:
                    cases[m.group(1)] = int(m.group(2))
            proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
        seconds = time.monotonic() - start
        counts = _counts(xml_path) if os.path.exists(xml_path) and not timed_out.is_set() else None
    if timed_out.is_set():
        status = "cut off by the budget"
    elif counts is None:
        status = f"no report (pytest exit {proc.returncode})"
    elif counts["failures"] or counts["errors"] or proc.returncode != 0:
        status = "FAILED"
    elif on_gpu and counts["passed"] == 0:
        status = "FAILED: nothing passed on a GPU"
    else:
        status = "ok"
    return dict(index=index, name=group.name, counts=counts, cases=cases, seconds=seconds, status=status,
                returncode=proc.returncode)


def report_line(r: dict) -> str:
    c = r["counts"]
    counts = (f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
              if c else "no counts")
    cases = "; fuzz cases: " + ", ".join(f"{k} {n}" for k, n in r["cases"].items()) if r["cases"] else ""
    return f"[gpu_tests] group {r['index']} {r['name']}: {counts}{cases}; {r['seconds']:.0f} s; {r['status']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sel = ap.add_mutually_exclusive_group(required=True)
    sel.add_argument("--list", action="store_true", help="print the groups and their command lines")
    sel.add_argument("--group", type=int, nargs="+", metavar="N", help="run these groups")
    sel.add_argument("--from", dest="start", type=int, metavar="N", help="run groups N, N+1, ... in order")
    ap.add_argument("--budget", type=float, metavar="SECONDS",
                    help="start a group only while its estimate fits in what is left of SECONDS")
    ap.add_argument("--jobs", type=int, default=1, metavar="N", help="run N groups at once (default 1)")
    args = ap.parse_args(argv)
    groups = build_groups(collect_gpu_file())

    if args.list:
        for i, g in enumerate(groups):
            print(f"{i:2d}  {g.name:30s} ~{g.estimate:.0f} s  {shlex.join(['python'] + g.command()[1:])}")
        print("one group: python scripts/gpu_tests.py --group N; in one call: "
              "python scripts/gpu_tests.py --from N --jobs 6 --budget 580")
        return 0

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        print("[gpu_tests] no CUDA GPU here: the GPU tests will be skipped", flush=True)
    for i in args.group or []:
        if not 0 <= i < len(groups):
            ap.error(f"no group {i} (0..{len(groups) - 1}; see --list)")
    order = args.group if args.group else list(range(args.start, len(groups)))
    t0 = time.monotonic()
    results, shard_times = [], []
    pending = list(order)  # taken from the front, in order
    lock = threading.Lock()
    stop = threading.Event()  # set once a group did not fit or was cut off: start no more

    def worker():
        while True:
            with lock:
                if stop.is_set() or not pending:
                    return
                i = pending[0]
                g = groups[i]
                left = None if args.budget is None else args.budget - (time.monotonic() - t0) - SLACK
                estimate = max(shard_times) if g.shard and shard_times else g.estimate
                if left is not None and estimate > left:
                    stop.set()
                    print(f"\n[gpu_tests] group {i} {g.name} (~{estimate:.0f} s) does not fit in the {left:.0f} s "
                          "left", flush=True)
                    return
                pending.pop(0)
            if args.jobs == 1:
                r = run_group(i, g, left, on_gpu, write=lambda line: print(line, end="", flush=True))
            else:  # the group's output whole, when it ends
                lines: list[str] = []
                r = run_group(i, g, left, on_gpu, write=lines.append)
            with lock:
                if args.jobs != 1:
                    print("".join(lines), end="", flush=True)
                results.append(r)
                print(report_line(r), flush=True)
                if r["status"] == "cut off by the budget":
                    stop.set()
                elif g.shard:
                    shard_times.append(r["seconds"])

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(worker) for _ in range(args.jobs)]:
            f.result()
    results.sort(key=lambda r: r["index"])
    not_run = sorted(set(order) - {r["index"] for r in results if r["status"] != "cut off by the budget"})

    print("\n[gpu_tests] summary")
    for r in results:
        print(report_line(r))
    done = [r for r in results if r["counts"]]
    total = {k: sum(r["counts"][k] for r in done) for k in ("passed", "failures", "errors", "skipped")}
    cases = sum(n for r in results for n in r["cases"].values())
    print(f"[gpu_tests] {len(results)} groups run, {total['passed']} passed, {total['failures']} failed, "
          f"{total['errors']} errors, {total['skipped']} skipped; {cases} fuzz cases; "
          f"{time.monotonic() - t0:.0f} s")
    if not_run:
        print(f"[gpu_tests] not run: {not_run} (python scripts/gpu_tests.py --group {' '.join(map(str, not_run))} "
              f"--jobs {args.jobs} --budget 580)")
    else:
        print("[gpu_tests] not run: none, every group asked for ran")
    return 0 if results and all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
