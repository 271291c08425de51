"""Which sampling step a model evaluation belongs to.

``transformer_options["sample_sigmas"]`` is the schedule of the running sampler node (already
sliced by KSamplerAdvanced's start/end steps) and ``transformer_options["sigmas"]`` the sigma of
the current evaluation.  The step is the first schedule entry equal to the sigma; evaluations of
multi-stage samplers (heun, dpmpp_2s, ...) fall strictly between two entries and belong to the
earlier one.  Matching exactly first matters: a bracket test alone returns the previous step on
exact hits.

A split schedule (KSamplerAdvanced A runs steps 0-9 and returns with leftover noise, B runs 10-19
on the same model) shows up as two sampling runs whose schedules join: B starts at the sigma where
A stopped.  :class:`ScheduleTracker` continues the step count across such a join, so "the first N
steps are dense" means the first N steps of the whole schedule.  A run that starts anywhere else
(a new prompt, another denoise) starts counting at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


def step_in_schedule(sigma: float, schedule: list[float]) -> int | None:
    """Index of the step of ``sigma`` in ``schedule`` (exact match first, then bracket), or None."""
    for i, s in enumerate(schedule):
        if _close(s, sigma):
            return i
    for i in range(len(schedule) - 1):
        if (schedule[i] - sigma) * (schedule[i + 1] - sigma) < 0:
            return i
    return None


def current_sigma(transformer_options: dict) -> float | None:
    """The sigma of this evaluation (one host sync); the largest if the batch mixes several."""
    sigmas = transformer_options.get("sigmas")
    if sigmas is None:
        return None
    try:
        return float(sigmas.detach().max()) if hasattr(sigmas, "detach") else float(max(sigmas))
    except (TypeError, ValueError, RuntimeError):
        return None


def schedule_of(transformer_options: dict) -> list[float] | None:
    ss = transformer_options.get("sample_sigmas")
    if ss is None:
        return None
    return [float(s) for s in (ss.detach().flatten().cpu().tolist() if hasattr(ss, "detach") else ss)]


@dataclass
class _Join:
    end_sigma: float  # the sigma the previous run stopped at
    next_step: int  # the global index of the step that starts there


class ScheduleTracker:
    """Global step offsets across sampling runs of one patched model (see the module docstring).

    Not thread-safe by itself; the owner serialises calls.
    """

    def __init__(self):
        self._join: _Join | None = None

    def offset_for(self, schedule: list[float] | None) -> int:
        """Global index of ``schedule[0]``: continues the previous run if this one starts where it stopped."""
        join = self._join
        if schedule and join is not None and join.end_sigma > 0 and _close(schedule[0], join.end_sigma):
            return join.next_step
        return 0

    def finished(self, schedule: list[float] | None, offset: int) -> None:
        """Remember where a run stopped (runs without a schedule break any join)."""
        self._join = _Join(schedule[-1], offset + len(schedule) - 1) if schedule else None
