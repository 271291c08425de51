"""What the tests need besides the pack itself, and the one rule for when it is missing.

A test whose prerequisite is absent (a ComfyUI checkout, Chromium, Triton, ComfyUI's Python
requirements) calls :func:`missing`: on a developer's machine that skips the test with the reason;
under ``CI=true`` it fails the test with the same reason.  A skip is how a fresh CI machine once
passed while running none of the ComfyUI tests (issue 18), so CI may never skip for a missing
prerequisite.  Skips that are not about a missing prerequisite (no CUDA GPU for ``gpu`` tests, a
case a parameter rules out) stay plain ``pytest.skip``.

The ComfyUI checkouts the node and packaging tests use: ``$COMFYUI_PATH`` (default
``~/comfy/ComfyUI``, ComfyUI v0.19.3) and the space-separated ``$PISA_EXTRA_COMFYUI`` (default
``~/comfy/ComfyUI-v0.3.64``; empty: none).  ``scripts/test.sh`` puts the pinned releases there
when they are absent; ``.ci/run`` points both into the clone's ``.comfy-ci/``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import NoReturn

import pytest


def strict() -> bool:
    """Whether missing prerequisites fail (CI) instead of skipping."""
    return os.environ.get("CI") == "true"


def missing(reason: str) -> NoReturn:
    """Skip the calling test (or module) for ``reason``, or fail it under ``CI=true``."""
    if strict():
        pytest.fail(f"test prerequisite missing (CI=true makes this a failure, not a skip): {reason}",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_missing(name: str, why: str):
    """``importlib.import_module(name)``, or :func:`missing` with ``why`` and the import error."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{why}: cannot import {name} ({exc})")


def comfy_paths() -> list[Path]:
    """The configured ComfyUI checkouts, main first, whether they exist or not (tests are
    parametrized over these, so a missing checkout shows up as a test that says so)."""
    main = os.environ.get("COMFYUI_PATH") or str(Path.home() / "comfy" / "ComfyUI")
    extra = os.environ.get("PISA_EXTRA_COMFYUI", str(Path.home() / "comfy" / "ComfyUI-v0.3.64"))
    return [Path(p).expanduser() for p in [main, *extra.split()]]


def comfy_missing(root: Path) -> str | None:
    """Why ``root`` is not a usable ComfyUI checkout (None: it is one)."""
    if (root / "main.py").is_file() and (root / "comfy" / "model_patcher.py").is_file():
        return None
    return (f"no ComfyUI checkout at {root} (bash scripts/test.sh puts the pinned releases in ~/comfy; "
            f"or set COMFYUI_PATH / PISA_EXTRA_COMFYUI)")


def require_comfy(root: Path) -> Path:
    """``root`` if it is a ComfyUI checkout, else :func:`missing`."""
    reason = comfy_missing(root)
    if reason:
        missing(reason)
    return root
