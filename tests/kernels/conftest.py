"""Fixtures of the kernel tests.

* This folder goes on ``sys.path`` for the helper modules ``naive_pisa`` (the float64 oracle) and
  ``pisa_test_utils`` (inputs, routing capture, tolerances).
* ``case_counter``: a session-wide counter of generated fuzz cases; the totals are printed in the
  terminal summary (also under ``-q`` and without ``-s``), so the report shows how many cases ran.
* Every kernel test runs with one intra-op CPU thread (restored afterwards): the tensors are tiny,
  and on a loaded 2-core CI machine the OpenMP threads' spin-waiting made the float64 oracle and the
  reference ~20x more expensive in CPU time.
* ``triton_device``: where the Triton kernels run in this session: ``"cuda"`` with a GPU, else
  ``"cpu"`` under the interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py); where Triton
  cannot run at all, the tests that need it are skipped with the reason (fail under ``CI=true``).
"""

import collections
import os
import sys

import pytest
from prerequisites import missing

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

_COUNTS: collections.Counter = collections.Counter()


@pytest.fixture(scope="session")
def case_counter() -> collections.Counter:
    return _COUNTS


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _COUNTS:
        return
    terminalreporter.section("pisa kernel fuzz cases")
    for name, n in sorted(_COUNTS.items()):
        terminalreporter.write_line(f"{name}: {n} generated cases")
    terminalreporter.write_line(f"total: {sum(_COUNTS.values())} cases")


def triton_device_or_reason():
    import torch

    from pisa_kernels.backend import triton_unavailable_reason

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return dev, triton_unavailable_reason(dev)


@pytest.fixture(scope="session")
def triton_device():
    dev, reason = triton_device_or_reason()
    if reason is not None:
        missing(f"Triton kernels cannot run here: {reason}")
    return dev
