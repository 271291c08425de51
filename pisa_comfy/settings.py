"""The node's widget values, validated once and turned into what the override needs.

Validation happens here, when the node runs, so a bad value is reported as a clear error on the
node instead of surfacing as a failure in the middle of sampling.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .library import BLOCK_SIZES as _KERNEL_BLOCK_SIZES
from .library import check_sparsity

#: Widget choices (ComfyUI combos are strings).
BLOCK_SIZES = tuple(str(b) for b in _KERNEL_BLOCK_SIZES)
TAYLOR_ORDERS = ("1", "0", "drop")
TOKEN_ORDERS = ("auto", "raster")
ROUTINGS = ("auto", "topk", "covariance", "adaptive")

#: The node's tail, not a widget: every approximated block also weighs the spread of its keys'
#: logits, which RoPE makes large.  Measured 32-47 % less error at real sizes on every generated
#: set, in tiled and in raster order, for 5-10 % more kernel time at the same sparsity (H100,
#: docs/fidelity.md).
TAIL = "lognormal"

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def parse_dense_blocks(text: str, name: str = "dense_blocks") -> frozenset[int]:
    """``"0, 1, 38-39"`` -> ``{0, 1, 38, 39}``; an empty string keeps no block dense.  ``name``
    is the widget named in error messages (other widgets use the same list syntax)."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text like '0, 1, 38-39', got {text!r}")
    blocks: set[int] = set()
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        if part.isdigit():
            blocks.add(int(part))
            continue
        match = _RANGE.match(part)
        if match is None:
            raise ValueError(f"{name}: cannot read {part!r} in {text!r}; use numbers and "
                             f"ranges separated by commas, e.g. '0, 1, 38-39'")
        first, last = int(match.group(1)), int(match.group(2))
        if last < first:
            raise ValueError(f"{name}: range {part!r} runs backwards; write it as '{last}-{first}'")
        blocks.update(range(first, last + 1))
    return frozenset(blocks)


@dataclass(frozen=True)
class PisaSettings:
    """What one PISA Patch node asked for (kernel arguments in the kernel's own vocabulary)."""

    sparsity: float = 0.875
    block_size: int = 64
    order: int | str = 1  # 1, 0 or "drop", as pisa_kernels.pisa_attention takes it
    dense_steps: int = 10
    dense_blocks: frozenset[int] = frozenset({0})
    min_tokens: int = 8192
    tile_tokens: bool = True  # token_order "auto": compact space-time tiles where the layout is known
    routing: str = "auto"  # "auto" (covariance for images, top-k for video), "topk", "cov" or "adaptive"
    verbose: bool = False
    #: pisa_kernels backend; not a widget.  ``PISA_BACKEND=reference`` (environment) makes the node
    #: run the PyTorch reference where Triton cannot run: slower than dense, for tests and debugging.
    backend: str = field(default_factory=lambda: os.environ.get("PISA_BACKEND", "auto"))

    @classmethod
    def from_widgets(cls, *, sparsity, block_size, taylor_order, dense_steps, dense_blocks, min_tokens,
                     token_order, routing, verbose) -> "PisaSettings":
        """Validate the widget values (as ComfyUI passes them) and convert them."""
        sparsity = check_sparsity(sparsity)
        block_size = _choice("block_size", str(block_size), BLOCK_SIZES)
        taylor_order = _choice("taylor_order", str(taylor_order), TAYLOR_ORDERS)
        token_order = _choice("token_order", token_order, TOKEN_ORDERS)
        routing = _choice("routing", routing, ROUTINGS)
        dense_steps = _non_negative_int("dense_steps", dense_steps)
        min_tokens = _non_negative_int("min_tokens", min_tokens)
        return cls(
            sparsity=sparsity,
            block_size=int(block_size),
            order="drop" if taylor_order == "drop" else int(taylor_order),
            dense_steps=dense_steps,
            dense_blocks=parse_dense_blocks(dense_blocks),
            min_tokens=min_tokens,
            tile_tokens=token_order == "auto",
            routing={"covariance": "cov"}.get(routing, routing),
            verbose=bool(verbose),
        )

    def describe(self) -> str:
        blocks = ",".join(str(b) for b in sorted(self.dense_blocks)) or "none"
        return (f"sparsity {self.sparsity:g}, block {self.block_size}, order {self.order}, "
                f"dense steps {self.dense_steps}, dense blocks {blocks}, min tokens {self.min_tokens}, "
                f"{'tiled' if self.tile_tokens else 'raster'} order, routing {self.routing}")


def _choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    return value
