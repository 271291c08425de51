"""What happened during one sampling run: attention calls, how many ran PISA, why the others ran
dense, the effective density, the time spent in attention and, with adaptive routing, how the
exact blocks were spread over query tiles.

Effective density weighs every call by its attention work (``B * H * Nq * Nk``): 1.0 means all
attention was computed exactly, 0.2 means a fifth of it was.  Time on CUDA is measured with events
(read once at the end of the run, so no call waits for the GPU); elsewhere with the wall clock.
The per-tile spread is summed on the calls' device in the same way (:class:`TileSpread`).
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import torch

# Why a call ran dense, in the words the run summary counts.  These are part of normal operation
# (logged once only when the node is verbose); any other reason is worth a warning.
DENSE_STEP = "dense step"
DENSE_BLOCK = "dense block"
SHORT = "short sequence"
CROSS = "cross-attention"
NOT_MAIN = "not the main sequence"
EXPECTED_REASONS = frozenset({DENSE_STEP, DENSE_BLOCK, SHORT, CROSS, NOT_MAIN})
# Why a call that was to run PISA ran dense after all (each explained by its own warning).
OUT_OF_MEMORY = "out of memory"
DOES_NOT_FIT = "kernel does not fit"
RUNTIME_REASONS = frozenset({OUT_OF_MEMORY, DOES_NOT_FIT})


class TileSpread:
    """The per-tile density (exact blocks / blocks) of a run's adaptive-routing calls: mean, spread
    and range over every query tile of every such call (issue 17: the budget goes where attention
    needs it, the mean stays the widget's).  Kept on the calls' device as ``[mean, M2, min, max]``
    (M2: the sum of squared deviations, merged call by call with Chan et al.'s pairwise rule, so a
    narrow spread keeps its digits in float32): a few tiny launches per call, no synchronisation;
    :meth:`read` waits for them once, at the run's end."""

    def __init__(self):
        #: (``[mean, M2, min, max]`` float32 tensor, tiles), replaced as one object (a late call's
        #: add never pairs new sums with an old count)
        self._state: tuple[torch.Tensor, int] | None = None

    def add(self, tile_counts: torch.Tensor, blocks: int) -> None:
        # float32: every device has it (MPS has no float64)
        d = tile_counts.flatten().float() / blocks
        n = d.numel()
        if n == 0:
            return
        mean = d.mean()
        part = torch.stack((mean, (d - mean).square().sum(), d.min(), d.max()))
        if self._state is not None:
            acc, seen = self._state
            acc = acc.to(part.device)
            total = seen + n
            delta = part[0] - acc[0]
            part = torch.stack((acc[0] + delta * (n / total), acc[1] + part[1] + delta.square() * (seen * n / total),
                                torch.minimum(acc[2], part[2]), torch.maximum(acc[3], part[3])))
            n = total
        self._state = (part, n)

    def read(self) -> dict | None:
        """``{mean, std, min, max}`` over the tiles, or None when no adaptive call recorded any."""
        if self._state is None:
            return None
        acc, tiles = self._state
        mean, m2, low, high = acc.tolist()
        return {"mean": round(mean, 4), "std": round(max(0.0, m2 / tiles) ** 0.5, 4), "min": round(low, 4),
                "max": round(high, 4)}


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s stream (then the spread's small
    launches would be captured too, and replays would not count)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class RunStats:
    """Counters of one sampling run.  Not thread-safe by itself; the owner serialises updates."""

    def __init__(self, step_offset: int, schedule: list[float] | None):
        self.step_offset = step_offset
        self.schedule = schedule
        self.calls = 0
        self.pisa_calls = 0
        self.dense_by_reason: Counter[str] = Counter()
        self._work = 0.0
        self._exact_work = 0.0
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.tile_spread = TileSpread()

    def record(self, *, work: float, density: float, reason: str | None, timing,
               tile_counts: torch.Tensor | None = None, blocks: int = 0) -> None:
        """One call: ``reason`` None for PISA, else why it ran dense (density 1); ``tile_counts``:
        an adaptive call's exact blocks per query tile (``PisaStats.tile_counts``, of ``blocks``)."""
        if tile_counts is not None and blocks > 0 and not _capturing(tile_counts.device):
            self.tile_spread.add(tile_counts, blocks)
        self.calls += 1
        if reason is None:
            self.pisa_calls += 1
        else:
            self.dense_by_reason[reason] += 1
        self._work += work
        self._exact_work += work * density
        if isinstance(timing, tuple):
            self._events.append(timing)
        else:
            self._seconds += timing

    @property
    def dense_calls(self) -> int:
        return sum(self.dense_by_reason.values())

    @property
    def density(self) -> float:
        return self._exact_work / self._work if self._work else 1.0

    def attention_ms(self) -> float:
        """Total attention time; waits for the run's last recorded CUDA events (at run end only)."""
        gpu_ms = 0.0
        for start, end in self._events:
            end.synchronize()
            gpu_ms += start.elapsed_time(end)
        return 1000.0 * self._seconds + gpu_ms

    def summary(self, backend: str | None) -> dict:
        """The ``pisa.stats`` payload (without the node id) and its one-line text."""
        ms = self.attention_ms()
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.dense_by_reason.most_common())
        text = (f"PISA: {self.pisa_calls}/{self.calls} attention calls sparse"
                f"{f' (dense: {reasons})' if reasons else ''}, effective density {self.density:.3f}, "
                f"attention {ms / 1000.0:.2f} s{f' on {backend}' if backend else ''}")
        payload = {"text": text, "calls": self.calls, "pisa_calls": self.pisa_calls,
                   "dense_calls": self.dense_calls, "density": round(self.density, 4), "attn_ms": round(ms, 1)}
        spread = self.tile_spread.read()
        if spread is not None:
            payload["tile_density"] = spread
            payload["text"] += (f"; adaptive routing: per-tile density {spread['mean']:.3f} ± {spread['std']:.3f} "
                                f"({spread['min']:.3f}–{spread['max']:.3f})")
        return payload


def start_timer(device: torch.device):
    """A token for :func:`stop_timer`: CUDA events on CUDA, the wall clock elsewhere."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(device))
        return device, start
    return time.perf_counter()


def stop_timer(token):
    """``(start, end)`` events or elapsed seconds, for :meth:`RunStats.record`."""
    if isinstance(token, float):
        return time.perf_counter() - token
    device, start = token
    end = torch.cuda.Event(enable_timing=True)
    end.record(torch.cuda.current_stream(device))
    return start, end


def send_to_ui(payload: dict) -> bool:
    """Send ``pisa.stats`` to the front-end when running inside ComfyUI's server (not in tests or
    scripts, where no server module or instance exists)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    instance.send_sync("pisa.stats", payload)
    return True
