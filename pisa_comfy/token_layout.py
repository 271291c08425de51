"""Where the image/video tokens and the text (or other extra) tokens sit in a model's attention.

The ``DIFFUSION_MODEL`` wrapper sees the latent and the conditioning of each forward, so it can
tell the latent grid(s) (:func:`layout_for_forward`).  Inside attention only the sequence length
is known; :func:`place` combines the two:

* Wan 2.1/2.2: video tokens only, frame-major.  Reference tokens (``ref_conv``) are prepended,
  other extras (S2V, pose, ...) appended.  v0.19.3+ also publishes ``grid_sizes``.
* FLUX: ``[txt | img | reference images]``; every image is a 2-D grid.
* HunyuanVideo: ``[ref | img]`` joined with text, text **last** up to v0.3.64 and **first** since
  Feb 2026.  The side is never assumed: it is read from ``img_slice`` (single blocks, v0.19.3+),
  from where the padding mask removes keys, or remembered from an earlier call of the same model.

Extra tokens (text, references, ...) are kept exact (``sink_kv`` and ``dense_q``); the grids are
visited in compact tiles when ``token_order`` is ``auto``.  Anything that does not fit (a shorter
sequence than the latent, e.g. HunyuanVideo's token refiner) is not the model's main attention.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from dataclasses import dataclass

import torch

START, END = "start", "end"


@dataclass(frozen=True)
class TokenLayout:
    """What one forward's main attention sequence is made of."""

    family: str
    grids: tuple[tuple[int, ...], ...]  # latent grids, contiguous and in sequence order
    extra_side: str | None  # where non-grid tokens sit: START, END, or None = find out per call

    @property
    def image_tokens(self) -> int:
        return sum(math.prod(g) for g in self.grids)

    @property
    def images_only(self) -> bool:
        """2-D grids (FLUX): PISA's covariance routing was tuned for images."""
        return all(len(g) == 2 for g in self.grids)

    def with_main_grid(self, grid) -> "TokenLayout":
        """The same layout with the core's own ``grid_sizes`` for its (last) latent grid."""
        return TokenLayout(self.family, self.grids[:-1] + (tuple(int(s) for s in grid),), self.extra_side)


@dataclass(frozen=True)
class Placement:
    """Token positions of one attention call."""

    exact: tuple[tuple[int, int], ...]  # ranges computed exactly as keys and as queries
    grids: tuple[tuple[int, tuple[int, ...]], ...]  # (first position, grid) of each latent grid


def _ceil_grid(shape, patch) -> tuple[int, ...]:
    return tuple(-(-int(s) // int(p)) for s, p in zip(shape, patch))


def _floor_grid(shape, patch) -> tuple[int, ...]:
    return tuple(int(s) // int(p) for s, p in zip(shape, patch))


def _wan(model, a: dict) -> TokenLayout:
    x, extra = a["x"], a.get("time_dim_concat")
    frames = x.shape[2] + (extra.shape[2] if extra is not None else 0)
    grid = _ceil_grid((frames, *x.shape[3:]), model.patch_size)  # the model pads to the patch size
    has_ref = getattr(model, "ref_conv", None) is not None and a.get("kwargs", {}).get("reference_latent") is not None
    return TokenLayout("wan", (grid,), START if has_ref else END)


def _flux(model, a: dict) -> TokenLayout:
    p = model.patch_size
    images = [a["x"]] + list(a.get("ref_latents") or [])  # reference latents are appended
    return TokenLayout("flux", tuple(_ceil_grid(t.shape[2:], (p, p)) for t in images), START)


def _hunyuan_video(model, a: dict) -> TokenLayout:
    patch = list(model.patch_size)
    images = [t for t in (a.get("ref_latent"), a["x"]) if t is not None]  # reference latent is prepended
    return TokenLayout("hunyuan_video", tuple(_floor_grid(t.shape[-len(patch):], patch) for t in images), None)


#: (module, class, layout function); subclasses share the layout of their base.
_FAMILIES = (
    ("comfy.ldm.wan.model", "WanModel", _wan),
    ("comfy.ldm.flux.model", "Flux", _flux),
    ("comfy.ldm.hunyuan_video.model", "HunyuanVideo", _hunyuan_video),
)


@functools.lru_cache(maxsize=None)
def _family_classes() -> tuple:
    found = []
    for module, name, fn in _FAMILIES:
        try:
            found.append((getattr(importlib.import_module(module), name), fn))
        except (ImportError, AttributeError):
            continue  # this core has no such model
    return tuple(found)


def layout_for_forward(model, forward, args: tuple, kwargs: dict) -> TokenLayout | None:
    """The layout of this forward of ``model`` (``forward`` is the wrapped ``_forward``), or None
    for models whose token order is not known (they run PISA in raster order)."""
    for cls, fn in _family_classes():
        if isinstance(model, cls):
            try:
                arguments = inspect.signature(forward).bind(*args, **kwargs).arguments
            except TypeError:
                return None
            return fn(model, arguments)
    return None


def side_from_img_slice(img_slice, n: int, n_extra: int) -> str | None:
    """``img_slice = [first, end]`` of the image tokens (FLUX/HunyuanVideo single blocks, v0.19.3+)."""
    if not img_slice or len(img_slice) != 2:
        return None
    first, end = int(img_slice[0]), int(img_slice[1])
    if first == n_extra and end == n:
        return START
    if first == 0 and end == n - n_extra:
        return END
    return None


def side_from_padding(valid: torch.Tensor, n_extra: int) -> str | None:
    """Padding only ever removes text keys, so removed keys show which end the text is at."""
    removed = (~valid).any(dim=0).nonzero().flatten()
    if removed.numel() == 0 or n_extra == 0:
        return None
    n = valid.shape[-1]
    lo, hi = int(removed.min()), int(removed.max())
    at_start, at_end = hi < n_extra, lo >= n - n_extra
    if at_start != at_end:
        return START if at_start else END
    return None


def place(layout: TokenLayout, n: int, side: str | None) -> Placement:
    """Positions for the main sequence of ``n >= layout.image_tokens`` tokens.

    With the side of the extra tokens unknown, both ends are kept exact and the grids are not
    tiled: text stays exact whichever end it is on, at the cost of a few more exact blocks.
    """
    n_img = layout.image_tokens
    n_extra = n - n_img
    side = layout.extra_side or side
    if n_extra == 0:
        first, exact = 0, ()
    elif side == START:
        first, exact = n_extra, ((0, n_extra),)
    elif side == END:
        first, exact = 0, ((n_img, n),)
    else:
        ends = ((0, n_extra), (n - n_extra, n)) if 2 * n_extra < n else ((0, n),)
        return Placement(exact=ends, grids=())
    grids, pos = [], first
    for g in layout.grids:
        grids.append((pos, g))
        pos += math.prod(g)
    return Placement(exact=exact, grids=tuple(grids))


def tiled_order(n: int, grids, block_size: int, tile_permutation) -> torch.Tensor:
    """Processing order: tokens outside the grids first (in input order, so they share few
    blocks), then each grid in compact tiles (``tile_permutation`` from ``pisa_kernels.tiling``)."""
    inside = torch.zeros(n, dtype=torch.bool)
    parts = []
    for first, grid in grids:
        size = math.prod(grid)
        inside[first:first + size] = True
        parts.append(tile_permutation(grid, block_size=block_size) + first)
    return torch.cat([(~inside).nonzero().flatten()] + parts)
