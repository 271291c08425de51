"""Everything one PISA Patch node keeps between attention calls: its settings, the backend it
chose per device, and the reading of each call's outcome into run statistics and log lines."""

from __future__ import annotations

from .dispatch import dispatch
from .library import backend_choice
from .node_state import NodeState
from .override import make_override
from .run_stats import EXPECTED_REASONS, RUNTIME_REASONS
from .settings import PisaSettings


class PisaState(NodeState):
    node_name = "PISA Patch"

    def __init__(self, settings: PisaSettings, node_id: str | None = None):
        super().__init__(node_id, block_size=settings.block_size, dense_steps=settings.dense_steps)
        self.settings = settings
        self._backends: dict[str, str | None] = {}

    def make_override(self, previous):
        return make_override(self, previous, body=dispatch)

    def backend_for(self, device) -> str | None:
        """The backend PISA uses on ``device`` (None: dense), decided and logged once per device."""
        key = str(device)
        with self._lock:
            known = key in self._backends
        if not known:
            chosen, sentence = backend_choice(self.settings.backend, device)
            with self._lock:
                self._backends[key] = chosen
            self.log_once(f"backend:{key}", "%s", sentence)
        return self._backends[key]

    def backends(self) -> list[str]:
        # Called with the lock held (NodeState.finish_run).
        return sorted({b for b in self._backends.values() if b})

    def record(self, call, *, reason: str | None, **outcome) -> None:
        """Count the call; say once why calls run dense (normal reasons only when verbose; the
        run step already warned about its own failures)."""
        if reason is not None and reason not in RUNTIME_REASONS and (
                self.settings.verbose or reason not in EXPECTED_REASONS):
            self.log_once(f"dense:{reason}", "PISA: attention calls with %s run dense", reason,
                          warn=reason not in EXPECTED_REASONS)
        super().record(call, reason=reason, **outcome)
