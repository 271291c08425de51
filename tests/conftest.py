"""Suite-wide pytest setup, kept minimal (every test folder shares it).

* The repository root goes on ``sys.path`` so tests ``import pisa_kernels`` / ``pisa_comfy`` as
  top-level packages, and this folder for the shared helper ``prerequisites`` (skip, or fail under
  ``CI=true``, when a prerequisite is missing).
* The repository root is collected as a plain directory, never as a package (see
  :class:`RootIsADirectory`), so the suite runs whatever the checkout's folder is called.
* Without CUDA, ``TRITON_INTERPRET=1`` is set here, before anything imports Triton (Triton reads
  it when a kernel is decorated), so the Triton kernels run on CPU tensors in the interpreter.
  An explicit ``TRITON_INTERPRET`` in the environment is left alone.
* Tests marked ``gpu`` are skipped, with the reason, where CUDA is not available.
* ``triton_device``: where the Triton kernels run in this session: ``"cuda"`` with a GPU, else
  ``"cpu"`` under the interpreter; where Triton cannot run at all, the tests that need it are
  skipped with the reason (fail under ``CI=true``).
"""

import os
import sys
from pathlib import Path

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from prerequisites import missing, strict


class RootIsADirectory:
    """Collects the repository root as a ``pytest.Dir`` instead of a ``pytest.Package``.

    The root is a ComfyUI node folder: its ``__init__.py`` does ``from .nodes import ...``, which
    only works when ComfyUI imports the folder as a package.  pytest turns every directory with an
    ``__init__.py`` into a Package and imports that file before the first test below it; the module
    name it can give the file depends on the folder's name (``ComfyUI_PISA`` imports as a package,
    ``ComfyUI-PISA`` is no valid name and becomes a lone module whose relative import fails), so in
    the folder the README tells users to create every test errored at setup (issue 18).  The suite
    never needs that import: tests that load the pack do it as ComfyUI does (tests/comfy/conftest.py).

    A hook in a conftest cannot do this: pytest asks the hooks that apply to the root's *parent*
    folder how to collect the root, which excludes every conftest inside it; so this conftest
    registers the hook as a plugin (tests/packaging/test_folder_names.py checks several names).
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path.resolve() == _ROOT_RESOLVED:
            return pytest.Dir.from_parent(parent, path=path)
        return None


_ROOT_RESOLVED = Path(ROOT).resolve()


def pytest_configure(config):
    config.pluginmanager.register(RootIsADirectory(), "pisa-root-is-a-directory")


def pytest_report_header(config):
    return "missing test prerequisites: " + ("fail (CI=true)" if strict() else "skip with the reason (CI is not true)")


def _cuda_available() -> bool:
    try:
        import torch  # importing torch does not import triton

        return bool(torch.cuda.is_available())
    except Exception:
        return False


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def triton_device():
    import torch

    from pisa_kernels.backend import triton_unavailable_reason

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    reason = triton_unavailable_reason(dev)
    if reason is not None:
        missing(f"Triton kernels cannot run here: {reason}")
    return dev
