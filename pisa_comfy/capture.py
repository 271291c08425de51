"""PISA Capture: record the q/k/v of chosen blocks and steps of a real sampling run.

Generated workloads only approximate real attention; a capture lets ``python -m
pisa_lab.eval --capture <files>`` measure PISA on the activations of the user's own model.
The node installs an attention override the way PISA Patch does (:func:`pisa_comfy.patching.install`,
same forward wrapper for step and layout, same chain rules) but never changes an output: each
call of the model's main self-attention whose block and step were chosen is copied to the host
and written to ``<output>/pisa_captures/`` (:mod:`pisa_kernels.capture_format`, one call per file)
before the call goes on to the override below (PISA's, if PISA Patch came first, else ComfyUI's).

Place it *after* PISA Patch (closest to the sampler): an override only sees the calls the one
above hands down, and PISA hands its dense path only the calls it keeps dense.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass

from .attention_call import AttentionCall
from .dispatch import forward_context
from .library import Capture, write_capture
from .node_state import NodeState
from .override import make_override
from .patching import install
from .settings import PisaSettings, parse_dense_blocks
from .steps import current_sigma

log = logging.getLogger("pisa")

#: Hook key of the capture's wrapper and callbacks (PISA Patch uses "pisa").
CAPTURE_HOOK_KEY = "pisa_capture"
#: Sub-folder of ComfyUI's output folder that holds the capture files.
CAPTURE_FOLDER = "pisa_captures"


@dataclass(frozen=True)
class CaptureSettings:
    """What one PISA Capture node asked for."""

    folder: str  # where files go (``<output>/pisa_captures``)
    prefix: str = "pisa_capture"
    blocks: frozenset[int] = frozenset()  # empty: every block
    steps: frozenset[int] = frozenset()  # empty: every step
    max_calls: int = 6  # files per sampling run

    @classmethod
    def from_widgets(cls, *, output_dir: str, filename_prefix, blocks, steps, max_calls) -> CaptureSettings:
        if not isinstance(filename_prefix, str) or not filename_prefix.strip():
            raise ValueError("filename_prefix must be a non-empty name, e.g. 'wan_480p'")
        folder = os.path.abspath(os.path.join(output_dir, CAPTURE_FOLDER))
        prefix_path = os.path.abspath(os.path.join(folder, filename_prefix.strip()))
        if not prefix_path.startswith(folder + os.sep):
            raise ValueError(f"filename_prefix {filename_prefix!r} leaves the {CAPTURE_FOLDER} folder")
        if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1:
            raise ValueError(f"max_calls must be a whole number >= 1, got {max_calls!r}")
        return cls(folder=os.path.dirname(prefix_path), prefix=os.path.basename(prefix_path),
                   blocks=parse_dense_blocks(blocks, "blocks"), steps=parse_dense_blocks(steps, "steps"),
                   max_calls=max_calls)


def capture_dispatch(state: CaptureState, func, previous, args: tuple, kwargs: dict):
    """The body of the capture override: record the call if it was chosen, then pass it on unchanged."""
    call = AttentionCall.parse(args, kwargs)
    state.observe(call)
    return call.dense(func, previous)


class CaptureState(NodeState):
    """A node state whose override records calls instead of running PISA.

    It shares PISA Patch's step tracking, forward wrapper (under its own forward key, so its block
    count is its own) and re-installation; the token order it records is the node's default
    (tiles of ``PisaSettings.block_size`` tokens).
    """

    node_name = "PISA Capture"
    forward_key = "pisa_capture_forward"

    def __init__(self, capture: CaptureSettings, node_id: str | None = None):
        super().__init__(node_id, block_size=PisaSettings.block_size, dense_steps=0)
        self.capture = capture
        self.written: list[str] = []  # files of the current run
        self._serial: int | None = None
        self._file_lock = threading.Lock()

    def make_override(self, previous):
        return make_override(self, previous, body=capture_dispatch)

    def observe(self, call: AttentionCall) -> None:
        q, k, v = call.q, call.k, call.v
        if not (q.shape == k.shape == v.shape):
            return  # cross-attention (text keys): not what PISA approximates
        to = call.transformer_options
        ctx = forward_context(self, to)
        geometry = ctx.geometry(call, self.text_side)
        if isinstance(geometry, str):
            return  # not the main sequence, or a mask other than key padding
        block = ctx.block_index(to)  # once per main call: it counts on cores without block_index
        chosen = self._chosen("block", block, self.capture.blocks) and self._chosen("step", ctx.step, self.capture.steps)
        if not chosen:
            return
        with self._file_lock:
            if len(self.written) >= self.capture.max_calls:
                return
            path = self._next_path(block, ctx.step)
            self.written.append(path)
        write_capture(path, self._record(call, geometry, block, ctx.step))
        if len(self.written) == 1:
            log.info("PISA Capture: writing q/k/v to %s (up to %d calls this run)", self.capture.folder,
                     self.capture.max_calls)

    def _chosen(self, what: str, index: int | None, wanted: frozenset[int]) -> bool:
        if not wanted:
            return True
        if index is None:
            self.log_once(f"capture no {what}", "PISA Capture cannot tell the %s of attention calls here; "
                          "it records nothing while %ss are chosen (leave the widget empty to record all)",
                          what, what, warn=True)
            return False
        return index in wanted

    def _next_path(self, block: int | None, step: int | None) -> str:
        """``<prefix>_<serial>_block<b>_step<s>.safetensors``; the serial continues after existing files."""
        c = self.capture
        if self._serial is None:
            os.makedirs(c.folder, exist_ok=True)
            pattern = re.compile(re.escape(c.prefix) + r"_(\d+)_")
            found = [int(m.group(1)) for m in map(pattern.match, os.listdir(c.folder)) if m]
            self._serial = max(found, default=0)
        self._serial += 1
        name = f"{c.prefix}_{self._serial:05d}_block{'-' if block is None else block}_step{'-' if step is None else step}"
        return os.path.join(c.folder, name + ".safetensors")

    def _record(self, call: AttentionCall, geometry, block: int | None, step: int | None) -> Capture:
        h, n, d = call.h, call.n, call.d
        q, k, v = (t if call.layout == "BNHD" else t.transpose(1, 2) for t in call.kernel_inputs())
        layout, placement = geometry.layout, geometry.placement
        grids = [[first, list(grid)] for first, grid in placement.grids] if placement is not None else []
        exact = [list(r) for r in placement.exact] if placement is not None else []
        side = None if not exact else "unknown" if not grids else "start" if grids[0][0] > 0 else "end"
        perm = self.token_order(n, placement.grids, "cpu") if grids else None
        sigma = current_sigma(call.transformer_options)
        meta = dict(family=layout.family if layout is not None else None, grids=grids, exact=exact,
                    text_tokens=n - layout.image_tokens if layout is not None else 0, text_side=side,
                    block=block, step=step, sigma=sigma, heads=h, head_dim=d, scale=call.extra.get("scale"),
                    source_layout=call.layout, dtype=str(q.dtype).replace("torch.", ""))
        return Capture(q=q, k=k, v=v, meta=meta, token_perm=perm, kv_valid=geometry.kv_valid)

    def finish_run(self):
        with self._file_lock:
            written, self.written = self.written, []
        if written:
            log.info("PISA Capture wrote %d file(s) to %s; evaluate them with: python -m pisa_lab.eval "
                     "--capture %s", len(written), self.capture.folder, self.capture.folder)
        return super().finish_run()


def capture_model(model, capture: CaptureSettings, node_id: str | None = None):
    """A clone of ``model`` that records the chosen attention calls (returns the clone)."""
    return install(model, CaptureState(capture, node_id), CAPTURE_HOOK_KEY)
