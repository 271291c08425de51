"""Post-install check for ComfyUI-PISA, run by ComfyUI-Manager after it pip-installs requirements.txt.

Why: PISA has three execution paths and which one a user gets depends on torch, Triton and the GPU,
none of which this pack installs (torch is ComfyUI's; Linux torch wheels bring their matching
Triton). This script says which path will run and how to get the fast one. It never fails the
install: every problem becomes a message and the exit status is always 0.

On Windows, Triton comes from the `triton-windows` package; the matching pip command is printed,
and it is installed only when the environment variable PISA_INSTALL_TRITON=1 is set.
Run it by hand any time: `python install.py` with ComfyUI's Python.
"""
import os
import platform
import re
import subprocess
import sys

# The Triton kernels need sm80+ (Ampere or newer) and a Triton with tensor descriptors
# (upstream PISA asks for 3.5.1). Keep in sync with the kernels' own import-time check.
MIN_CC = (8, 0)
MIN_TRITON = (3, 5, 1)
TAG = "[ComfyUI-PISA]"


def version_tuple(text):
    """'3.5.1+git1234' -> (3, 5, 1); unparsable parts end the tuple."""
    parts = []
    for piece in re.split(r"[.+-]", str(text)):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def probe():
    """What this Python has: torch, its CUDA devices, Triton. Never raises."""
    info = {"os": platform.system(), "python": sys.executable, "torch": None, "torch_error": None,
            "cuda": False, "hip": False, "gpus": [], "triton": None, "triton_error": None}
    try:
        import torch
    except Exception as e:  # missing, or a broken install: both mean PISA cannot load
        info["torch_error"] = f"{type(e).__name__}: {e}"
        return info
    info["torch"] = torch.__version__
    info["hip"] = bool(getattr(torch.version, "hip", None))
    try:
        if torch.cuda.is_available():
            info["cuda"] = True
            info["gpus"] = [(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
                            for i in range(torch.cuda.device_count())]
    except Exception as e:
        info["torch_error"] = f"CUDA query failed: {e}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:
        info["triton_error"] = f"{type(e).__name__}: {e}"
    return info


def triton_ok(info):
    return info["triton"] is not None and version_tuple(info["triton"]) >= MIN_TRITON


def windows_triton_spec(info):
    """The triton-windows requirement that matches this torch: Triton 3.x pairs with torch 2.(x+4)."""
    torch_v = version_tuple(info["torch"] or "")
    if len(torch_v) >= 2 and torch_v[0] == 2 and torch_v[1] >= 6:
        return f"triton-windows<3.{torch_v[1] - 3}"
    return "triton-windows"


def plan(info):
    """Human-readable lines: what runs where, and what to do to get the Triton kernels."""
    if info["torch"] is None:
        return [f"torch is not importable from {info['python']} ({info['torch_error']}).",
                "ComfyUI's torch is missing: install ComfyUI and its requirements into this Python "
                "first. PISA Patch cannot load without torch."]
    lines = [f"torch {info['torch']}, Triton {info['triton'] or 'not available'}, OS {info['os']}."]
    if info["torch_error"]:
        lines.append(info["torch_error"])
    fast = triton_ok(info)
    want = ".".join(map(str, MIN_TRITON))
    if not info["cuda"] or info["hip"]:
        device = "an AMD ROCm GPU" if info["hip"] else "the CPU"
        lines.append(f"No NVIDIA CUDA GPU: PISA runs its PyTorch reference path on {device} "
                     "(correct, but no faster than dense; good for trying workflows).")
    for name, cc in ([] if info["hip"] else info["gpus"]):
        where = f"GPU '{name}' (sm{cc[0]}{cc[1]})"
        if tuple(cc) < MIN_CC:
            lines.append(f"{where}: PyTorch reference path; the Triton kernels need sm80+ (Ampere or newer).")
        elif fast:
            lines.append(f"{where}: Triton kernels (fast path).")
        else:
            lines.append(f"{where}: PyTorch reference path until Triton >= {want} is available "
                         f"(found: {info['triton'] or info['triton_error']}).")
    if info["cuda"] and not info["hip"] and not fast:
        if info["os"] == "Windows":
            lines.append(f'Windows gets Triton from the triton-windows package: "{info["python"]}" -m pip '
                         f'install -U "{windows_triton_spec(info)}"  (or set PISA_INSTALL_TRITON=1 and run '
                         "install.py again).")
        else:
            lines.append(f"Triton normally ships with torch's CUDA wheels; a torch whose Triton is >= {want} "
                         "enables the kernels (do not upgrade triton alone past what torch pins).")
    lines.append("Everywhere: sequences shorter than min_tokens, the dense steps and the dense blocks run "
                 "ComfyUI's normal (dense) attention.")
    return lines


def maybe_install_triton_windows(info):
    """Install triton-windows only on explicit request (PISA_INSTALL_TRITON=1); report, never raise."""
    if not (info["os"] == "Windows" and info["cuda"] and not info["hip"] and not triton_ok(info)
            and os.environ.get("PISA_INSTALL_TRITON") == "1"):
        return []
    cmd = [info["python"], "-m", "pip", "install", "-U", windows_triton_spec(info)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        ok = done.returncode == 0
        return [f"{' '.join(cmd)} -> {'installed' if ok else 'failed: ' + done.stderr.strip()[-400:]}",
                "Restart ComfyUI to use the Triton kernels." if ok else ""]
    except Exception as e:
        return [f"{' '.join(cmd)} could not run: {e}"]


def main():
    print(f"{TAG} checking the environment (Python {platform.python_version()}, {sys.executable})")
    try:
        info = probe()
        lines = plan(info) + maybe_install_triton_windows(info)
    except Exception as e:  # a check must never break the install
        lines = [f"environment check failed ({type(e).__name__}: {e}); PISA will still load if torch works."]
    for line in filter(None, lines):
        print(f"{TAG} {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
