"""Fixtures of the kernel tests.

* This folder goes on ``sys.path`` for the helper modules ``naive_pisa`` (the float64 oracle) and
  ``pisa_test_utils`` (inputs, routing capture, tolerances).
* ``case_counter``: a session-wide counter of generated fuzz cases; the totals are printed in the
  terminal summary (also under ``-q`` and without ``-s``), so the report shows how many cases ran.
* Every kernel test runs with one intra-op CPU thread (restored afterwards): the tensors are tiny,
  and on a loaded 2-core CI machine the OpenMP threads' spin-waiting made the float64 oracle and the
  reference ~20x more expensive in CPU time.
* ``triton_device`` (tests/conftest.py, shared with the lab's tests).
"""

import collections
import os
import sys

import pytest

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

