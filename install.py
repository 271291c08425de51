"""Post-install check for ComfyUI-PISA, run by ComfyUI-Manager after it pip-installs requirements.txt.

Why: whether the PISA Patch node runs the Triton kernels or leaves attention dense depends on torch,
Triton and the GPU, none of which this pack installs (torch is ComfyUI's; Linux torch wheels bring
their matching Triton). This script prints, for each device ComfyUI will run on, the node's own
decision and log line ("PISA runs on ..."): it calls the function the node calls
(`pisa_comfy.library.backend_choice`), so the two cannot disagree. It never fails the install:
every problem becomes a message and the exit status is always 0.

On Windows, Triton comes from the `triton-windows` package; the matching pip command is printed,
and it is installed only when the environment variable PISA_INSTALL_TRITON=1 is set.
Run it by hand any time: `python install.py` with ComfyUI's Python.
"""
import os
import platform
import re
import subprocess
import sys
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
TAG = "[ComfyUI-PISA]"


def version_tuple(text):
    """'2.9.1+cu128' -> (2, 9, 1); unparsable parts end the tuple."""
    parts = []
    for piece in re.split(r"[.+-]", str(text)):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def _installed_version(*dists):
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return None


def node_devices(torch):
    """The devices ComfyUI runs a model on here, so the ones the node meets: every CUDA (or ROCm)
    GPU, else Intel XPU, else Apple MPS, else the CPU."""
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return [torch.device("xpu")]
    if torch.backends.mps.is_available():
        return [torch.device("mps")]
    return [torch.device("cpu")]


def probe():
    """torch, Triton and, per device the node will meet, the node's own backend choice and its log
    sentence (``pisa_comfy.library.backend_choice`` with the node's default settings, imported from
    this folder; ComfyUI is not needed). Never raises."""
    info = {"os": platform.system(), "python": sys.executable, "torch": None, "torch_error": None,
            "pack_error": None, "hip": False, "devices": [], "min_cc": None,
            "triton": _installed_version("triton", "triton-windows"), "triton_error": None}
    try:
        import torch
    except Exception as e:  # missing, or a broken install: both mean PISA cannot load
        info["torch_error"] = f"{type(e).__name__}: {e}"
        return info
    info["torch"] = torch.__version__
    info["hip"] = bool(getattr(torch.version, "hip", None))
    sys.path.insert(0, HERE)
    try:
        from pisa_comfy import PisaSettings
        from pisa_comfy.library import backend_choice
        from pisa_kernels import backend
    except Exception as e:
        info["pack_error"] = f"{type(e).__name__}: {e}"
        return info
    finally:
        sys.path.remove(HERE)
    info["min_cc"] = backend.MIN_CAPABILITY
    info["triton_error"] = backend.triton_import_error()
    requested = PisaSettings().backend
    try:
        for device in node_devices(torch):
            label, cc = None, None
            if device.type == "cuda":
                cc = tuple(torch.cuda.get_device_capability(device))
                kind = "ROCm" if info["hip"] else f"sm{cc[0]}{cc[1]}"
                label = f"GPU {device.index} '{torch.cuda.get_device_name(device)}' ({kind})"
            chosen, sentence = backend_choice(requested, device)
            info["devices"].append((label, cc, chosen, sentence))
    except Exception as e:
        info["torch_error"] = f"device query failed: {type(e).__name__}: {e}"
    return info


def windows_triton_spec(info):
    """The triton-windows requirement that matches this torch: Triton 3.x pairs with torch 2.(x+4)."""
    torch_v = version_tuple(info["torch"] or "")
    if len(torch_v) >= 2 and torch_v[0] == 2 and torch_v[1] >= 6:
        return f"triton-windows<3.{torch_v[1] - 3}"
    return "triton-windows"


def needs_triton(info):
    """An NVIDIA GPU the Triton kernels support is present, and Triton is what is missing or broken."""
    return bool(info["triton_error"]) and not info["hip"] and any(
        cc is not None and cc >= tuple(info["min_cc"]) for _, cc, _, _ in info["devices"])


def plan(info):
    """Human-readable lines: what the node runs on each device (its own log sentence), and what to do
    to get the Triton kernels."""
    if info["torch"] is None:
        return [f"torch is not importable from {info['python']} ({info['torch_error']}).",
                "ComfyUI's torch is missing: install ComfyUI and its requirements into this Python "
                "first. PISA Patch cannot load without torch."]
    lines = [f"torch {info['torch']}, Triton {info['triton'] or 'not installed'}, OS {info['os']}."]
    if info["pack_error"]:
        return lines + [f"The pack does not import here ({info['pack_error']}): PISA Patch will not load. "
                        "Reinstall the pack, or report this error."]
    if info["torch_error"]:
        lines.append(info["torch_error"])
    lines += [f"{label}: {sentence}." if label else f"{sentence}." for label, _, _, sentence in info["devices"]]
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
