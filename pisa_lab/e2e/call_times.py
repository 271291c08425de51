"""PISA's calls inside a real step, next to the benchmark of the same configured call (issue 13).

The node already times every attention call with CUDA events (``RunStats``).  During the timed
sparse pass, :class:`CallRecorder` reads those events for the calls that ran PISA, grouped by
shapes, strides, dtype and layout (within one model step the node builds the same keyword
arguments for all of them), and keeps the first call's keyword arguments as the node built them
(``dispatch.decide`` on the live call).
:func:`compare` then times each group's call alone, as ``pisa_lab.bench_node_calls`` does (the
same shapes and strides, fresh random values, ``triton.testing.do_bench`` median), so the in-step
time and the benchmark cannot drift apart unnoticed: a ratio above 1 is time the step loses
around the kernel (launch gaps, host work between calls, copies, cache state).
"""

from __future__ import annotations

import importlib
import statistics
from dataclasses import dataclass, field

import torch

from ..measure import timer_for

#: The bar of issue 13: a PISA call inside a real step within 5 % of its benchmark.
IN_STEP_BAR = 1.05


@dataclass
class RecordedCall:
    """One group of identical PISA calls of a pass."""

    shapes: tuple  # (q, k, v) sizes
    strides: tuple  # (q, k, v) strides, as ComfyUI handed the views over
    dtype: torch.dtype
    kwargs: dict  # pisa_attention's keyword arguments, as the node built them for the first call
    timings: list = field(default_factory=list)  # per call: (start, end) CUDA events, or seconds (CPU)

    def times_ms(self) -> list[float]:
        out = []
        for t in self.timings:
            if isinstance(t, tuple):
                t[1].synchronize()
                out.append(t[0].elapsed_time(t[1]))
            else:
                out.append(1000.0 * t)
        return out

    def describe(self) -> str:
        b, n1, n2, d = self.shapes[0]
        extras = [k for k in ("token_perm", "kv_valid", "sink_kv", "dense_q") if self.kwargs.get(k) is not None]
        return f"{self.kwargs['layout']} {b}x{n1}x{n2}x{d} {str(self.dtype).replace('torch.', '')}" + (
            f" + {', '.join(extras)}" if extras else "")


def _signature(q, k, v, kwargs_layout: str) -> tuple:
    return (tuple(q.shape), q.stride(), k.stride(), v.stride(), q.dtype, kwargs_layout)


class CallRecorder:
    """Between :meth:`start` and :meth:`stop` (the timed evaluations of a pass, not its warm-up),
    wraps the node state's ``record`` on the instance to keep the CUDA events of the calls that
    ran PISA, per distinct call.  It uses the loaded pack's own modules (``dispatch`` for the
    keyword arguments, its ``pisa_attention`` for the benchmark), so plans and caches are shared."""

    def __init__(self, state):
        self.state = state
        glue = type(state).__module__.rpartition(".")[0]  # the loaded pack's pisa_comfy
        self._dispatch = importlib.import_module(f"{glue}.dispatch")
        self.pisa_attention = importlib.import_module(f"{glue.rpartition('.')[0]}.pisa_kernels").pisa_attention
        self.calls: dict[tuple, RecordedCall] = {}

    def start(self) -> None:
        wrapped = type(self.state).record.__get__(self.state)

        def record(call, *, reason, timing, **outcome):
            wrapped(call, reason=reason, timing=timing, **outcome)
            if reason is None:  # a call that ran PISA
                self._keep(call, timing)

        self.state.record = record

    def stop(self) -> None:
        self.state.__dict__.pop("record", None)  # the class's method again

    def _keep(self, call, timing) -> None:
        q, k, v = call.kernel_inputs()
        key = _signature(q, k, v, call.layout)
        rec = self.calls.get(key)
        if rec is None:
            decision = self._dispatch.decide(self.state, call)  # what the node passed to this call
            if isinstance(decision, str):
                return
            rec = self.calls[key] = RecordedCall(tuple(tuple(t.shape) for t in (q, k, v)),
                                                 tuple(t.stride() for t in (q, k, v)), q.dtype,
                                                 dict(decision.kwargs))
        rec.timings.append(timing)


def _like(shape, stride, dtype, device, gen) -> torch.Tensor:
    t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    t.copy_(torch.randn(shape, generator=gen, device=device, dtype=dtype))
    return t


def compare(recorder: CallRecorder, device: torch.device) -> list[dict]:
    """Per recorded group: calls, mean and median in-step ms (CUDA events; the wall clock on the
    CPU), the benchmark's ms of the same configured call, and their ratio."""
    time_ms = timer_for(device)
    out = []
    gen = torch.Generator(device=device).manual_seed(0)
    for rec in recorder.calls.values():
        times = rec.times_ms()
        bench = _bench(recorder.pisa_attention, rec, device, gen, time_ms)
        mean = statistics.fmean(times)
        out.append({"call": rec.describe(), "calls": len(times), "in_step_ms": round(mean, 3),
                    "in_step_median_ms": round(statistics.median(times), 3), "bench_ms": round(bench, 3),
                    "ratio": round(mean / bench, 4), "within_bar": mean / bench <= IN_STEP_BAR})
    return out


def _bench(pisa_attention, rec: RecordedCall, device, gen, time_ms) -> float:
    """The recorded configuration alone, on fresh inputs of the same shapes and strides."""
    q, k, v = (_like(s, st, rec.dtype, device, gen) for s, st in zip(rec.shapes, rec.strides))
    return time_ms(lambda: pisa_attention(q, k, v, **rec.kwargs))
