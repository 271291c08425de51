"""What every node of this pack that installs an attention override keeps between calls, and its
ComfyUI hooks: the base of PISA Patch's state (:mod:`pisa_comfy.patch_state`) and PISA Capture's.

One :class:`NodeState` belongs to one patched model.  It is shared by reference by every clone of
that model and by every per-call ``transformer_options`` ComfyUI builds from it, and the calls may
come from several threads (late-2026 cores batch conds on several GPUs in a thread pool), so all
mutable state is guarded by one lock.  Work that waits for the device (reading sigmas, masks,
CUDA timings) is done outside the lock and at most once per forward or per run.

Hooks (registered with a key on the patched clone by :mod:`pisa_comfy.patching`):

* ``DIFFUSION_MODEL`` wrapper: per forward, re-asserts the override on the live per-call options
  (v0.3.64 / v0.19.3 have no other place that reaches them) and computes the forward's step and
  token layout.
* ``ON_PREPARE_STATE``: late-2026 cores pass ``model_options`` as a third argument; re-assert there.
* ``ON_CLEANUP``: the run is over: log and publish its stats, forget per-run caches.
"""

from __future__ import annotations

import functools
import logging
import threading

from . import token_layout
from .forward_context import FORWARD_KEY, ForwardContext
from .library import lookup, remember, tile_permutation
from .override import OVERRIDE_KEY, chain_contains, compiler_disabled, describe_override
from .run_stats import RunStats, send_to_ui
from .steps import ScheduleTracker, current_sigma, schedule_of, step_in_schedule

log = logging.getLogger("pisa")


#: Token orders kept per state (one per sequence shape and device; a workflow uses a handful; the
#: least recently used goes first: a new order is a new plan and graph in the library).
_ORDER_CACHE_SIZE = 32


class NodeState:
    """Subclasses set :attr:`node_name` and :attr:`forward_key` and implement :meth:`make_override`
    (their own per-call body) and :meth:`backends` (what the run summary names)."""

    #: The node's display name, for log lines.
    node_name = "PISA node"
    #: Key of this node kind's :class:`ForwardContext` in the per-forward options (each node kind
    #: counts its own calls, so two kinds on one model never advance each other's block count).
    forward_key = FORWARD_KEY

    def __init__(self, node_id: str | None, *, block_size: int, dense_steps: int):
        self.node_id = node_id
        self.block_size = block_size  # of the tiled token order
        self.dense_steps = dense_steps  # only to say once when steps cannot be told apart
        self.last_summary: dict | None = None  # the pisa.stats payload of the last finished run
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        self._run: RunStats | None = None
        self._schedule = ScheduleTracker()
        self._reinstalled: dict[int, tuple] = {}  # id(override found on top) -> (it, our closure over it)
        self._orders: dict[tuple, object] = {}
        self._text_side: str | None = None

    # ---- logging -------------------------------------------------------------------------------

    def log_once(self, key: str, message: str, *args, warn: bool = False) -> None:
        """One log line per key for the lifetime of the node (never one per call)."""
        with self._lock:
            if key in self._logged:
                return
            self._logged.add(key)
        log.log(logging.WARNING if warn else logging.INFO, message, *args)

    # ---- per call ------------------------------------------------------------------------------

    def text_side(self, evidence: str | None) -> str | None:
        """The side of the text (extra) tokens: this call's evidence, else what an earlier call of
        this model showed (a model never changes its token order)."""
        with self._lock:
            if evidence is not None:
                self._text_side = evidence
            return self._text_side

    def token_order(self, n: int, grids, device):
        key = (n, grids, self.block_size, str(device))
        with self._lock:
            order = lookup(self._orders, key)
        if order is None:
            order = token_layout.tiled_order(n, grids, self.block_size, tile_permutation).to(device)
            with self._lock:
                remember(self._orders, key, order, _ORDER_CACHE_SIZE)
        return order

    def context_without_wrapper(self, transformer_options: dict) -> ForwardContext:
        """For attention reached without the model's forward wrapper (models that call attention
        outside ``DIFFUSION_MODEL``): step from the options, no layout, no block counting."""
        return ForwardContext(layout=None, step=functools.partial(self._step, transformer_options), double_blocks=0,
                              whole_forward=False)

    def record(self, call, **outcome) -> None:
        """One call's outcome (:meth:`RunStats.record`) into the current run."""
        run = self._run or self._current_run(call.transformer_options)
        with self._lock:
            run.record(work=call.work, **outcome)

    # ---- runs ----------------------------------------------------------------------------------

    def _current_run(self, transformer_options: dict) -> RunStats:
        with self._lock:
            if self._run is not None:
                return self._run
        schedule = schedule_of(transformer_options)  # reads the device once per run, outside the lock
        with self._lock:
            if self._run is None:
                self._run = RunStats(self._schedule.offset_for(schedule), schedule)
            return self._run

    def _step(self, transformer_options: dict) -> int | None:
        run = self._current_run(transformer_options)
        sigma = current_sigma(transformer_options)
        if sigma is None or not run.schedule:
            if self.dense_steps:
                self.log_once("no step", "PISA cannot tell the sampling step (no sigmas in transformer_options); "
                              "dense_steps is ignored")
            return None
        local = step_in_schedule(sigma, run.schedule)
        return None if local is None else run.step_offset + local

    def finish_run(self) -> dict | None:
        """End the current run: remember where its schedule stopped, log and publish its stats."""
        with self._lock:
            run, self._run = self._run, None
            self._reinstalled.clear()
            if run is not None:
                self._schedule.finished(run.schedule, run.step_offset)
            backends = self.backends()
        if run is None or run.calls == 0:
            return None
        payload = run.summary(", ".join(backends) or None)
        payload["node"] = "" if self.node_id is None else str(self.node_id)
        self.last_summary = payload
        log.info("%s", payload["text"])
        send_to_ui(payload)
        return payload

    # ---- installation --------------------------------------------------------------------------

    def make_override(self, previous):
        """This node's attention override over ``previous`` (the dense path)."""
        raise NotImplementedError

    def backends(self) -> list[str]:
        """The PISA backends this node ran on (named in the run summary)."""
        return []

    def ensure_installed(self, transformer_options: dict) -> None:
        """Put this node's override back on top if a later writer replaced it (idempotent: checks
        the whole chain, and wraps a given replacement at most once per run)."""
        top = transformer_options.get(OVERRIDE_KEY)
        if chain_contains(top, self):
            return
        with self._lock:
            cached = self._reinstalled.get(id(top))
            if cached is None or cached[0] is not top:
                cached = (top, self.make_override(top))
                self._reinstalled[id(top)] = cached
        transformer_options[OVERRIDE_KEY] = cached[1]
        self.log_once(f"reinstalled:{describe_override(top)}",
                      "PISA: %s replaced the PISA override after the PISA Patch node; PISA re-installed "
                      "itself on top and uses it as its dense path", describe_override(top))

    # ---- ComfyUI hooks -------------------------------------------------------------------------

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        """``WrappersMP.DIFFUSION_MODEL``: ``transformer_options`` is the last positional argument
        of Wan, FLUX and HunyuanVideo forwards (keyword for others)."""
        to = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("transformer_options")
        if not isinstance(to, dict):
            return executor(*args, **kwargs)
        outer = self._enter_forward(to, executor, args, kwargs)
        try:
            return executor(*args, **kwargs)
        finally:
            if outer is None:
                to.pop(self.forward_key, None)
            else:
                to[self.forward_key] = outer

    @compiler_disabled
    def _enter_forward(self, to: dict, executor, args, kwargs):
        """The per-forward bookkeeping (re-install; the layout and the step are read when a call
        first needs them, see :class:`ForwardContext`): one opaque call under ``torch.compile``, so
        the compiled model breaks once here per forward, not at every lock and import inside.
        Returns the context it replaced."""
        self.ensure_installed(to)
        model = executor.class_obj
        outer = to.get(self.forward_key)
        to[self.forward_key] = ForwardContext(
            layout=functools.partial(self._layout, model, executor.original, args, kwargs),
            step=functools.partial(self._step, to),
            double_blocks=len(getattr(model, "double_blocks", None) or ()), whole_forward=True)
        return outer

    def _layout(self, model, forward, args, kwargs):
        try:
            return token_layout.layout_for_forward(model, forward, args, kwargs)
        except Exception as exc:  # a model variant this pack does not know: raster order is still right
            self.log_once(f"layout:{type(model).__name__}",
                          "PISA could not read the token layout of %s (%s: %s); it runs in raster order",
                          type(model).__name__, type(exc).__name__, exc, warn=True)
            return None

    def on_prepare_state(self, patcher, timestep, *rest):
        """``CallbacksMP.ON_PREPARE_STATE``: ``(patcher, timestep)`` up to v0.19.3,
        ``(patcher, timestep, model_options)`` on late-2026 cores."""
        if rest and isinstance(rest[0], dict):
            self.ensure_installed(rest[0].setdefault("transformer_options", {}))

    def on_cleanup(self, patcher):
        """``CallbacksMP.ON_CLEANUP``: called in the ``finally`` of every sampling run."""
        self.finish_run()
