"""Facts about one model forward, shared by all attention calls of that forward.

The ``DIFFUSION_MODEL`` wrapper computes them once per forward (the step, the token layout) and
stores the context in that forward's own ``transformer_options`` (ComfyUI builds a fresh dict for
every model call, so concurrent forwards never share one).  Attention calls then only read it
(:meth:`ForwardContext.geometry`: where a call's tokens sit), apart from two per-forward caches: the count of main-sequence calls, which is the block index on
cores that do not publish ``block_index`` (v0.3.64), and the reading of each mask tensor (reading
a mask's values waits for the device, so it happens once per mask, not once per block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .masks import key_padding_valid
from .run_stats import NOT_MAIN
from .token_layout import Placement, TokenLayout, place, side_from_img_slice, side_from_padding

#: Key of the context in the per-forward ``transformer_options``.
FORWARD_KEY = "pisa_forward"


@dataclass
class Geometry:
    """Where a main-sequence call's tokens sit, and which keys are padding."""

    layout: TokenLayout | None  # None: a model whose token order is not known (raster order)
    placement: Placement | None
    kv_valid: torch.Tensor | None


class ForwardContext:
    """``layout`` and ``step`` are values or zero-argument callables, read at their first use:
    reading the step waits for the device (the sigma is a device tensor), and a forward whose calls
    all stay dense for a cheaper reason (FLUX at 1024², every call shorter than ``min_tokens``)
    should not pay for it."""

    def __init__(self, layout, step, double_blocks: int, whole_forward: bool):
        self._layout = layout
        self._step = step
        self.double_blocks = double_blocks  # FLUX/HunyuanVideo: single blocks are numbered after these
        self._main_calls = 0 if whole_forward else None  # counting needs to see the whole forward
        self._masks: dict[int, tuple[torch.Tensor, torch.Tensor | None, str | None]] = {}

    @property
    def layout(self) -> TokenLayout | None:
        """The model's token layout, None if not known (raster order)."""
        if callable(self._layout):
            self._layout = self._layout()
        return self._layout

    @property
    def step(self) -> int | None:
        """Global step index (split schedules continue counting), None if unknown."""
        if callable(self._step):
            self._step = self._step()
        return self._step

    def block_index(self, transformer_options: dict) -> int | None:
        """Index of this main-sequence call's transformer block, counted through the whole network
        (FLUX/HunyuanVideo single blocks follow the double blocks), or None if unknown.  Call once
        per main call."""
        counted = self._main_calls
        if counted is not None:
            self._main_calls += 1
        index = transformer_options.get("block_index")
        if index is None:
            return counted
        if transformer_options.get("block_type") == "single":
            return int(index) + self.double_blocks
        return int(index)

    def read_mask(self, mask: torch.Tensor, batch: int, n: int, n_extra: int) -> tuple[torch.Tensor | None, str | None]:
        """``(kv_valid, side of the padded tokens)`` of a mask; ``kv_valid`` None if it is not a
        key-padding mask."""
        cached = self._masks.get(id(mask))
        if cached is None or cached[0] is not mask:
            valid = key_padding_valid(mask, batch, n)
            side = side_from_padding(valid, n_extra) if valid is not None else None
            cached = (mask, valid, side)  # keeps the mask alive, so its id stays unique
            self._masks[id(mask)] = cached
        return cached[1], cached[2]

    def geometry(self, call, text_side: Callable[[str | None], str | None]) -> Geometry | str:
        """The call's :class:`Geometry`, or the dense reason when it is not the model's main
        attention or carries a mask other than key padding.  ``text_side(evidence)`` returns the side
        of the text tokens, remembering evidence across calls (the node state's memory)."""
        to = call.transformer_options
        layout = self.layout
        if layout is not None and layout.family == "wan" and to.get("grid_sizes") is not None:
            layout = layout.with_main_grid(to["grid_sizes"])
        n = call.n
        n_extra = n - layout.image_tokens if layout is not None else 0
        if n_extra < 0:
            return NOT_MAIN  # shorter than the latent: e.g. HunyuanVideo's token refiner
        kv_valid = side = None
        if call.mask is not None:
            kv_valid, side = self.read_mask(call.mask, call.b, n, n_extra)
            if kv_valid is None:
                return "mask"
        placement = None
        if layout is not None:
            side = layout.extra_side or side_from_img_slice(to.get("img_slice"), n, n_extra) or side
            placement = place(layout, n, text_side(side))
        return Geometry(layout, placement, kv_valid)
