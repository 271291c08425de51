"""Post-install check for ComfyUI-PISA, run by ComfyUI-Manager after it pip-installs requirements.txt.

Why: PISA has three execution paths and which one a user gets depends on torch, Triton and the GPU,
none of which this pack installs (torch is ComfyUI's; Linux torch wheels bring their matching
Triton). This script says which path will run and how to get the fast one, using the pack's own
rule (`pisa_kernels.backend`) when it imports, so the report matches what the node will do. It
never fails the install: every problem becomes a message and the exit status is always 0.

On Windows, Triton comes from the `triton-windows` package; the matching pip command is printed,
and it is installed only when the environment variable PISA_INSTALL_TRITON=1 is set.
Run it by hand any time: `python install.py` with ComfyUI's Python.
"""
import os
import platform
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_CC = (8, 0)  # the Triton kernels need sm80+ (also pisa_kernels.backend.MIN_CAPABILITY)
TAG = "[ComfyUI-PISA]"


def version_tuple(text):
    """'2.9.1+cu128' -> (2, 9, 1); unparsable parts end the tuple."""
    parts = []
    for piece in re.split(r"[.+-]", str(text)):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def _pack_rule():
    """`pisa_kernels.backend.triton_unavailable_reason`, or None where the pack does not import."""
    sys.path.insert(0, HERE)
    try:
        from pisa_kernels import backend

        return backend.triton_unavailable_reason
    except Exception:
        return None
    finally:
        sys.path.remove(HERE)


def _fallback_reason(info, cc):
    if info["triton"] is None:
        return f"Triton is not usable ({info['triton_error']})"
    if tuple(cc) < MIN_CC:
        return f"GPU capability sm{cc[0]}{cc[1]} is below sm80"
    return None


def probe():
    """torch, Triton and every CUDA device with the reason the Triton kernels cannot run on it
    (None: they can). Never raises."""
    info = {"os": platform.system(), "python": sys.executable, "torch": None, "torch_error": None,
            "hip": False, "gpus": [], "triton": None, "triton_error": None}
    try:
        import torch
    except Exception as e:  # missing, or a broken install: both mean PISA cannot load
        info["torch_error"] = f"{type(e).__name__}: {e}"
        return info
    info["torch"] = torch.__version__
    info["hip"] = bool(getattr(torch.version, "hip", None))
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:
        info["triton_error"] = f"{type(e).__name__}: {e}"
    try:
        if torch.cuda.is_available():
            rule = _pack_rule()
            for i in range(torch.cuda.device_count()):
                cc = torch.cuda.get_device_capability(i)
                reason = rule(torch.device("cuda", i)) if rule else _fallback_reason(info, cc)
                info["gpus"].append((torch.cuda.get_device_name(i), cc, reason))
    except Exception as e:
        info["torch_error"] = f"CUDA query failed: {e}"
    return info


def windows_triton_spec(info):
    """The triton-windows requirement that matches this torch: Triton 3.x pairs with torch 2.(x+4)."""
    torch_v = version_tuple(info["torch"] or "")
    if len(torch_v) >= 2 and torch_v[0] == 2 and torch_v[1] >= 6:
        return f"triton-windows<3.{torch_v[1] - 3}"
    return "triton-windows"


def needs_triton(info):
    """A capable NVIDIA GPU is present but Triton itself is what is missing or broken."""
    return any(r and r.startswith("Triton") for _, cc, r in info["gpus"]) and not info["hip"]


def plan(info):
    """Human-readable lines: what runs where, and what to do to get the Triton kernels."""
    if info["torch"] is None:
        return [f"torch is not importable from {info['python']} ({info['torch_error']}).",
                "ComfyUI's torch is missing: install ComfyUI and its requirements into this Python "
                "first. PISA Patch cannot load without torch."]
    lines = [f"torch {info['torch']}, Triton {info['triton'] or 'not available'}, OS {info['os']}."]
    if info["torch_error"]:
        lines.append(info["torch_error"])
    if not info["gpus"]:
        lines.append("No CUDA GPU: PISA runs its PyTorch reference path on the CPU (correct, but no "
                     "faster than dense; good for trying workflows).")
    for name, cc, reason in info["gpus"]:
        where = f"GPU '{name}' (sm{cc[0]}{cc[1]})"
        lines.append(f"{where}: Triton kernels (fast path)." if reason is None
                     else f"{where}: PyTorch reference path ({reason}).")
    if needs_triton(info):
        if info["os"] == "Windows":
            lines.append(f'Windows gets Triton from the triton-windows package: "{info["python"]}" -m pip '
                         f'install -U "{windows_triton_spec(info)}"  (or set PISA_INSTALL_TRITON=1 and run '
                         "install.py again).")
        else:
            lines.append("Triton ships with torch's Linux CUDA wheels: install a CUDA build of torch (with its "
                         "own Triton) rather than upgrading triton alone.")
    lines.append("Everywhere: sequences shorter than min_tokens, the dense steps and the dense blocks run "
                 "ComfyUI's normal (dense) attention.")
    return lines


def maybe_install_triton_windows(info):
    """Install triton-windows only on explicit request (PISA_INSTALL_TRITON=1); report, never raise."""
    if not (info["os"] == "Windows" and needs_triton(info) and os.environ.get("PISA_INSTALL_TRITON") == "1"):
        return []
    cmd = [info["python"], "-m", "pip", "install", "-U", windows_triton_spec(info)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except Exception as e:
        return [f"{' '.join(cmd)} could not run: {e}"]
    if done.returncode != 0:
        return [f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}"]
    return [f"{' '.join(cmd)}: installed. Restart ComfyUI to use the Triton kernels."]


def main():
    print(f"{TAG} checking the environment (Python {platform.python_version()}, {sys.executable})")
    try:
        info = probe()
        lines = plan(info) + maybe_install_triton_windows(info)
    except Exception as e:  # a check must never break the install
        lines = [f"environment check failed ({type(e).__name__}: {e}); PISA will still load if torch works."]
    for line in lines:
        print(f"{TAG} {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
